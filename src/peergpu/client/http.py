"""The HTTP layer under :class:`peergpu.client.PeerGPU`: credentials, token refresh, retries,
and the translation of httpx's exceptions and error responses into :mod:`.errors`.

Contracts:

- Credentials are sent as ``Authorization: Bearer ...`` per request, never as a default header,
  so signed storage URLs (which may point at another host) never see them.
- An API key wins over tokens. With an access token and a refresh token, an access token that is
  already expired (read from the JWT's ``exp``, unverified) is refreshed before the request; a
  ``401`` with ``token_expired``/``invalid_token`` refreshes once and retries once. Each rotation
  calls ``on_tokens(access, refresh)`` so the caller can persist the new pair: the old refresh
  token stops working at the server the moment it is used.
- Transport failures are retried (with a short backoff) only when repeating the request is safe:
  always when the connection could not be made, and otherwise only for ``GET`` and for requests
  marked idempotent (a submit with an ``Idempotency-Key``, a content-addressed upload). After that,
  :class:`PeerGPUUnavailable`.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import httpx

from peergpu.client.errors import PeerGPUError, PeerGPUUnavailable

API_PREFIX = "/api/v1"
TokenCallback = Callable[[str, str], None]


class TokenStore(Protocol):
    """Where several clients (processes) share one login. Refresh tokens work once, and the
    server treats a second use as theft and ends the login, so two processes must never both
    spend the same one: a refresh holds ``lock()``, then ``load()``s the stored pair, and if
    another process already rotated it, adopts that pair instead of refreshing."""

    def lock(self) -> AbstractContextManager[object]: ...

    def load(self) -> tuple[str | None, str | None] | None: ...

    def save(self, access_token: str, refresh_token: str) -> None: ...


#: codes of a 401 that a fresh access token can cure
_REFRESHABLE = frozenset({"token_expired", "invalid_token"})
#: refresh this many seconds before the access token's ``exp``, for clock skew and latency
_EXPIRY_MARGIN_SECONDS = 10.0


def normalize_server_url(url: str) -> str:
    """``https://x.example/`` and ``https://x.example/api/v1`` both mean ``https://x.example``."""
    url = url.strip().rstrip("/")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)].rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the server URL must start with http:// or https://, got {url!r}")
    return url


class HttpSession:
    """One ``httpx.Client`` plus the caller's credentials. Not thread-safe (neither is rotation:
    two threads refreshing at once would present one refresh token twice)."""

    def __init__(
        self,
        server_url: str,
        *,
        api_key: str | None = None,
        access_token: str | None = None,
        refresh_token: str | None = None,
        on_tokens: TokenCallback | None = None,
        token_store: TokenStore | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server_url = normalize_server_url(server_url)
        self.token_store = token_store
        self.api_key = api_key
        self.access_token = access_token
        self.refresh_token = refresh_token
        self.on_tokens = on_tokens
        self.retries = retries
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.client = httpx.Client(
            base_url=self.server_url + API_PREFIX,
            timeout=self.timeout,
            transport=transport,
            headers={"User-Agent": "peergpu-sdk"},
        )

    def close(self) -> None:
        self.client.close()

    # -- requests -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content: Callable[[], Any] | None = None,
        authenticated: bool = True,
        idempotent: bool = False,
    ) -> httpx.Response:
        """Send a request and return the response; raise :class:`PeerGPUError` for 4xx/5xx.

        ``content`` is a factory for the body (bytes or an iterator of bytes) so that a retry
        can send it again from the start."""
        with self.stream(
            method,
            path,
            json_body=json_body,
            params=params,
            headers=headers,
            content=content,
            authenticated=authenticated,
            idempotent=idempotent,
        ) as response:
            response.read()
            return response

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content: Callable[[], Any] | None = None,
        authenticated: bool = True,
        idempotent: bool = False,
        timeout: httpx.Timeout | None = None,
    ) -> Iterator[httpx.Response]:
        """Like :meth:`request`, but the body is left unread for the caller to stream."""

        def build() -> httpx.Request:
            all_headers = dict(headers or {})
            if authenticated:
                all_headers.update(self._auth_header())
            return self.client.build_request(
                method,
                path,
                json=json_body,
                params=_clean_params(params),
                headers=all_headers,
                content=content() if content is not None else None,
                timeout=timeout or self.timeout,
            )

        safe = idempotent or method.upper() in {"GET", "HEAD"}
        if authenticated and self._should_refresh_first():
            self.refresh()
        response = self._send(build, safe=safe)
        if authenticated and response.status_code == 401 and self._can_refresh():
            error = PeerGPUError.from_response(_read(response))
            response.close()
            if error.code not in _REFRESHABLE:
                raise error
            self.refresh()
            response = self._send(build, safe=safe)
        try:
            if response.status_code >= 400:
                raise PeerGPUError.from_response(_read(response))
            yield response
        finally:
            response.close()

    def send_unauthenticated(self, url: str, *, timeout: httpx.Timeout | None = None) -> Any:
        """A streaming GET of an absolute or server-relative URL with no credentials (signed
        URLs); a context manager yielding the response. Retried like any GET."""
        if url.startswith("/"):
            url = self.server_url + url
        return self.stream("GET", url, authenticated=False, timeout=timeout)

    # -- tokens ---------------------------------------------------------------------------

    def set_tokens(self, access_token: str, refresh_token: str) -> None:
        self.access_token = access_token
        self.refresh_token = refresh_token
        if self.token_store is not None:
            self.token_store.save(access_token, refresh_token)
        if self.on_tokens is not None:
            self.on_tokens(access_token, refresh_token)

    def refresh(self) -> None:
        """Trade the refresh token for a new pair (the old one stops working). With a token
        store, under its lock, and only if no other process has rotated the pair meanwhile."""
        store = self.token_store
        with store.lock() if store is not None else nullcontext():
            stored = store.load() if store is not None else None
            if stored is not None and stored[1] and stored[1] != self.refresh_token:
                self.access_token, self.refresh_token = stored
                return
            self._rotate()

    def _rotate(self) -> None:
        if not self.refresh_token:
            raise PeerGPUError(401, "not_authenticated", "No refresh token; log in again.")
        body = {"refresh_token": self.refresh_token}
        response = self._send(
            lambda: self.client.build_request("POST", "/auth/refresh", json=body), safe=False
        )
        _read(response)
        response.close()
        if response.status_code >= 400:
            raise PeerGPUError.from_response(response)
        pair = response.json()
        self.set_tokens(str(pair["access_token"]), str(pair["refresh_token"]))

    def _auth_header(self) -> dict[str, str]:
        credential = self.api_key or self.access_token
        return {"Authorization": f"Bearer {credential}"} if credential else {}

    def _can_refresh(self) -> bool:
        return not self.api_key and bool(self.refresh_token)

    def _should_refresh_first(self) -> bool:
        if not self._can_refresh():
            return False
        if not self.access_token:
            return True
        expires_at = jwt_expiry(self.access_token)
        return expires_at is not None and expires_at - _EXPIRY_MARGIN_SECONDS <= time.time()

    # -- transport ------------------------------------------------------------------------

    def _send(self, build: Callable[[], httpx.Request], *, safe: bool) -> httpx.Response:
        attempt = 0
        while True:
            request = build()
            try:
                return self.client.send(request, stream=True)
            except httpx.TransportError as exc:
                retryable = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) or safe
                if not retryable or attempt >= self.retries:
                    raise PeerGPUUnavailable(
                        f"could not reach {self.server_url}: {_describe(exc)}"
                    ) from exc
            time.sleep(0.25 * 3**attempt)
            attempt += 1


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (only to decide when to refresh);
    ``None`` if the token is not a readable JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
        return float(claims["exp"])
    except (ValueError, KeyError, TypeError):
        return None


def _read(response: httpx.Response) -> httpx.Response:
    try:
        response.read()
    except httpx.TransportError as exc:
        raise PeerGPUUnavailable(f"the connection broke while reading: {_describe(exc)}") from exc
    return response


def _clean_params(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Drop ``None`` values; booleans as ``true``/``false``; lists repeat the key."""
    if params is None:
        return None
    cleaned: dict[str, Any] = {}
    for key, value in params.items():
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        cleaned[key] = ("true" if value else "false") if isinstance(value, bool) else value
    return cleaned


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
