"""How errors become HTTP answers: a JSON body with a human-readable ``error``, never a trace."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
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
    StoreBusy,
    UnreadableLock,
)

__all__ = [
    "UNREADABLE", "ErrorBody", "InvalidBody", "document_common_answers", "error_answers",
    "install_error_handlers", "json_error", "unreadable_json",
]

UNREADABLE = ("The key's stored lock cannot be read: it is set aside, nothing is granted on it "
              "until a force-unlock clears it (reason `unreadable`; `unreadable` says why, "
              "with the stored value's size and digest, never its content).")


class ErrorBody(BaseModel):
    """Every error answer: a human-readable ``error``, plus what it is about (``lockKey``...)."""

    model_config = ConfigDict(extra="allow")

    error: str


class Problem(BaseModel):
    """One problem FastAPI found in a request: where (``loc``), what (``msg``), its kind."""

    loc: list[str | int]
    msg: str
    type: str


class InvalidBody(ErrorBody):
    """A 422: ``error`` starts with the name of the refused field, ``field`` names it, and
    ``detail`` (FastAPI's list of problems) comes when the schema refused the request, not
    when a rule the schema cannot state did (a ``wait`` above ``enhanced-locking-max-timeout``)."""

    field: str
    detail: list[Problem] = []


INVALID = "Refused: the field it names is not what the operation takes (see the schema)."
TOO_LARGE = ("The request body is over enhanced-locking-http-max-body (`limit` says how many "
             "bytes): refused unread, before the caller is checked.")
NOT_SERVED = ("Not served now: `reason: overloaded`, the service is at its bound of requests in "
              "flight (enhanced-locking-http-max-in-flight; never a DELETE) or had no free "
              "connection to its store in time, sent with `Retry-After`, nothing of the "
              "request is left; or `reason: unavailable`, a store did not answer.")


def error_answers(answers: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """Error answers of a route for its OpenAPI document: status code → what it means."""
    return {code: {"model": ErrorBody, "description": text} for code, text in answers.items()}


def json_error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def collision_json(key: str, holder: BaseModel, repo: str) -> JSONResponse:
    """409: ``key`` is held for a project of another repository than ``repo``, whose parts join
    to the same key (``gl/grp`` + ``sub/proj`` and ``gl/grp/sub`` + ``proj``); nothing was
    done to it."""
    held = holder.model_dump(mode="json", by_alias=True)
    return json_error(
        409, f"lock {key} is held for {held['project']['repoFullName']}, not {repo}: two "
        "projects join to the same key; nothing was done to it", lockKey=key,
        reason="collision", holder=held)


def unreadable_json(entry: UnreadableLock) -> Any:
    return entry.model_dump(mode="json", by_alias=True)


def _field(loc: Any) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI, *, busy: Callable[[], None]) -> None:
    """The error answers of ``app``; ``busy`` is called for each ``503 overloaded`` of a store
    whose pool had no free connection (``StoreBusy``), to count it."""
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

    @app.exception_handler(StoreBusy)
    async def _busy(request: Request, error: StoreBusy) -> JSONResponse:
        # The service's overload, as its bound of requests in flight answers it.
        busy()
        answer = json_error(503, str(error), reason="overloaded")
        answer.headers["Retry-After"] = "1"
        return answer

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 400:
            # FastAPI's "error parsing the body" (bytes that are not UTF-8 text, say): a body
            # that is not JSON is a 422 like any other malformed body, never an undocumented 400.
            return json_error(422, f"body: not valid JSON ({error.detail})", field="body",
                              detail=[{"loc": ["body"], "msg": str(error.detail),
                                       "type": "json_invalid"}])
        if error.status_code == 404 and (served := _without_slash(request)) is not None:
            return json_error(404, f"no such path {request.url.path}: the path is {served}, "
                                   "without the trailing slash")
        answer = json_error(error.status_code, str(error.detail))
        answer.headers.update(error.headers or {})
        if error.status_code == 405:
            # Starlette names the methods of the first route on the path; a path served by
            # several routes (GET and DELETE /v1/locks/by-key) allows all of theirs.
            answer.headers["Allow"] = ", ".join(_allowed(request))
        return answer


def _without_slash(request: Request) -> str | None:
    """The path a request ending in ``/`` names without it, when a route serves that path
    (the app answers no redirect to it: see ``redirect_slashes`` in ``create_app``)."""
    path = request.url.path
    if len(path) < 2 or not path.endswith("/"):
        return None
    bare = path.rstrip("/") or "/"
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.path_regex.fullmatch(bare):
            return bare
    return None


def _allowed(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.fullmatch(
                request.url.path):
            methods |= route.methods
    return sorted(methods)


def document_common_answers(app: FastAPI, *, always_served: Collection[str]) -> None:
    """Put in ``app``'s OpenAPI document the answers the layers around its routes give: 413 to
    an operation with a body, 503 to every one whose path is not in ``always_served``, and the
    422 this module answers (:class:`InvalidBody`) where FastAPI would document its own."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _add_common_answers(build(), always_served)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}


def _add_common_answers(document: dict[str, Any], always_served: Collection[str]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    invalid = InvalidBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(invalid.pop("$defs", {}))
    schemas[InvalidBody.__name__] = invalid
    fastapis = {"application/json": {"schema": {
        "$ref": "#/components/schemas/HTTPValidationError"}}}
    for path, item in document["paths"].items():
        for operation in item.values():
            answers = operation["responses"]
            if answers.get("422", {}).get("content") == fastapis:
                answers["422"] = {"description": INVALID, "content": _ref(InvalidBody)}
            if "requestBody" in operation:
                answers.setdefault("413", {"description": TOO_LARGE, "content": _ref(ErrorBody)})
            if path not in always_served:
                answers.setdefault("503", {
                    "description": NOT_SERVED, "content": _ref(ErrorBody),
                    "headers": {"Retry-After": {
                        "description": "With reason overloaded: seconds to wait before "
                                       "sending the request again.",
                        "schema": {"type": "integer"}}}})
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{unused}"' not in json.dumps(document):
            schemas.pop(unused, None)
