"""What the server refuses before any handler runs: bodies over --max-body-bytes (413) and,
with --api-key, requests without the key (401). Both are ASGI middlewares, so a refused
request never reaches FastAPI's body parsing, and both answer with OpenAI's error body.

    app.add_middleware(BodyLimitMiddleware, max_bytes=guards.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=guards.api_key, open_paths=guards.open_paths())
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from medqlora.ship.serve.errors import APIError

# 1 MiB holds hundreds of thousands of tokens, far past any served context (Mistral-7B's 32k
# tokens are ~130 KB of text), yet refuses the multi-megabyte bodies that would tie up a
# tokeniser thread for seconds and the memory for as long.
DEFAULT_MAX_BODY_BYTES = 2**20
API_KEY_ENV = "MEDQLORA_API_KEY"


@dataclass(frozen=True)
class Guards:
    """The server's access and size settings (`medqlora serve` flags)."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body accepted; larger ones get 413 (--max-body-bytes)."""
    api_key: str | None = None
    """When set, every route but /health needs `Authorization: Bearer <key>` (--api-key,
    or the MEDQLORA_API_KEY variable)."""
    public_metrics: bool = False
    """Leave /metrics open even with an API key, for a scraper without credentials."""

    def open_paths(self) -> frozenset[str]:
        """Routes answered without the key."""
        return frozenset({"/health", *(("/metrics",) if self.public_metrics else ())})


def exposure_warnings(host: str, guards: Guards) -> list[str]:
    """Warnings for the startup log: a non-loopback bind with no API key serves anyone."""
    if guards.api_key or is_loopback(host):
        return []
    return [f"binding {host} without an API key: anyone who reaches this port can generate and "
            f"read /metrics; set {API_KEY_ENV} (or --api-key), or bind 127.0.0.1 behind a proxy"]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; a hostname may resolve anywhere, so False."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BodyLimitMiddleware:
    """ASGI middleware: refuse a body over `max_bytes` with 413, at once when Content-Length
    says so, otherwise as soon as the bytes read pass the limit (chunked uploads, or a
    Content-Length that lies), so at most max_bytes plus one chunk is ever held.

    Starlette's RequestBodyLimitMiddleware answers plain text, and only once a route reads the
    body; clients here expect OpenAI's error body. The body read is handed to the app as one
    message; the connection's later messages (http.disconnect) pass through."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if (_content_length(scope) or 0) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return            # the client left mid-upload: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, scope, receive, send):
        # The unread rest of the body is read and dropped by uvicorn; closing the connection
        # instead would reset it, and the client could lose the 413 it has not read yet.
        error = APIError(413, f"body: larger than this server's limit of {self.max_bytes} bytes "
                         "(medqlora serve --max-body-bytes)", code="request_too_large")
        await error.response()(scope, receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None   # uvicorn refuses these; the streamed count still applies
    return None


def _replay(body: bytes, receive):
    """A receive callable that gives the buffered body first, then the connection's own."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()
    return replayed


class ApiKeyMiddleware:
    """ASGI middleware: outside `open_paths`, answer 401 (invalid_api_key) unless the request
    carries `Authorization: Bearer <api_key>`; compared in constant time (hmac.compare_digest),
    so the answer's timing does not tell how much of a guess was right."""

    def __init__(self, app, api_key: str, open_paths: frozenset[str]):
        self.app, self.key, self.open_paths = app, api_key.encode("utf-8"), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", ())).get(b"authorization")
        if given is not None and self._matches(given):
            return await self.app(scope, receive, send)
        message = ("Incorrect API key provided" if given is not None else
                   "You didn't provide an API key: send `Authorization: Bearer <key>`")
        error = APIError(401, f"{message} (the key this server was started with: "
                         f"medqlora serve --api-key or {API_KEY_ENV})", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)

    def _matches(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
