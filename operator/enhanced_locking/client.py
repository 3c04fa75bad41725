"""A small Python client for the lock service's HTTP API (used by the CLI and by scripts)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

from enhanced_locking.types import AcquireResult, Lock, LockRequest, Locks

__all__ = ["Client", "ServiceError"]

DEFAULT_URL = "http://127.0.0.1:4142"


class ServiceError(Exception):
    """The service answered with an error (``status`` 4xx/5xx) or could not be reached (0)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Client:
    """Blocking client; ``with Client(url) as client: client.acquire(...)``."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, ok: tuple[int, ...] = (200,),
              timeout: float | None = None, **kwargs: Any) -> tuple[int, Any]:
        try:
            if timeout is not None:
                kwargs["timeout"] = timeout
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ServiceError(0, f"cannot reach the lock service at {self._http.base_url}: "
                                  f"{error}") from None
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code not in ok:
            message = body.get("error") if isinstance(body, dict) else None
            raise ServiceError(response.status_code, message or f"HTTP {response.status_code}",
                               body)
        return response.status_code, body

    def acquire(self, request: LockRequest) -> AcquireResult:
        """Acquire (waiting if ``request.wait`` says so); refusals come back as results."""
        wait = request.wait.total_seconds() if request.wait else 0.0
        _, body = self._call("POST", "/v1/locks", ok=(200, 409), timeout=wait + 30,
                             json=request.model_dump(mode="json", by_alias=True,
                                                     exclude_none=True))
        return AcquireResult.model_validate(body)

    def get(self, key: str) -> Lock | None:
        status, body = self._call("GET", "/v1/locks/by-key", ok=(200, 404), params={"key": key})
        return Lock.model_validate(body["lock"]) if status == 200 else None

    def release(self, key: str, *, pull: int | None = None) -> Lock | None:
        params: dict[str, Any] = {"key": key}
        if pull is not None:
            params["pull"] = pull
        status, body = self._call("DELETE", "/v1/locks/by-key", ok=(200, 404), params=params)
        return Lock.model_validate(body["lock"]) if status == 200 else None

    def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        params = {k: v for k, v in {"repo": repo, "pull": pull}.items() if v is not None}
        _, body = self._call("GET", "/v1/locks", params=params)
        return [Lock.model_validate(item) for item in body["locks"]]

    def unlock_pull(self, repo: str, pull: int) -> Locks:
        _, body = self._call("DELETE", "/v1/locks/by-pull", params={"repo": repo, "pull": pull})
        return [Lock.model_validate(item) for item in body["released"]]

    def config(self) -> dict[str, Any]:
        _, body = self._call("GET", "/v1/config")
        return dict(body)
