"""The API's own pages: ``/docs`` (Swagger UI) and ``/redoc``, served whole by the service.

FastAPI's defaults load their scripts, style sheets and icons from a CDN (and Swagger UI sends
the document's address to its online validator): in a cluster that cannot reach outside the
pages stay blank, and elsewhere the CDN learns of each visit. Here they load the copies the
``fastapi-offline`` package ships (Swagger UI 5, which reads the OpenAPI 3.1 document, and
ReDoc), from ``/docs/assets/``; no validator is asked. Like ``/openapi.json`` they answer
without a token: they describe the API and carry no lock data.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS", "install_docs_pages"]

ASSETS = "/docs/assets"
"""Where the pages' scripts, style sheet and icon are served."""


def install_docs_pages(app: FastAPI) -> None:
    """``/docs``, ``/docs/oauth2-redirect`` and ``/redoc`` on ``app`` (made with
    ``docs_url=None, redoc_url=None``), with their assets under :data:`ASSETS`."""
    static = resources.files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(static)), name="docs-assets")
    document = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + document, title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + "/docs/oauth2-redirect",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None})

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + document, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png", with_google_fonts=False)
