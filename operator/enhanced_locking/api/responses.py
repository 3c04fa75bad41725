"""The JSON answer of the lock routes, rendered by orjson.

Starlette's ``JSONResponse`` renders with ``json.dumps(ensure_ascii=False, separators=(",",
":"))``; orjson writes the same compact UTF-8 for the content these routes answer (strings,
integers, booleans, null, lists and objects of them) several times faster, and an acquire or
release answer is rendered on every call. A model's answer is best encoded once, by pydantic
straight to JSON (:func:`model_json`), and handed over as those bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse

__all__ = ["JsonAnswer", "model_json"]


_JSON_TYPE = (b"content-type", b"application/json")


class JsonAnswer(JSONResponse):
    """A JSON answer (``application/json``) rendered by orjson, or already JSON (``bytes``)."""

    def __init__(self, content: Any, status_code: int = 200,
                 headers: Mapping[str, str] | None = None, media_type: str | None = None,
                 background: BackgroundTask | None = None) -> None:
        if (headers is None and media_type is None and background is None
                and isinstance(content, bytes) and 200 <= status_code < 600
                and status_code not in (204, 304)):
            # The lock routes' answer, already JSON: the body and the two headers Starlette's
            # ``init_headers`` would make of it, in its order, without going through it.
            self.status_code, self.background, self.body = status_code, None, content
            self.raw_headers = [(b"content-length", str(len(content)).encode("latin-1")),
                                _JSON_TYPE]
            return
        super().__init__(content, status_code, headers, media_type, background)

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


def model_json(model: BaseModel) -> bytes:
    """``model`` as the API answers it (camelCase), encoded once: the same bytes as orjson's
    of ``model_dump(mode="json", by_alias=True)``, without the dict in between."""
    return model.__pydantic_serializer__.to_json(model, by_alias=True)
