"""The JSON answer of the lock routes, rendered by orjson.

Starlette's ``JSONResponse`` renders with ``json.dumps(ensure_ascii=False, separators=(",",
":"))``; orjson writes the same compact UTF-8 for the content these routes answer (strings,
integers, booleans, null, lists and objects of them) several times faster, and an acquire or
release answer is rendered on every call.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

__all__ = ["JsonAnswer"]


class JsonAnswer(JSONResponse):
    """A JSON answer (``application/json``) rendered by orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
