"""The JSON answer of the lock routes, rendered by orjson.

Starlette's ``JSONResponse`` renders with ``json.dumps(ensure_ascii=False, separators=(",",
":"))``; orjson writes the same compact UTF-8 for the content these routes answer (strings,
integers, booleans, null, lists and objects of them) several times faster, and an acquire or
release answer is rendered on every call. A model's answer is best encoded once, by pydantic
straight to JSON (:func:`model_json`), and handed over as those bytes; a lock and a grant,
the answers of every lock pair, are written from a template of the lock's shape
(:func:`lock_json`, :func:`result_json`), the same bytes again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse

from enhanced_locking import types
from enhanced_locking.types import AcquireResult, BatchResult, Lock, LockText, Reason

__all__ = ["GRANT_AGAIN", "GRANT_NAME", "GRANT_UPGRADED", "NEW_GRANT", "STORE_DID_NOT_ANSWER",
           "JsonAnswer", "lock_json", "model_json", "refusal", "result_json"]


_JSON_TYPE = (b"content-type", b"application/json")


class JsonAnswer(JSONResponse):
    """A JSON answer (``application/json``) rendered by orjson, or already JSON (``bytes``)."""

    def __init__(self, content: Any, status_code: int = 200,
                 headers: Mapping[str, str] | None = None, media_type: str | None = None,
                 background: BackgroundTask | None = None, *,
                 raw_header: tuple[bytes, bytes] | None = None) -> None:
        if (headers is None and media_type is None and background is None
                and isinstance(content, bytes) and 200 <= status_code < 600
                and status_code not in (204, 304)):
            # The lock routes' answer, already JSON: the body and the two headers Starlette's
            # ``init_headers`` would make of it, in its order, without going through it
            # (``raw_header``, one of the route's own, first, as Starlette puts given ones).
            self.status_code, self.background, self.body = status_code, None, content
            length = (b"content-length", str(len(content)).encode("latin-1"))
            self.raw_headers = ([raw_header, length, _JSON_TYPE] if raw_header is not None
                                else [length, _JSON_TYPE])
            return
        if raw_header is not None:
            headers = {**(headers or {}), raw_header[0].decode("latin-1"):
                       raw_header[1].decode("latin-1")}
        super().__init__(content, status_code, headers, media_type, background)

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


GRANT_NAME = types.GRANT_HEADER.lower().encode("latin-1")
"""The name of an acquire's ``Lock-Grant`` (:data:`~enhanced_locking.types.GRANT_HEADER`), raw
(a batch's value: :func:`~enhanced_locking.types.batch_grant`)."""
NEW_GRANT = (GRANT_NAME, types.NEW_GRANT.encode("latin-1"))
GRANT_AGAIN = (GRANT_NAME, types.GRANT_AGAIN.encode("latin-1"))
GRANT_UPGRADED = (GRANT_NAME, types.GRANT_UPGRADED.encode("latin-1"))
"""An acquire's 200's ``Lock-Grant``, raw."""


def model_json(model: BaseModel) -> bytes:
    """``model`` as the API answers it (camelCase), encoded once: the same bytes as orjson's
    of ``model_dump(mode="json", by_alias=True)``, without the dict in between."""
    return model.__pydantic_serializer__.to_json(model, by_alias=True)


def lock_json(lock: Lock) -> bytes:
    """``model_json(lock)``, written from a template of the lock's shape
    (:class:`~enhanced_locking.types.LockText`); a lock whose times are not in UTC (none the
    stores answer) is pydantic's."""
    written = _ANSWERED.written(lock)
    return model_json(lock) if written is None else written[0]


_ANSWERED = LockText(by_alias=True)
"""The locks the API answers, as its answers write them (camelCase)."""


def result_json(result: AcquireResult) -> bytes:
    """``model_json(result)``: a grant (a lock, nothing else said) written around
    :func:`lock_json`; any other answer is pydantic's."""
    fields = result.__dict__
    lock = fields["lock"]
    if (lock is None or not fields["acquired"] or fields["reason"] is not None
            or fields["holder"] is not None or fields["queue_position"] is not None
            or fields["cycle"] is not None or fields["cycle_owners"] is not None
            or fields["hidden_owners"] is not None or fields["error"] is not None
            or fields["lock_key"] != lock.__dict__["key"]):
        return model_json(result)
    written = _ANSWERED.written(lock)
    if written is None:
        return model_json(result)
    body, key, _ = written
    return (b'{"acquired":true,"lockKey":' + key + b',"lock":' + body
            + b',"reason":null,"holder":null,"queuePosition":null,"cycle":null,'
            b'"cycleOwners":null,"hiddenOwners":null,"error":null}')


STORE_DID_NOT_ANSWER = ("the lock store did not answer, so nothing is known of the lock; send "
                        "the request again later")
"""The ``error`` of an acquire refused with reason ``unavailable`` that carries none."""

_Refused = TypeVar("_Refused", AcquireResult, BatchResult)


def refusal(result: _Refused) -> tuple[_Refused, int]:
    """An acquire's (or a batch's) refusal as answered, and its status: 503 when its store did
    not answer (reason ``unavailable``; ``error`` says so, and ``holder`` names the key's
    holder where it is known), as every answer of a store that did not answer is, so that a
    client tells "try again later" from "the lock is taken"; else 409, the locks' state
    refused it."""
    if result.reason is not Reason.UNAVAILABLE:
        return result, 409
    if result.error is None:
        result = result.model_copy(update={"error": STORE_DID_NOT_ANSWER})
    return result, 503
