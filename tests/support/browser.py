"""Headless Chromium for the console's tests: Debian's ``chromium`` and ``chromium-driver``,
driven through selenium's WebDriver. Nothing is downloaded: selenium is given both paths.

``hack/ensure-chromium.sh`` installs them (``make test`` runs it); a test that finds neither
fails saying so, never skips.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
"""Where the screenshots go (``build/`` is not tracked; docs/images holds the published ones)."""

T = TypeVar("T")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")


def _found(*names: str) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium WebDriver with a fresh profile, quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = _found("chromium", "chromium-browser")
    driver_path = _found("chromedriver")
    if browser is None or driver_path is None:
        pytest.fail("the console tests need Debian's chromium and chromium-driver: run "
                    "hack/ensure-chromium.sh (make test does)", pytrace=False)
    profile = tempfile.mkdtemp(prefix="el-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def until(what: str, check: Callable[[], T | None], *, timeout: float = 20,
          details: Callable[[], str] | None = None) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details else ""
            pytest.fail(f"never: {what}{extra}", pytrace=False)
        time.sleep(0.1)


def screenshot(driver: object, name: str) -> Path:
    """Save the page as build/test-artifacts/console/NAME.png; its path."""
    path = ARTIFACTS / "console" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    return path
