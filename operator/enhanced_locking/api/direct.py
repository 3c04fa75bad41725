"""The routes every Atlantis plan and apply calls, served by a direct handler to the same contract.

FastAPI reads a route's inputs from its endpoint's signature: the OpenAPI document, the 422
answers and, on every call, the work of reading them — the body parsed into Python objects
and validated again, each dependency and parameter solved through generic machinery, two
exit stacks — and, before that, the route found by trying the routes one by one. For the
lock routes that machinery cost more server time than the lock itself (docs/benchmarks.md,
"HTTP"). :func:`serve_directly` keeps such a route exactly as declared (its OpenAPI entry is
the same) and puts a direct handler in front of FastAPI's own:

* the route is found by its method and path in one look-up, ahead of the linear search
  (:class:`DirectRoutes`; only a route no earlier route could match is found this way), and
  handed its request right inside FastAPI's exception handling (:class:`DirectLane`), without
  the rest of the way down to it (the exit stack, the router, the route's wrappers);
* the JSON body is validated from its bytes by the body model (``model_validate_json``,
  pydantic's parser), the query parameters each by FastAPI's own field for it (the same
  constraints, validators and defaults);
* the caller is resolved by the route's own dependency function, and the endpoint is called
  with those values; its answer is already a response (the endpoints of direct routes answer
  with encoded JSON).

Whatever the direct handler does not take as it is — a body that does not validate or is not
``application/json``, a missing or invalid parameter — goes to FastAPI's handler, with the
body it read, and is answered exactly as before: the 422s keep FastAPI's and
:mod:`.errors`'s shape, built in one place. So the direct handler serves only requests that
FastAPI would have served with the same values.

The direct handler reads FastAPI's and Starlette's private parts (a route's dependant, a
field's type adapter, the exception middleware's handlers, the keys they put in the scope), so
it is used only on the releases it was checked against (:data:`CHECKED_RELEASES`): on any
other, :func:`serve_directly` leaves the route to FastAPI's own handler, which answers the same
(slower). ``tests/unit/test_direct_routes.py`` fails when the pinned FastAPI or Starlette
(``constraints.txt``) is not one of them, so an upgrade checks the direct handler again.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin
from urllib.parse import unquote

import fastapi
import starlette
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Router, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

try:
    from fastapi.routing import _FASTAPI_SCOPE_KEY
    from starlette._exception_handler import wrap_app_handling_exceptions
    from starlette._utils import get_route_path
except ImportError:  # another release: its routes are FastAPI's alone (see CHECKED_RELEASES)
    _INTERNALS = False
else:
    _INTERNALS = True

__all__ = ["CHECKED_RELEASES", "DirectLane", "DirectRoutes", "checked_release", "query_values",
           "serve_directly"]

CHECKED_RELEASES = {"fastapi": ("0.165.",), "starlette": ("1.10.",)}
"""The FastAPI and Starlette releases (version prefixes) whose private parts the direct
handler was checked against; with any other installed, no route is served directly. To allow
a new one: run ``tests/unit/test_direct_routes.py`` on it, read the parts named in this
module's docstring in its source, then add its prefix here."""


def checked_release() -> bool:
    """Whether the installed FastAPI and Starlette are releases the direct handler was checked
    against (:data:`CHECKED_RELEASES`)."""
    return (_INTERNALS and fastapi.__version__.startswith(CHECKED_RELEASES["fastapi"])
            and starlette.__version__.startswith(CHECKED_RELEASES["starlette"]))

JSON_TYPES = frozenset({"application/json", "application/json; charset=utf-8"})
"""The content types read directly (case aside); any other goes to FastAPI's handler, which
decides what it is."""


class _Refer(Exception):
    """The direct handler does not take this request: FastAPI's handler answers it."""


@dataclass(frozen=True)
class _Query:
    """One query parameter: FastAPI's field for it, its name in the URL, and the validator that
    checks a value (see :func:`_checker`)."""

    name: str
    alias: str
    field: Any  # fastapi's ModelField: validate() is the route's own validation
    required: bool
    default: Any
    check: Callable[[str], Any]


def _checker(field: Any) -> Callable[[str], Any]:
    """What ``field.validate(value)`` checks, as one call that answers the value or raises
    (``ValidationError`` or ``_Refer``): the field's own validator (pydantic's core, which
    FastAPI's ``validate`` asks through its type adapter, with the same ``from_attributes``)
    without FastAPI's wrapper, which turns the error into a list of problems the direct
    handler does not read (a refused value goes to FastAPI's handler, which validates it again
    and answers the 422): about 3.5k instructions a parameter. A field without that type
    adapter is asked through ``validate`` itself."""
    adapter = getattr(field, "_type_adapter", None)
    validator = getattr(adapter, "validator", None)
    if validator is not None:
        validate = validator.validate_python

        def check(value: str) -> Any:
            return validate(value, from_attributes=True)

        return check

    def check_by_field(value: str) -> Any:
        checked, problems = field.validate(value)
        if problems:
            raise _Refer
        return checked

    return check_by_field


def _plan(route: APIRoute) -> tuple[type[BaseModel] | None, str | None, str | None,
                                    list[_Query], list[tuple[str, Callable[..., Any]]]]:
    """What a direct handler needs of ``route``; ``TypeError`` when its inputs are more than a
    JSON body model, query parameters, the request and dependencies on the request alone."""
    dependant = route.dependant
    where = f"{sorted(route.methods or ())} {route.path}"
    if not inspect.iscoroutinefunction(route.endpoint):
        raise TypeError(f"route {where}: only an async endpoint can be served directly")
    if (dependant.path_params or dependant.header_params or dependant.cookie_params
            or dependant.background_tasks_param_name or dependant.response_param_name
            or dependant.websocket_param_name or dependant.security_scopes_param_name
            or route._embed_body_fields or len(dependant.body_params) > 1):
        raise TypeError(f"route {where}: only a body model, query parameters, the request and "
                        "request-only dependencies can be served directly")
    if getattr(route, "max_body_size", None) is not None:
        # FastAPI bounds the body in the wrapper of the route's app, which the direct handler
        # takes the place of: served directly, a body over the bound would be read.
        raise TypeError(f"route {where}: a route with a body bound of FastAPI's own "
                        "(max_body_size) is not served directly; the service bounds bodies in "
                        "its middleware")
    body_model: type[BaseModel] | None = None
    body_name: str | None = None
    if dependant.body_params:
        field = dependant.body_params[0]
        annotation = field.field_info.annotation
        if (not isinstance(annotation, type) or not issubclass(annotation, BaseModel)
                or field.field_info.metadata or route.body_field is None):
            raise TypeError(f"route {where}: its body must be one pydantic model")
        body_model, body_name = annotation, field.name
    queries = []
    for field in dependant.query_params:
        info = field.field_info
        required = info.is_required()
        if (info.validation_alias is not None or info.validate_default
                or info.default_factory is not None
                or not (required or info.default is None)
                or not _scalar(info.annotation)):
            raise TypeError(f"route {where}: query parameter {field.name} is not a plain "
                            "scalar with a None default")
        queries.append(_Query(field.name, field.alias, field, required,
                              None if required else info.default, _checker(field)))
    dependencies = []
    for sub in dependant.dependencies:
        if (sub.dependencies or sub.query_params or sub.body_params or sub.header_params
                or sub.path_params or sub.cookie_params or sub.request_param_name is None
                or sub.name is None or not inspect.iscoroutinefunction(sub.call)):
            raise TypeError(f"route {where}: dependency {sub.name} must be async and take the "
                            "request only")
        dependencies.append((sub.name, sub.call))
    return body_model, body_name, dependant.request_param_name, queries, dependencies


def _scalar(annotation: Any) -> bool:
    """Whether ``annotation`` is ``str`` or ``int``, optionally annotated or ``| None``."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar(get_args(annotation)[0])
    if origin in (Union, UnionType):
        kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
        return len(kinds) == 1 and _scalar(kinds[0])
    return annotation in (str, int)


def serve_directly(app: FastAPI, endpoint: Callable[..., Awaitable[Any]]) -> None:
    """Serve the route of ``endpoint`` (already added to ``app``) by a direct handler, in front
    of FastAPI's, and find it by method and path first (see the module's docstring). On a
    FastAPI or Starlette the direct handler was not checked against, the route stays FastAPI's
    alone (see :data:`CHECKED_RELEASES`)."""
    if not checked_release():
        return
    route = next(r for r in app.router.routes
                 if isinstance(r, APIRoute) and r.endpoint is endpoint)
    body_model, body_name, request_name, queries, dependencies = _plan(route)
    referred = route.app

    async def direct(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        body: bytes | None = None
        try:
            values: dict[str, Any] = {}
            if body_model is not None:
                try:
                    body = await _read_body(request)
                except Exception:  # the client left mid-body, say: FastAPI's handler says so
                    raise _Refer from None
                kind = _content_type(scope)
                if kind is None or kind.lower() not in JSON_TYPES:
                    raise _Refer
                values[body_name] = body_model.model_validate_json(body)  # type: ignore[index]
            if queries:
                params = query_values(scope["query_string"])
                for query in queries:
                    raw = params.get(query.alias)
                    if raw is None:
                        if query.required:
                            raise _Refer
                        values[query.name] = query.default
                        continue
                    values[query.name] = query.check(raw)  # raises when FastAPI's would refuse it
        except (_Refer, ValidationError):
            await _with_file_stack(referred, scope,
                                   receive if body is None else _replaying(body, receive), send)
            return
        if request_name is not None:
            values[request_name] = request
        for name, call in dependencies:
            values[name] = await call(request)
        response = await endpoint(**values)
        if not isinstance(response, Response):
            raise TypeError(f"{route.path}: a directly served endpoint answers a Response, "
                            f"not {type(response).__name__}")
        await response(scope, receive, send)

    route.app = direct
    _direct_routes(app).add(route)


FILE_STACK = "fastapi_middleware_astack"
"""Where FastAPI's exit stack middleware puts the request's exit stack, which FastAPI's
handler requires (it closes the files of a form there)."""


async def _with_file_stack(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """``app`` (FastAPI's handler of a direct route) run as under FastAPI's exit stack
    middleware: a request handed over by :class:`DirectLane` passed none, and gets its exit
    stack here, only when FastAPI's handler is to answer it."""
    if FILE_STACK in scope:
        await app(scope, receive, send)
        return
    async with AsyncExitStack() as stack:
        scope[FILE_STACK] = stack
        await app(scope, receive, send)


def query_values(query: bytes) -> dict[str, str]:
    """What ``request.query_params.get`` answers for each name (its last value), without
    Starlette's multi-dict: ``parse_qsl(..., keep_blank_values=True)`` of the latin-1 text,
    written out for the query of a lock call (two or three names), whose names and values
    mostly need no unquoting (``unquote`` runs only where a ``%`` is)."""
    values: dict[str, str] = {}
    for field in query.decode("latin-1").split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        if "+" in field:
            name, value = name.replace("+", " "), value.replace("+", " ")
        if "%" in field:
            name, value = unquote(name), unquote(value)
        values[name] = value
    return values


async def _read_body(request: Request) -> bytes:
    """``await request.body()``, read from the request's ``receive`` without Starlette's
    stream (an async generator in an ``aclosing`` block: about 20k instructions for a body of
    one message); kept on the request as ``body()`` keeps it, so a later ``body()`` answers
    it. A disconnect before the body's end raises ``ClientDisconnect``, as ``body()`` does."""
    chunks: list[bytes] = []
    receive = request.receive
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        elif kind == "http.disconnect":
            raise ClientDisconnect
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body  # where Request.body() keeps what it read
    request._stream_consumed = True
    return body


def _content_type(scope: Scope) -> str | None:
    """What ``request.headers.get("content-type")`` answers (the first one), read from the raw
    headers (ASGI names them in lower case) without building Starlette's ``Headers``, whose
    ``get`` goes through the mapping's ``__getitem__`` and lower-cases every name it passes."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


def _replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` with the body already read handed out again first."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class DirectRoutes(BaseRoute):
    """The directly served routes, found by method and path in one look-up. Placed first in the
    app's routes; it matches only a request one of them matches fully, so every other request
    is routed as before. (Not an API route: the OpenAPI document does not see it.)"""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], APIRoute] = {}

    def add(self, route: APIRoute) -> None:
        _, _, params = compile_path(route.path)
        if params:
            raise TypeError(f"route {route.path}: a direct route has no path parameters")
        for method in route.methods or ():
            self.table[(method, route.path)] = route

    def check(self, routes: list[BaseRoute]) -> None:
        """Refuse a direct route that an earlier route could also match (finding it first would
        change which route answers)."""
        for (method, path), route in self.table.items():
            scope = {"type": "http", "method": method, "path": path, "root_path": ""}
            for earlier in routes:
                if earlier is self:
                    continue
                if earlier is route:
                    break
                if earlier.matches(scope)[0] is Match.FULL:
                    raise RuntimeError(f"route {method} {path} is served directly but an "
                                       f"earlier route matches it too: {earlier!r}")

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            route = self.table.get((scope["method"], get_route_path(scope)))
            if route is not None:
                if _FASTAPI_SCOPE_KEY in scope or "path_params" in scope:
                    return route.matches(scope)  # an included router's context, a mount's
                # What route.matches answers for a scope without either (a path without
                # parameters, found in full by method and path), without looking at the path
                # again by its pattern: about 10k instructions a request.
                return Match.FULL, {"endpoint": route.endpoint, "path_params": {},
                                    "route": route}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await scope["route"].handle(scope, receive, send)


class DirectLane:
    """ASGI middleware, the innermost of the app's own, right outside FastAPI's exception
    middleware: a request of a direct route is handed to its direct handler here, inside the
    exception handling that middleware gives every request (the app's handlers, the same
    ``Request``), without the rest of the way down, which does nothing for it: the exit stack
    middleware (its stack closes a form's files; FastAPI's handler, when a direct route refers
    a request to it, gets one, see :func:`_with_file_stack`), the router's search (its
    ``router`` and the route's ``endpoint``, ``route`` and ``path_params`` go in the scope as
    it puts them there) and three frames of route wrappers, each a frame every suspension of
    the request passes through. Everything else passes on as before: another route, and a
    request in a context the router reads (a mount's or an included router's, FastAPI's
    telemetry of the request, which notes the route found).

    Not a coroutine, as :class:`~enhanced_locking.api.server.BodyLimit`: either way the
    request gets the next app's awaitable, with no frame of this one's in the chain."""

    def __init__(self, app: ASGIApp, *, router: Router) -> None:
        self.app = app
        self.router = router
        routes = router.routes
        table = routes[0] if routes and isinstance(routes[0], DirectRoutes) else None
        # Only where the way skipped is as described: FastAPI's exception middleware right
        # inside, and a router without form limits (it would note them in the scope).
        self.handling = app if isinstance(app, ExceptionMiddleware) else None
        usable = table is not None and self.handling is not None \
            and not getattr(router, "form_limits", None)
        self.table: dict[tuple[str, str], APIRoute] = table.table if usable and table else {}

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if (scope["type"] == "http" and self.handling is not None and "fastapi" not in scope
                and "path_params" not in scope and "fastapi.telemetry" not in scope):
            route = self.table.get((scope["method"], get_route_path(scope)))
            if route is not None:
                # What ExceptionMiddleware, the router and the route would do for it.
                scope["starlette.exception_handlers"] = (self.handling._exception_handlers,
                                                         self.handling._status_handlers)
                if "router" not in scope:
                    scope["router"] = self.router
                scope["endpoint"] = route.endpoint
                scope["path_params"] = {}
                scope["route"] = route
                handled = wrap_app_handling_exceptions(route.app, Request(scope, receive, send))
                return handled(scope, receive, send)
        return self.app(scope, receive, send)


def _direct_routes(app: FastAPI) -> DirectRoutes:
    routes = app.router.routes
    if routes and isinstance(routes[0], DirectRoutes):
        return routes[0]
    if app.middleware_stack is not None:
        raise RuntimeError("routes are served directly only before the app has started")
    table = DirectRoutes()
    routes.insert(0, table)
    # The innermost of the app's own middleware (add_middleware puts each one outside those
    # added before), so every other one (the body limit, the bound of requests in flight)
    # sees the request first, as before.
    app.user_middleware.append(Middleware(DirectLane, router=app.router))
    return table


def check_direct_routes(app: FastAPI) -> None:
    """Once every route is added: refuse a direct route another route would have answered."""
    routes = app.router.routes
    if routes and isinstance(routes[0], DirectRoutes):
        routes[0].check(routes)
