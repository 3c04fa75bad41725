"""The JSON answer of the lock routes, rendered by orjson.

Starlette's ``JSONResponse`` renders with ``json.dumps(ensure_ascii=False, separators=(",",
":"))``; orjson writes the same compact UTF-8 for the content these routes answer (strings,
integers, booleans, null, lists and objects of them) several times faster, and an acquire or
release answer is rendered on every call. A model's answer is best encoded once, by pydantic
straight to JSON (:func:`model_json`), and handed over as those bytes.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel
from starlette.responses import JSONResponse

__all__ = ["JsonAnswer", "model_json"]


class JsonAnswer(JSONResponse):
    """A JSON answer (``application/json``) rendered by orjson, or already JSON (``bytes``)."""

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


def model_json(model: BaseModel) -> bytes:
    """``model`` as the API answers it (camelCase), encoded once: the same bytes as orjson's
    of ``model_dump(mode="json", by_alias=True)``, without the dict in between."""
    return model.__pydantic_serializer__.to_json(model, by_alias=True)
