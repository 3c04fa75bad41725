"""How errors become HTTP answers: a JSON body with a human-readable ``error``, never a trace."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from enhanced_locking.types import BackendUnavailable, InvalidRequest, LockNotOwned

__all__ = ["install_error_handlers", "json_error"]


def json_error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _field(loc: Any) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        message = str(first["msg"]).removeprefix("Value error, ")
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

    @app.exception_handler(BackendUnavailable)
    async def _unavailable(request: Request, error: BackendUnavailable) -> JSONResponse:
        return json_error(503, str(error), reason="unavailable")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        return json_error(error.status_code, str(error.detail))
