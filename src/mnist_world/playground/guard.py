"""What keeps the local server to its own page: requests whose Host is not the address it serves (DNS
rebinding) or whose Origin is another page's (any site the user has open) are refused before any route, the
WebSocket handshake included; request bodies are bounded in size and in the time they may take to arrive.

Every refusal is one 4xx answer with a one-line JSON error, `{"error": "..."}`, and the connection closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mnist_world.playground.world import PlaygroundError

log = logging.getLogger("mnist_world.playground")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may take: its body's bytes, its JSON's nesting, and the time its body may take."""

    max_body: int = 16 * 1024  # bytes: a request is a few numbers
    max_depth: int = 8
    read_s: float = 10.0


class RequestRefused(PlaygroundError):
    """A request refused before its route: carries its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str, request: Request | None = None) -> JSONResponse:
    """One 4xx/5xx answer, one line of JSON; the connection closes after it, so no byte of a bad request is
    ever taken for the next one."""
    message = " ".join(message.split())  # one line, whatever the message held
    if request is not None:
        log.warning("%s %s: %d %s", request.method, request.url.path, status, message)
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request's JSON body, refused with 415 unless it is declared JSON, 413 beyond `limits.max_body`
    (declared or sent) and 408 when it takes longer than `limits.read_s` to arrive (a body shorter than its
    Content-Length)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestRefused(415, f"a request body must be application/json, not {kind[:60] or 'undeclared'}")
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limits.max_body:  # the HTTP parser has checked it is a number
        raise RequestRefused(413, f"a request of {declared} bytes is too large (at most {limits.max_body})")
    chunks: list[bytes] = []
    size = 0

    async def gather() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body:
                raise RequestRefused(413, f"a request of over {limits.max_body} bytes is too large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(gather(), limits.read_s)
    except asyncio.TimeoutError:
        raise RequestRefused(
            408, f"the request body did not arrive within {limits.read_s:g} s (shorter than declared?)"
        ) from None
    return b"".join(chunks)


class LocalGuard:
    """ASGI middleware: only requests addressed to this server (`hosts`, as `name:port`) and sent by its own
    page (an Origin of `http://` one of them, or none: scripts send none) reach the application."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str]) -> None:
        self.app, self.hosts = app, hosts
        self.origins = frozenset(f"http://{host}" for host in hosts)

    def refusal(self, scope: Scope) -> str | None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        host = headers.get("host")
        if host is None:
            return "a request without a Host header"
        if host.lower() not in self.hosts:
            return f"Host {host[:80]!r} is not this server's address ({', '.join(sorted(self.hosts))})"
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            return f"Origin {origin[:80]!r} is not this server's page: a page may only drive its own server"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        log.warning("refused %s %s: %s", scope["type"], scope["path"], refusal)
        body = json.dumps({"error": refusal}).encode()
        if scope["type"] == "http":
            await error_response(403, refusal)(scope, receive, send)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await receive()  # websocket.connect
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body)),
                    ],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await receive()
            await send({"type": "websocket.close", "code": 1008})
