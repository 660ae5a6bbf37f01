"""The playground's local web server: the page, its static files, a live WebSocket that pushes frames as they
are dreamed, and a JSON API for scripts (its OpenAPI page at /docs).

FastAPI on uvicorn: requests and frames share one event loop, and frames are dreamed on worker threads, so a
frame being made for one tab never holds up the page, its files or another tab. The state lives in
`Playground`: the loaded models (one per checkpoint) and the sessions (one per tab, each with its own lock).
What keeps foreign pages and malformed requests out is in `guard`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mnist_world.playground.dreamer import SamplerSettings
from mnist_world.playground.guard import Limits, LocalGuard, RequestRefused, error_response, read_body
from mnist_world.playground.protocol import (
    ControlCommand,
    PlayCommand,
    RestartBody,
    RestartCommand,
    RestartRequest,
    StepBody,
    StepRequest,
    parse_command,
    read_json,
    validate,
)
from mnist_world.playground.recording import Recording, animation_gif
from mnist_world.playground.session import Session
from mnist_world.playground.world import PlaygroundError, ValidationData, World, load_world

log = logging.getLogger("mnist_world.playground")

MAX_SESSIONS = 32  # sessions held at once: beyond, the longest idle goes if idle long enough, else refused
IDLE_S = 300.0  # a session unused this long may make room for a new one
MAX_WORLDS = 4  # checkpoints kept loaded
DEFAULT_LIMITS = Limits()
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


class UnknownSession(PlaygroundError):
    """A session id the server does not hold (it restarted, or the tab was closed)."""


class TooManySessions(PlaygroundError):
    """Every session slot is taken by a session used within the idle time."""


@dataclasses.dataclass(frozen=True)
class PlaySettings:
    """What `mnist-world play` was started with: the defaults of every run."""

    checkpoint: str  # the default checkpoint
    tokens: str
    frames: str
    actions: str
    train_sequences: int
    val_sequences: int
    sampler: SamplerSettings  # the params' `sample` section (`SamplerSettings.from_config`)
    decode: str = "mean"
    sequence: int | None = None  # None: the first validation sequence
    seed: int = 0
    keep: int | None = None  # frames kept when the context slides; None: the checkpoint's past frames
    step_px: float | None = None  # one arrow-key step in pixels of a frame; None: the data's typical move
    device: str = "cpu"
    workers: int = 1  # threads dreaming the sessions' frames, their model calls batched (`CallBatcher`)
    overlay: bool = True  # mark the ego digit, tracked with the action store's tracker settings
    checkpoints: tuple[str, ...] = ()  # further checkpoints a page may choose
    models: str | None = "models"  # and every *.pt in this folder


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
            world = load_world(checkpoint, self._data, self.settings.device, self.settings.workers)
            self._worlds[checkpoint] = (stamp, world)
            while len(self._worlds) > MAX_WORLDS:
                self._worlds.popitem(last=False)
            log.info(
                "loaded %s (%d parameters)", checkpoint, sum(p.numel() for p in world.model.parameters())
            )
            return world


@dataclasses.dataclass
class Held:
    session: Session
    used: float  # time.monotonic() of its last use


class Playground:
    """The server's state and the API's operations, independent of HTTP."""

    def __init__(
        self,
        settings: PlaySettings,
        load: Callable[[str], World] | None = None,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.settings = settings
        self.load = load or WorldLoader(settings)
        self.max_sessions = max_sessions
        self._sessions: collections.OrderedDict[str, Held] = collections.OrderedDict()
        self._lock = threading.Lock()

    def checkpoints(self) -> list[str]:
        """The checkpoints a page may choose: those the server was started with, then models/*.pt. A page
        names one of these; no other path is ever opened for it."""
        s = self.settings
        found = sorted(str(path) for path in Path(s.models).glob("*.pt")) if s.models else []
        return list(dict.fromkeys([s.checkpoint, *s.checkpoints, *found]))

    def config(self) -> dict[str, Any]:
        """The restart form's defaults: needs neither the stores nor the checkpoint, so it never fails."""
        s = self.settings
        first = s.train_sequences
        return {
            "checkpoint": s.checkpoint,
            "checkpoints": self.checkpoints(),
            "sequence": first if s.sequence is None else s.sequence,
            "sequences": [first, first + s.val_sequences - 1],
            "seed": s.seed,
            "steps": s.sampler.steps,
            "temperature": s.sampler.temperature,
            "guidance": s.sampler.guidance,
            "action_guidance": s.sampler.action_guidance,
        }

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def session(self, session_id: str) -> Session:
        with self._lock:
            held = self._sessions.get(session_id)
            if held is None:
                raise UnknownSession(f"unknown session {session_id[:40]!r} (the server restarted?): restart")
            held.used = time.monotonic()
            self._sessions.move_to_end(session_id)
            return held.session

    def _make_room(self, now: float) -> None:
        """Called with the lock held when a new session needs a slot."""
        while len(self._sessions) >= self.max_sessions:
            oldest_id, oldest = next(iter(self._sessions.items()))
            if now - oldest.used < IDLE_S:
                raise TooManySessions(
                    f"{self.max_sessions} sessions are in use: close a tab, or wait for one to be idle "
                    f"{IDLE_S:.0f} s"
                )
            del self._sessions[oldest_id]
            log.info("session %s ended: idle, its slot needed", oldest_id)

    def restart(self, request: RestartRequest) -> dict[str, Any]:
        """A fresh run for the tab's session (a new session when it has none): its given frames."""
        s = self.settings
        checkpoint = request.checkpoint or s.checkpoint
        if checkpoint not in self.checkpoints():
            raise PlaygroundError(
                f"checkpoint {checkpoint[:80]!r} is not offered: choose one of the server's "
                "(its --checkpoint files and models/*.pt)"
            )
        with self._lock:
            if request.session not in self._sessions:
                self._make_room(time.monotonic())  # refuse before loading anything
        world = self.load(checkpoint)
        sequence = request.sequence
        if sequence is None:
            sequence = world.data.rows.start if s.sequence is None else s.sequence
        seed = s.seed if request.seed is None else request.seed
        session = Session(world, sequence, seed, s.sampler, s.keep, s.overlay)
        with self._lock:
            if request.session in self._sessions:
                session_id = request.session
            else:
                self._make_room(time.monotonic())
                session_id = secrets.token_urlsafe(12)
            self._sessions[session_id] = Held(session, time.monotonic())
            self._sessions.move_to_end(session_id)
        log.info("session %s: sequence %d, seed %d, %s", session_id, sequence, seed, world.checkpoint)
        half = world.data.frame_size / 2  # an action is a move over half the frame
        step = world.data.typical_step if s.step_px is None else s.step_px / half
        return {"session": session_id, "step": step, **session.start_message()}

    def step(
        self, request: StepRequest, on_iteration: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        session = self.session(request.session)
        with session.lock:
            message = session.step(request, on_iteration)
        log.debug(
            "session %s: frame %d in %.0f ms", request.session, message["frame"], message["generation_ms"]
        )
        return message

    def position(self, session_id: str) -> tuple[int, int]:
        """The session's next frame number and the true frames it has left."""
        session = self.session(session_id)
        return len(session.frames), session.truth_left

    def end(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is not None:
                log.info("session %s ended", session_id)

    def recording(self, session_id: str) -> tuple[Recording, bytes]:
        """The session's run: its recording and its GIF."""
        session = self.session(session_id)
        with session.lock:
            return Recording.of(session), animation_gif(session)


def static_file(name: str) -> bytes | None:
    """A file of the page shipped with the package, or None when there is no such file."""
    if "/" in name or "\\" in name or name.startswith(".") or Path(name).suffix not in CONTENT_TYPES:
        return None
    path = resources.files("mnist_world.playground") / "static" / name
    return path.read_bytes() if path.is_file() else None


def status_of(error: PlaygroundError) -> int:
    if isinstance(error, RequestRefused):
        return error.status
    if isinstance(error, UnknownSession):
        return 404
    if isinstance(error, TooManySessions):
        return 429
    return 400


# --- The live connection ------------------------------------------------------------------------------------


class LiveConnection:
    """One page's WebSocket: commands in (restart, controls, play, pause, step), frames out as they are
    dreamed, each unmasking iteration too when the page watches them. The session ends with the connection."""

    def __init__(self, playground: Playground, websocket: WebSocket, limits: Limits) -> None:
        self.playground, self.websocket, self.limits = playground, websocket, limits
        self.session: str | None = None
        self.controls = ControlCommand(op="controls", action=[0.0, 0.0], temperature=1.0)
        self.playing = False
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.dreaming = asyncio.Lock()  # one frame at a time per page
        self.player: asyncio.Task[None] | None = None

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_all())
        try:
            while True:
                text = await self.websocket.receive_text()
                await self._handle(text)
        except WebSocketDisconnect:
            pass
        finally:
            self.playing = False
            if self.player is not None:
                self.player.cancel()
            await self.outbox.put(None)
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await sender
            if self.session is not None:
                self.playground.end(self.session)

    async def _send_all(self) -> None:
        while (message := await self.outbox.get()) is not None:
            await self.websocket.send_text(json.dumps(message))

    def _error(self, error: PlaygroundError | str) -> None:
        log.warning("live %s: %s", self.session, error)
        self.outbox.put_nowait({"type": "error", "error": str(error)})

    async def _handle(self, text: str) -> None:
        try:
            command = parse_command(read_json(text.encode(), self.limits.max_depth))
        except PlaygroundError as error:
            self._error(error)
            return
        if isinstance(command, RestartCommand):
            playing, self.playing = self.playing, False  # a run that was playing plays on after it
            async with self.dreaming:  # after the frame in progress, never beside it
                try:
                    request = dataclasses.replace(command.request(), session=self.session)
                    start = await run_in_threadpool(self.playground.restart, request)
                except PlaygroundError as error:
                    self._error(error)
                    return
            self.session = start["session"]
            self.outbox.put_nowait({"type": "start", **start})
            self._set_playing(playing)
        elif isinstance(command, ControlCommand):
            self.controls = command
        elif isinstance(command, PlayCommand):
            self._set_playing(command.op == "play")
        elif not self.playing:  # step: one frame, while paused
            await self._dream()

    def _set_playing(self, playing: bool) -> None:
        self.playing = playing and self.session is not None
        if self.playing and (self.player is None or self.player.done()):
            self.player = asyncio.create_task(self._play())
        self._state()

    def _state(self) -> None:
        self.outbox.put_nowait({"type": "state", "playing": self.playing, "session": self.session})

    async def _play(self) -> None:
        while self.playing:
            started = time.perf_counter()
            if not await self._dream():
                self.playing = False
                self._state()
                break
            await asyncio.sleep(max(0.0, 1 / self.controls.fps - (time.perf_counter() - started)))

    async def _dream(self) -> bool:
        """One frame under the current controls, pushed with its iterations; False on an error."""
        if self.session is None:
            self._error("no run yet: restart first")
            return False
        loop = asyncio.get_running_loop()

        def pushed(message: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self.outbox.put_nowait, {"type": "iteration", **message})

        async with self.dreaming:
            c = self.controls
            try:
                frame, truth_left = self.playground.position(self.session)
                request = StepRequest(
                    self.session,
                    frame,
                    (c.action[0], c.action[1]),
                    c.temperature,
                    c.truth and truth_left > 0,  # once the true future ends, the arrows steer again
                    c.belief,
                    c.unmasking,
                )
                message = await run_in_threadpool(self.playground.step, request, pushed)
            except PlaygroundError as error:
                self._error(error)
                return False
        message.pop("unmasking", None)  # already pushed one by one
        self.outbox.put_nowait({"type": "frame", **message})
        return True


# --- The application ----------------------------------------------------------------------------------------


def create_app(playground: Playground, hosts: frozenset[str], limits: Limits = DEFAULT_LIMITS) -> Any:
    """The ASGI application: the routes behind the guard that refuses foreign hosts and origins."""
    app = FastAPI(
        title="mnist-world playground",
        summary="Steer the ego digit while a masked-token world model dreams the next frames.",
        version="1",
    )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), request)

    @app.exception_handler(RequestValidationError)
    async def query_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:])
        return error_response(400, f"'{where}' {first['msg'].lower()}", request)

    @app.exception_handler(PlaygroundError)
    async def playground_error(request: Request, error: PlaygroundError) -> JSONResponse:
        return error_response(status_of(error), str(error), request)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}: {str(error)[:200]}", request)

    def page_file(name: str) -> Response:
        body = static_file(name)
        if body is None:
            raise HTTPException(404, f"no file {name[:80]!r}")
        return Response(
            body, media_type=CONTENT_TYPES[Path(name).suffix], headers={"Cache-Control": "no-store"}
        )

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return page_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return page_file(name)

    @app.get("/api/config", summary="The restart form's defaults and the checkpoints on offer")
    async def config() -> dict[str, Any]:
        return playground.config()

    body_of = {"application/json": {"schema": RestartBody.model_json_schema()}}

    @app.post(
        "/api/restart",
        summary="Start a run (a new session unless `session` names one): its given frames",
        openapi_extra={"requestBody": {"required": True, "content": body_of}},
    )
    async def restart(request: Request) -> dict[str, Any]:
        body = validate(RestartBody, read_json(await read_body(request, limits), limits.max_depth))
        return await run_in_threadpool(playground.restart, body.request())

    step_of = {"application/json": {"schema": StepBody.model_json_schema()}}

    @app.post(
        "/api/step",
        summary="Dream the session's next frame under an action",
        openapi_extra={"requestBody": {"required": True, "content": step_of}},
    )
    async def step(request: Request) -> dict[str, Any]:
        body = validate(StepBody, read_json(await read_body(request, limits), limits.max_depth))
        return await run_in_threadpool(playground.step, body.request())

    @app.delete("/api/session/{session}", summary="End a session")
    async def end(session: str) -> dict[str, Any]:
        playground.session(session)  # 404 when unknown
        playground.end(session)
        return {"ended": session}

    @app.get("/api/recording.{kind}", summary="The session's run: its actions (json) or frames (gif)")
    async def recording(kind: str, session: str = Query(max_length=512)) -> Response:
        if kind not in ("gif", "json"):
            raise HTTPException(404, f"no recording.{kind[:20]}: gif or json")
        played, gif = await run_in_threadpool(playground.recording, session)
        name = f"playground_sequence{played.sequence}_seed{played.seed}.{kind}"
        headers = {"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"}
        if kind == "gif":
            return Response(gif, media_type="image/gif", headers=headers)
        body = json.dumps(played.to_json(), indent=1).encode()
        return Response(body, media_type="application/json", headers=headers)

    @app.websocket("/api/live")
    async def live(websocket: WebSocket) -> None:
        await websocket.accept()
        await LiveConnection(playground, websocket, limits).run()

    return LocalGuard(app, hosts)


# --- Serving ------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_names(host: str, port: int, allowed: tuple[str, ...] = ()) -> frozenset[str]:
    """The Host header values this server answers: its loopback names (when it listens on loopback or on every
    address), the address it listens on, and `allowed` (names it is reached by from elsewhere)."""
    names = {host, *allowed}
    if is_loopback(host) or host in ("0.0.0.0", "::"):
        names |= {"127.0.0.1", "localhost", "::1"}
    return frozenset(f"[{name}]:{port}" if ":" in name else f"{name}:{port}" for name in names)


class PlaygroundServer:
    """uvicorn serving the playground on a socket bound at construction (port 0: a free one), so its address
    is known before it serves; `serve_forever` blocks until `shutdown`."""

    def __init__(
        self,
        playground: Playground,
        host: str = "127.0.0.1",
        port: int = 0,
        allowed_hosts: tuple[str, ...] = (),
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family)
        self.host, self.port = host, self.socket.getsockname()[1]
        self.playground = playground
        app = create_app(playground, host_names(host, self.port, allowed_hosts), limits)
        config = uvicorn.Config(
            app,
            log_config=None,  # the playground's logging, not uvicorn's own
            access_log=False,
            lifespan="off",
            http="h11",
            ws="websockets-sansio",
            ws_max_size=limits.max_body,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=2,
        )
        self.uvicorn = uvicorn.Server(config)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True

    def server_close(self) -> None:
        self.socket.close()


def make_server(
    playground: Playground, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> PlaygroundServer:
    """A server bound to `host`:`port` (0: a free port), not yet serving: call `serve_forever`."""
    return PlaygroundServer(playground, host, port, **options)
