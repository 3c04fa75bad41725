"""The API's own pages (``/docs``, Swagger UI; ``/redoc``) come whole from the service: every
script, style sheet and icon they load is served by it, so they work where nothing outside can
be reached (an air-gapped cluster) and no one outside learns of a visit. FastAPI's defaults load
them from a CDN (and Swagger UI sends the document's address to its online validator)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.support.served import in_process

from enhanced_locking.api import create_app
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider

LOADED = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|(?:_url|Url)\s*:\s*["']([^"']+)["']""")


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    service = LockService(ConfigProvider(EnhancedLockingConfig(data_dir=str(tmp_path),
                                                               audit_stdout=False)))
    app = create_app(service)
    async with in_process(app) as client:
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_a_docs_page_loads_nothing_from_outside(http: httpx.AsyncClient,
                                                      page: str) -> None:
    answer = await http.get(page)
    assert answer.status_code == 200, answer.text
    assert "http://" not in answer.text and "https://" not in answer.text, answer.text
    loaded = [a or b for a, b in LOADED.findall(answer.text)]
    assert any(url.endswith(".js") for url in loaded), answer.text
    for url in loaded:
        assert url.startswith("/"), url
        asset = await http.get(url)
        assert asset.status_code == 200, (url, asset.text[:200])
        assert asset.content, url


async def test_swagger_ui_asks_no_online_validator(http: httpx.AsyncClient) -> None:
    page = (await http.get("/docs")).text
    assert re.search(r'"?validatorUrl"?\s*:\s*null', page), page
