"""How errors become HTTP answers: a JSON body with a human-readable ``error``, never a trace."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from starlette.routing import Route

from enhanced_locking.types import (
    BackendUnavailable,
    InvalidRequest,
    LockNotOwned,
    LockUnreadable,
    UnreadableLock,
)

__all__ = [
    "UNREADABLE", "ErrorBody", "error_answers", "install_error_handlers", "json_error",
    "unreadable_json",
]

UNREADABLE = ("The key's stored lock cannot be read: it is set aside, nothing is granted on it "
              "until a force-unlock clears it (reason `unreadable`; `unreadable` says why, "
              "with the stored value's size and digest, never its content).")


class ErrorBody(BaseModel):
    """Every error answer: a human-readable ``error``, plus what it is about (``lockKey``...)."""

    model_config = ConfigDict(extra="allow")

    error: str


def error_answers(answers: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """Error answers of a route for its OpenAPI document: status code → what it means."""
    return {code: {"model": ErrorBody, "description": text} for code, text in answers.items()}


def json_error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def unreadable_json(entry: UnreadableLock) -> Any:
    return entry.model_dump(mode="json", by_alias=True)


def _field(loc: Any) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        message = str(first["msg"]).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            # The location of a JSON syntax error is a character offset, not a field.
            position = first["loc"][-1] if first["loc"] else "?"
            message = f"not valid JSON ({first['msg']} at character {position})"
            first = {**first, "loc": ("body",)}
        detail = [
            {"loc": list(p.get("loc", ())), "msg": str(p.get("msg")), "type": p.get("type")}
            for p in problems
        ]
        return json_error(
            422, f"{_field(first['loc'])}: {message}", field=_field(first["loc"]), detail=detail
        )

    @app.exception_handler(InvalidRequest)
    async def _refused(request: Request, error: InvalidRequest) -> JSONResponse:
        return json_error(422, str(error), field=error.field)

    @app.exception_handler(LockNotOwned)
    async def _not_owned(request: Request, error: LockNotOwned) -> JSONResponse:
        holder = error.holder.model_dump(mode="json", by_alias=True)
        return json_error(409, str(error), lockKey=error.key, holder=holder)

    @app.exception_handler(LockUnreadable)
    async def _unreadable(request: Request, error: LockUnreadable) -> JSONResponse:
        # The request was fine; what is stored is not: a conflict with the store's state.
        return json_error(409, str(error), lockKey=error.found.key, reason="unreadable",
                          unreadable=unreadable_json(error.found))

    @app.exception_handler(BackendUnavailable)
    async def _unavailable(request: Request, error: BackendUnavailable) -> JSONResponse:
        return json_error(503, str(error), reason="unavailable")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 400:
            # FastAPI's "error parsing the body" (bytes that are not UTF-8 text, say): a body
            # that is not JSON is a 422 like any other malformed body, never an undocumented 400.
            return json_error(422, f"body: not valid JSON ({error.detail})", field="body",
                              detail=[{"loc": ["body"], "msg": str(error.detail),
                                       "type": "json_invalid"}])
        answer = json_error(error.status_code, str(error.detail))
        answer.headers.update(error.headers or {})
        if error.status_code == 405:
            # Starlette names the methods of the first route on the path; a path served by
            # several routes (GET and DELETE /v1/locks/by-key) allows all of theirs.
            answer.headers["Allow"] = ", ".join(_allowed(request))
        return answer


def _allowed(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.fullmatch(
                request.url.path):
            methods |= route.methods
    return sorted(methods)
