"""The playground's local web server: the page, its static files and a small JSON API.

Standard library only: a `ThreadingHTTPServer` answers each request on its own thread, so a frame being
dreamed for one tab never holds up the page, its files or another tab. The state lives in `Playground`:
the loaded models (one per checkpoint path) and the sessions (one per browser tab, each with its own lock).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import secrets
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from mnist_world.playground.dreamer import SamplerSettings
from mnist_world.playground.protocol import RestartRequest, StepRequest, parse_restart, parse_step
from mnist_world.playground.recording import Recording, animation_gif
from mnist_world.playground.session import Session
from mnist_world.playground.world import PlaygroundError, ValidationData, World, load_world

log = logging.getLogger("mnist_world.playground")

MAX_BODY = 64 * 1024  # bytes: a request is a few numbers
MAX_SESSIONS = 32  # the least recently used session goes beyond this many tabs
MAX_WORLDS = 4  # checkpoints kept loaded
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


class UnknownSession(PlaygroundError):
    """A session id the server does not hold (it restarted, or the tab was idle while many others played)."""


@dataclasses.dataclass(frozen=True)
class PlaySettings:
    """What `mnist-world play` was started with: the defaults of every run."""

    checkpoint: str
    tokens: str
    frames: str
    actions: str
    train_sequences: int
    val_sequences: int
    decode: str = "mean"
    sequence: int | None = None  # None: the first validation sequence
    seed: int = 0
    sampler: SamplerSettings = SamplerSettings()
    keep: int | None = None  # frames kept when the context slides; None: the checkpoint's past frames
    step_px: float | None = None  # one arrow-key step in pixels of a frame; None: the data's typical move
    device: str = "cpu"
    overlay: bool = True  # mark the ego digit, tracked with the action store's tracker settings


class WorldLoader:
    """Loads the stores once and each checkpoint when first asked for it (again when its file changes)."""

    def __init__(self, settings: PlaySettings) -> None:
        self.settings = settings
        self._data: ValidationData | None = None
        self._worlds: collections.OrderedDict[str, tuple[int, World]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, checkpoint: str) -> World:
        with self._lock:
            if self._data is None:
                s = self.settings
                self._data = ValidationData(
                    s.tokens, s.frames, s.actions, s.train_sequences, s.val_sequences, s.decode
                )
            path = Path(checkpoint)
            stamp = path.stat().st_mtime_ns if path.is_file() else -1
            cached = self._worlds.get(checkpoint)
            if cached is not None and cached[0] == stamp:
                self._worlds.move_to_end(checkpoint)
                return cached[1]
            world = load_world(checkpoint, self._data, self.settings.device)
            self._worlds[checkpoint] = (stamp, world)
            while len(self._worlds) > MAX_WORLDS:
                self._worlds.popitem(last=False)
            log.info(
                "loaded %s (%d parameters)", checkpoint, sum(p.numel() for p in world.model.parameters())
            )
            return world


class Playground:
    """The server's state and the API's operations, independent of HTTP."""

    def __init__(self, settings: PlaySettings, load: Callable[[str], World] | None = None) -> None:
        self.settings = settings
        self.load = load or WorldLoader(settings)
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self._lock = threading.Lock()

    def config(self) -> dict[str, Any]:
        """The restart form's defaults: needs neither the stores nor the checkpoint, so it never fails."""
        s = self.settings
        first = s.train_sequences
        return {
            "checkpoint": s.checkpoint,
            "sequence": first if s.sequence is None else s.sequence,
            "sequences": [first, first + s.val_sequences - 1],
            "seed": s.seed,
            "steps": s.sampler.steps,
            "temperature": s.sampler.temperature,
            "guidance": s.sampler.guidance,
        }

    def session(self, session_id: str) -> Session:
        with self._lock:
            if session_id not in self._sessions:
                raise UnknownSession(f"unknown session {session_id!r} (the server restarted?): press Restart")
            self._sessions.move_to_end(session_id)
            return self._sessions[session_id]

    def restart(self, request: RestartRequest) -> dict[str, Any]:
        """A fresh run for the tab's session (a new session when it has none): its given frames."""
        s = self.settings
        world = self.load(request.checkpoint or s.checkpoint)
        sequence = request.sequence
        if sequence is None:
            sequence = world.data.rows.start if s.sequence is None else s.sequence
        seed = s.seed if request.seed is None else request.seed
        session = Session(world, sequence, seed, s.sampler, s.keep, s.overlay)
        with self._lock:
            session_id = request.session if request.session in self._sessions else secrets.token_urlsafe(9)
            self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        log.info("session %s: sequence %d, seed %d, %s", session_id, sequence, seed, world.checkpoint)
        half = world.data.frame_size / 2  # an action is a move over half the frame
        step = world.data.typical_step if s.step_px is None else s.step_px / half
        return {"session": session_id, "step": step, **session.start_message()}

    def step(self, request: StepRequest) -> dict[str, Any]:
        session = self.session(request.session)
        with session.lock:
            message = session.step(request)
        log.debug(
            "session %s: frame %d in %.0f ms", request.session, message["frame"], message["generation_ms"]
        )
        return message

    def recording(self, session_id: str) -> tuple[Recording, bytes]:
        """The session's run: its recording and its GIF."""
        session = self.session(session_id)
        with session.lock:
            return Recording.of(session), animation_gif(session)


class PlaygroundServer(ThreadingHTTPServer):
    daemon_threads = True  # a request still running never keeps the process alive at exit

    def __init__(self, address: tuple[str, int], playground: Playground) -> None:
        super().__init__(address, Handler)
        self.playground = playground

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def static_file(name: str) -> bytes | None:
    """A file of the page shipped with the package, or None when there is no such file."""
    if "/" in name or name.startswith(".") or Path(name).suffix not in CONTENT_TYPES:
        return None
    path = resources.files("mnist_world.playground") / "static" / name
    return path.read_bytes() if path.is_file() else None


class Handler(BaseHTTPRequestHandler):
    server: PlaygroundServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page's requests reuse one connection

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        name = "index.html" if url.path == "/" else url.path.removeprefix("/static/")
        if url.path == "/api/config":
            self._answer(lambda: self.server.playground.config())
        elif url.path in ("/api/recording.gif", "/api/recording.json"):
            self._download(url.path.rsplit(".", 1)[1], query.get("session", [""])[0])
        elif url.path == "/" or url.path.startswith("/static/"):
            body = static_file(name)
            if body is None:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            else:
                self._send(HTTPStatus.OK, body, CONTENT_TYPES[Path(name).suffix])
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

    def do_POST(self) -> None:
        playground = self.server.playground
        routes = {
            "/api/restart": lambda body: playground.restart(parse_restart(body)),
            "/api/step": lambda body: playground.step(parse_step(body)),
        }
        route = routes.get(urlparse(self.path).path)
        body = self._body()
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
        elif body is not None:
            self._answer(lambda: route(body))

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True  # the unread body would be taken for the next request
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a request of {length} bytes is too large")
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "the request is not JSON")
            return None

    def _answer(self, operation: Callable[[], dict[str, Any]]) -> None:
        try:
            result = operation()
        except UnknownSession as error:
            self._error(HTTPStatus.NOT_FOUND, str(error))
        except PlaygroundError as error:
            self._error(HTTPStatus.BAD_REQUEST, str(error))
        except Exception as error:  # a bug must not take the server down: say so on the page and in the log
            log.exception("%s %s failed", self.command, self.path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {error!r}"})
        else:
            self._send_json(HTTPStatus.OK, result)

    def _download(self, kind: str, session_id: str) -> None:
        try:
            recording, gif = self.server.playground.recording(session_id)
        except PlaygroundError as error:
            self._error(HTTPStatus.NOT_FOUND, str(error))
            return
        name = f"playground_sequence{recording.sequence}_seed{recording.seed}.{kind}"
        if kind == "gif":
            body, content_type = gif, "image/gif"
        else:
            body = json.dumps(recording.to_json(), indent=1).encode()
            content_type = "application/json"
        self._send(
            HTTPStatus.OK, body, content_type, {"Content-Disposition": f'attachment; filename="{name}"'}
        )

    def _error(self, status: HTTPStatus, message: str) -> None:
        log.warning("%s %s: %s", self.command, urlparse(self.path).path, message)
        self._send_json(status, {"error": message})

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's name
        log.debug("%s - %s", self.address_string(), format % args)


def make_server(playground: Playground, host: str = "127.0.0.1", port: int = 0) -> PlaygroundServer:
    """A server bound to `host`:`port` (0: a free port), not yet serving: call `serve_forever`."""
    return PlaygroundServer((host, port), playground)
