"""The streaming server: HTTP (page, /healthz, /metrics) and one websocket per client on one port.

    browser --GET /--------------> process_request: static files from web/, /healthz, /metrics
            --websocket /ws------> StreamServer._handle -> ClientConnection.run
                                     refusal checks (origin, token, ready, --max-sessions) -> error + close
                                     StreamSession.open()  (the session's cache is reserved now)
                                     welcome; then messages: offer -> answer (generation starts), prompt...
                                     stats pushed every stats_interval
            <==WebRTC video======  PacedVideoTrack (16 FPS) <- StreamSession buffer <- DeviceWorker

The server object owns everything (sessions, the device worker, metrics): no module-level state, so tests can
run two servers in one process. `close()` (SIGINT/SIGTERM in run_server.py) tells every client, closes every
peer connection, frees every session and stops the worker.
"""

from __future__ import annotations

import asyncio
import email.utils
import gc
import hmac
import http
import json
import logging
import mimetypes
import os
import re
import secrets
import threading
import time
from collections import deque
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription as ParsedSdp
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response

from . import protocol as P
from .access import OriginPolicy, PenaltyBox, auth_throttle
from .config import ServerConfig
from .images import ImageError, ImageLimits, decode_image, fit_image, thumbnail_data_url
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, ServerMetrics
from .persist import SessionStore
from .recorder import Mp4Recorder
from .scheduler import DeviceWorker
from .session import StreamSession
from .track import PacedVideoTrack

log = logging.getLogger(__name__)

_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_OFFER_TIMEOUT = 15.0   # seconds for setRemoteDescription + ICE gathering + createAnswer
_TARPIT = 2.0           # seconds a refused flooder's reconnect waits for its 429
# Headers a request may carry once: two Origins or Authorizations make every check ambiguous (and raised
# MultipleValuesError in the check), two Hosts are request smuggling. The request is refused with 400.
_SINGLE_HEADERS = ("Host", "Origin", "Authorization", "Sec-WebSocket-Key", "Sec-WebSocket-Version")


class BudgetedConnection(ServerConnection):
    """A websocket whose control frames are charged to its client's flood budget like messages.

    websockets answers every ping with a pong by itself, below `ClientConnection`'s message loop, so a client
    pinging in a tight loop cost the event loop and its socket without ever touching the budget (a pong is as large
    as its ping: up to 125 bytes back per frame). `on_control(nbytes)` is set by the client that owns the socket."""

    on_control: Callable[[int], None] | None = None

    def process_event(self, event) -> None:
        if isinstance(event, Frame) and event.opcode in (Opcode.PING, Opcode.PONG) and self.on_control is not None:
            self.on_control(len(event.data))
        super().process_event(event)


class Refused(Exception):
    def __init__(self, code: str, message: str, close_code: int):
        super().__init__(message)
        self.code, self.message, self.close_code = code, message, close_code


async def send_refusal(ws: ServerConnection, r: Refused) -> None:
    """Tell a refused client why (one fatal error) and close with the refusal's code; it may already be gone."""
    log.info("refused %s: %s", ws.remote_address, r.message)
    try:
        await ws.send(P.render_error(r.code, r.message, fatal=True))
        await ws.close(r.close_code, r.code)
    except ConnectionClosed:
        pass


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    """Run fn(*args) on the server's loop from a worker thread (metrics live on the loop); dropped once the loop
    has closed (shutting down)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


class StreamServer:
    def __init__(self, config: ServerConfig, generator=None):
        self.config = config
        self.generator = generator
        self.ready = False
        self.clients: dict[str, ClientConnection] = {}   # sessions holding a slot
        self.stopping: set[str] = set()                    # sessions being freed (slot already released)
        self.worker: DeviceWorker | None = None
        self.metrics = ServerMetrics(sessions=lambda: len(self.clients), ready=lambda: float(self.ready),
                                     rtf=self.realtime_factor, loop_lag=self.loop_lag,
                                     pipeline=lambda: float(self.config.pipeline),
                                     batch_size=lambda: self.worker.last_batch_size if self.worker else 0,
                                     max_sessions=lambda: self.config.max_sessions or 0)
        self._ws_server = None
        self._background: set[asyncio.Task] = set()
        self._lag: deque[tuple[float, float]] = deque()
        self._closing = False
        self.port: int | None = None
        self.state = SessionStore(config.state_dir) if config.state_dir else None   # --state-dir
        self.auth_failures = auth_throttle(config.limits)   # wrong tokens per address
        self.penalty = PenaltyBox()                         # addresses closed for flooding, refused for a while
        self._origins: tuple[tuple, OriginPolicy] | None = None

    # ---- lifecycle

    async def start(self) -> None:
        """Listen, then warm the given generator up; clients are accepted once it is warm."""
        await self.listen()
        if self.generator is not None:
            await self.warm_up()

    async def listen(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()

        def on_batch(size: int, seconds: float) -> None:     # worker thread
            def observe():
                self.metrics.batch_sessions.observe(size)
                self.metrics.batch_seconds.observe(seconds)
            on_loop(loop, observe)
        self.worker = DeviceWorker(str(getattr(self.generator, "device", "device")), init=self._init_worker,
                                   max_batch=cfg.max_batch, on_batch=on_batch)
        self._ws_server = await serve(
            self._handle, cfg.host, cfg.port, process_request=self._http,
            max_size=cfg.limits.hard_max_message_bytes, ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout, close_timeout=2.0, server_header="packforcing-live",
            create_connection=BudgetedConnection)
        self.port = self._ws_server.sockets[0].getsockname()[1]
        for coro in (self._watch_loop(), self._sweep()):
            self._spawn(coro)
        log.info("listening on %s", self.url)

    def _threads(self) -> tuple[int, int]:
        """torch CPU threads of (the device worker, the engine's finish worker): --threads, split between the two
        when the pipeline runs them at once (packcache.threads.pipeline_threads)."""
        from packcache.threads import pipeline_threads
        return pipeline_threads(self.config.worker_threads(), self.config.pipeline)

    def _init_worker(self) -> None:
        """On the device worker thread: torch's CPU thread count (OpenMP: this thread's own setting)."""
        n, finish = self._threads()
        if n:
            import torch
            torch.set_num_threads(n)
            log.info("device worker: %d torch CPU thread(s); decode pipeline %s (%d thread(s))", n,
                     "on" if self.config.pipeline else "off", finish)

    async def load(self, factory: Callable[[], Any]) -> None:
        """Build the generator on the device worker (factory() -> Generator), then warm it up."""
        self.generator = await self.worker.run("server", factory, urgent=True)
        await self.warm_up()

    async def warm_up(self) -> float:
        gen, finish_threads = self.generator, self._threads()[1]
        loop = asyncio.get_running_loop()
        finisher = getattr(gen, "finisher", None)

        def warm() -> float:
            if finisher is not None:
                finisher.set_threads(finish_threads)
            seconds = gen.warmup()
            if finisher is not None:                          # the sessions' finishes, not the warm-up's
                finisher.on_finish = lambda s: on_loop(loop, self.metrics.finish_seconds.observe, s)
            return seconds
        seconds = await self.worker.run("server", warm, urgent=True)
        if self.config.max_sessions is None:
            await self._size_admission()
        if self.state is not None:           # sessions saved by the last shutdown wait for their clients
            await self.state.restore_all(self)
        # Everything alive now (the model, torch, aiortc, their modules) lives as long as the process. Frozen, a
        # full garbage collection skips it: in the test process (~500k objects, loaded machine) full collections
        # stalled the event loop 1-1.7 s each (every viewer froze); frozen, under 0.1 s. A client flooding
        # allocations could otherwise trigger them at will.
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info("model %s warm (%.2f s); ready", self.generator.preset.name, seconds)
        return seconds

    async def _size_admission(self) -> None:
        """--max-sessions auto: as many sessions as the free device memory holds, from one session's measured
        cache and activations (packcache.batch.max_sessions_for_memory)."""
        from packcache.batch import max_sessions_for_memory

        gen, cache = self.generator, self.config.cache
        n, fp, free = await self.worker.run("server", lambda: max_sessions_for_memory(gen, cache), urgent=True)
        self.config.max_sessions = n
        mib = 1 << 20
        log.info("max sessions auto: %d (one session: %.1f MiB = cache %.1f MiB + activations %.1f MiB %s; "
                 "%.0f MiB free on %s, 10%% kept in reserve)", n, fp.total / mib, fp.cache_bytes / mib,
                 fp.activation_bytes / mib, "measured" if fp.measured else "estimated", free / mib, gen.device)

    async def close(self) -> None:
        """Tell every client, close peer connections and sessions, stop the worker. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self.ready = False
        saved = await self.state.park_all(self) if self.state is not None else set()
        for client in list(self.clients.values()):
            await client.send_error("shutting_down", "the server is restarting; your session is saved: resume it "
                                    "(same session and key) once the server is back" if client.sid in saved
                                    else "the server is shutting down", fatal=True)
        if self._ws_server is not None:
            self._ws_server.close(code=P.CLOSE_GOING_AWAY, reason="server shutting down")
            await self._ws_server.wait_closed()      # every handler has returned: sessions are freed
        for client in list(self.clients.values()):  # detached ones (waiting for a resume) have no handler
            await client.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*list(self._background), return_exceptions=True)
        if self.worker is not None:
            await asyncio.to_thread(self.worker.close)
        log.info("server closed")

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)
        return f"http://{host}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "ws"

    # ---- numbers

    def live_sessions(self) -> int:
        """Sessions not yet fully freed (holding a slot or still releasing memory/recordings)."""
        return len(self.clients) + len(self.stopping)

    def realtime_factor(self) -> float:
        frames = seconds = 0.0
        for c in self.clients.values():
            if c.session is not None:
                n, s = c.session.compute_window()
                frames, seconds = frames + n, seconds + s
        fps = self.generator.preset.fps if self.generator is not None else 16
        return frames / fps / seconds if seconds > 0 else 0.0

    def loop_lag(self, window: float = 10.0) -> float:
        """Worst event loop lateness (seconds) seen in the last `window` seconds."""
        t = time.monotonic() - window
        return max((late for at, late in self._lag if at >= t), default=0.0)

    async def _watch_loop(self, interval: float = 0.02) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(interval)
            now = loop.time()
            self._lag.append((time.monotonic(), max(0.0, now - t - interval)))
            while self._lag and self._lag[0][0] < time.monotonic() - 60.0:
                self._lag.popleft()

    async def _sweep(self) -> None:
        """Janus-style sweeper: end sessions without connected video for limits.idle_timeout (messages do not count:
        four control-only clients pinging forever would otherwise hold every slot)."""
        while True:
            await asyncio.sleep(1.0)
            self._sweep_once(time.monotonic())   # a function of its own: the loop keeps no client alive

    def _sweep_once(self, now: float) -> None:
        limit = self.config.limits.idle_timeout
        for client in list(self.clients.values()):
            if client.detached_at is not None:
                continue                         # waiting for a resume: _expire ends it
            if client.connect_overdue(now) and not client.failing:
                wait = self.config.limits.connect_timeout
                self._spawn(client.fail("connection_failed", f"the WebRTC connection did not connect within "
                                        f"{wait:g} s (state {client.pc.connectionState}: ICE or DTLS failed)",
                                        P.CLOSE_NORMAL))
            elif client.media_connected():
                client.last_activity = now
            elif now - client.last_activity > limit and not client.failing:
                self._spawn(client.fail("idle_timeout", f"no connected video for {limit:g} s; a session slot is "
                                        "for watching (send an offer)", P.CLOSE_NORMAL))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---- HTTP

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path == "/ws":
            wait = self.penalty.remaining(_address(connection), time.monotonic())
            if wait > 0:
                # a flooder reconnecting: refused before the upgrade, and slowly (a tarpit: an attacker's
                # reconnect loop costs the event loop one HTTP parse per _TARPIT seconds, not hundreds a second)
                self.metrics.rejected.inc(reason="flood")
                await asyncio.sleep(min(wait, _TARPIT))
                return _response(429, f"this address flooded the server; try again in {wait:.0f} s\n".encode(),
                                 "text/plain; charset=utf-8")
        try:
            return self._route(connection, request)
        except Exception as exc:  # noqa: BLE001 - one log line and a clean 500, never a traceback per request
            log.warning("request %s failed: %s: %s", request.path[:100], type(exc).__name__, exc)
            return _response(500, b"internal error\n", "text/plain; charset=utf-8")

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        for name in _SINGLE_HEADERS:               # two of these is an attack or a broken proxy: refuse both
            if len(request.headers.get_all(name)) > 1:
                return _response(400, f"duplicate {name} header\n".encode(), "text/plain; charset=utf-8")
        path = urlsplit(request.path).path
        if path == "/ws":
            return None                              # websocket handshake goes on
        if path == "/healthz":
            body = {"status": "ready" if self.ready else "starting", "sessions": len(self.clients),
                    "max_sessions": self.config.max_sessions,
                    "preset": self.generator.preset.name if self.ready else None, "pipeline": self.config.pipeline}
            if self.ready and hasattr(self.generator, "runtime_info"):   # attention backend, compiled, decoder
                body["runtime"] = self.generator.runtime_info()
            return _response(200 if self.ready else 503, json.dumps(body).encode(), "application/json")
        if path == "/metrics":
            if self.config.metrics_need_token and self.config.token is not None:
                try:
                    self._check_token(request, _address(connection))
                except Refused as r:
                    return _response(401, f"{r.message}\n".encode(), "text/plain; charset=utf-8")
            return _response(200, self.metrics.render().encode(), METRICS_CONTENT_TYPE)
        name = "index.html" if path == "/" else path.lstrip("/")
        file = os.path.join(self.config.web_dir, name)
        if _STATIC_NAME.match(name) and os.path.isfile(file):
            with open(file, "rb") as f:
                body = f.read()
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            return _response(200, body, ctype)
        return _response(404, b"not found\n", "text/plain; charset=utf-8")

    # ---- websocket

    def origin_policy(self) -> OriginPolicy:
        """The Origin rule for the addresses this server listens on (streamer/access.py says which pass)."""
        key = (self.config.allowed_origins, self.port)
        if self._origins is None or self._origins[0] != key:
            listening = [s.getsockname()[:2] for s in self._ws_server.sockets] if self._ws_server else []
            self._origins = (key, OriginPolicy(self.config.allowed_origins, listening))
        return self._origins[1]

    def _check_access(self, request: Request, address: str = "") -> None:
        """Flood penalty, Origin and token: who may connect at all."""
        now = time.monotonic()
        wait = self.penalty.remaining(address, now)
        if wait > 0:
            raise Refused("rate_limited", f"this address flooded the server; try again in {wait:.0f} s",
                          P.CLOSE_TRY_AGAIN_LATER)
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_policy().allows(origin):
            raise Refused("forbidden_origin", f"origin {origin[:100]!r} is not allowed on this server (it "
                          f"listens on {self.url}; start it with --allowed-origin for others)", P.CLOSE_POLICY)
        if self.config.token is not None:
            self._check_token(request, address)

    def _check_token(self, request: Request, address: str) -> None:
        """The token (?token= or Authorization: Bearer), compared in constant time; wrong ones throttled per address."""
        now = time.monotonic()
        if self.auth_failures.blocked(address, now):
            raise Refused("unauthorized", "too many wrong tokens from this address; try again in "
                          f"{self.auth_failures.retry_after(address, now):.0f} s", P.CLOSE_POLICY)
        given = _query(request).get("token")
        auth = request.headers.get("Authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                    self.config.token.encode()):
            if given is not None:
                self.auth_failures.failed(address, now)
            raise Refused("unauthorized", "this server needs a token (?token=... or Authorization: Bearer)"
                          if given is None else "wrong token", P.CLOSE_POLICY)

    def _check_capacity(self) -> None:
        """Ready and a free slot: whether a new session can start now."""
        if self._closing:
            raise Refused("shutting_down", "the server is shutting down", P.CLOSE_TRY_AGAIN_LATER)
        if not self.ready:
            raise Refused("starting", "the model is still loading; try again in a moment", P.CLOSE_TRY_AGAIN_LATER)
        if len(self.clients) >= self.config.max_sessions:
            raise Refused("busy", f"the server is full ({self.config.max_sessions} sessions); try again later",
                          P.CLOSE_TRY_AGAIN_LATER)

    def _resumable(self, request: Request) -> "ClientConnection | None":
        """The detached session that ?resume=<session>&key=<resume_key> names, if it is still waiting."""
        q = _query(request)
        client = self.clients.get(q.get("resume", ""))
        if (client is None or client.resume_key is None or client.detached_at is None
                or not hmac.compare_digest(q.get("key", "").encode(), client.resume_key.encode())):
            return None
        return client

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            self._check_access(ws.request, _address(ws))
            client = self._resumable(ws.request)
            if client is None or self._closing:
                self._check_capacity()
        except Refused as r:
            self.metrics.rejected.inc(reason=r.code)
            self.metrics.errors.inc(code=r.code)
            await send_refusal(ws, r)
            return
        if client is not None:
            await client.reattach(ws)
            return
        sid = secrets.token_hex(6)
        client = ClientConnection(self, sid)
        self.clients[sid] = client                    # the slot is taken before the first await
        await client.run(ws)


class ClientConnection:
    """One websocket client: its generation session, its peer connection, its recording."""

    def __init__(self, server: StreamServer, sid: str):
        self.server, self.sid = server, sid
        cfg = server.config
        self.ws: ServerConnection | None = None
        self.session: StreamSession | None = None
        self.pc: RTCPeerConnection | None = None
        self.track: PacedVideoTrack | None = None
        self.recorder: Mp4Recorder | None = None
        self.gate = P.MessageGate(cfg.limits, time.monotonic())
        self.flood = P.FloodBudget(cfg.limits, time.monotonic())
        self.last_activity = time.monotonic()
        self.failing = False                   # a fatal error is on its way: no reconnect grace
        self.answered_at: float | None = None  # when the current peer connection was answered, until it connects
        self.resume_key = secrets.token_urlsafe(16) if cfg.reconnect_grace > 0 else None
        self.detached_at: float | None = None  # websocket lost, waiting reconnect_grace seconds for a resume
        self._expiry: asyncio.Task | None = None
        self._track_totals = (0, 0, 0)          # sent, repeated, skipped frames of closed tracks
        self._stopped = False
        self._flood_closing = False             # a control-frame flood's close is scheduled

    @property
    def preset(self):
        return self.server.generator.preset

    def media_connected(self) -> bool:
        return self.pc is not None and self.pc.connectionState == "connected"

    # ---- lifecycle

    def new_stream_session(self) -> StreamSession:
        """This client's stream with the server's defaults, its chunks counted in /metrics and a generation error
        ending only this client (a new session, or one restored from a snapshot)."""
        server, cfg, metrics = self.server, self.server.config, self.server.metrics

        def on_chunk(frames: int, seconds: float, latency: float) -> None:
            metrics.chunks.inc()
            metrics.frames_generated.inc(frames)
            metrics.chunk_seconds.observe(latency)

        def on_error(exc: BaseException) -> None:
            server._spawn(self.fail("internal", f"generation failed: {exc}", P.CLOSE_INTERNAL))

        return StreamSession(self.sid, server.generator, server.worker, prompt=cfg.default_prompt,
                             seed=cfg.default_seed, cache=cfg.cache, chunks_ahead=cfg.chunks_ahead,
                             fps=server.generator.preset.fps, pipeline=cfg.pipeline, on_chunk=on_chunk,
                             on_error=on_error)

    async def run(self, ws: ServerConnection) -> None:
        """The first websocket: open the session, then serve messages until the websocket closes."""
        server, cfg, metrics = self.server, self.server.config, self.server.metrics
        self._attach(ws)
        self.session = self.new_stream_session()
        try:
            try:
                await self.session.open()
            except Exception as exc:  # noqa: BLE001
                log.exception("session %s: open failed", self.sid)
                await self.fail("internal", f"could not open a generation session: {exc}", P.CLOSE_INTERNAL)
                return
            metrics.sessions_total.inc()
            log.info("session %s opened for %s (%d live)", self.sid, ws.remote_address, len(server.clients))
            if cfg.record_all:
                self._start_recording()
            await self._serve(resumed=False)
        except ConnectionClosed:
            pass
        finally:
            await self._disconnected(ws)

    async def reattach(self, ws: ServerConnection) -> None:
        """A resumed websocket (?resume=&key=): same session, cache and position; the client offers again."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._attach(ws)
        self.detached_at, self.last_activity = None, time.monotonic()
        log.info("session %s resumed by %s", self.sid, ws.remote_address)
        if self.server.state is not None:      # restored from the state dir: the file has served its purpose
            self.server.state.discard(self.sid)
        try:
            await self._serve(resumed=True)
        except ConnectionClosed:
            pass
        finally:
            await self._disconnected(ws)

    async def _serve(self, resumed: bool) -> None:
        cfg, preset, s = self.server.config, self.preset, self.session
        await self.send(P.render_welcome(
            self.sid, fps=preset.fps, width=preset.width, height=preset.height, preset=preset.name,
            limits=cfg.limits, prompt=s.requested_prompt, chunks_ahead=cfg.chunks_ahead,
            recording=cfg.record_dir is not None, resume_key=self.resume_key, resumed=resumed,
            paused=s.paused, chunk_index=s.chunk_index))
        stats_task = asyncio.create_task(self._push_stats())
        try:
            async for raw in self.ws:
                await self._on_message(raw)
                await asyncio.sleep(0)     # yield per message: queued messages never run back to back unbounded
        finally:
            stats_task.cancel()

    async def _disconnected(self, ws: ServerConnection) -> None:
        """The websocket is gone. End the session, or, with --reconnect-grace, keep it for a resume unless the
        client said goodbye (close code 1000) or the server ended it."""
        if ws is not self.ws or self._stopped:
            return
        rcvd = ws.protocol.close_rcvd          # the close frame the client sent, if any
        goodbye = rcvd is not None and rcvd.code == P.CLOSE_NORMAL
        grace = self.server.config.reconnect_grace
        if grace > 0 and not goodbye and not self.failing and not self.server._closing and self.session.error is None:
            await self._close_pc()
            self.detached_at = time.monotonic()
            self._expiry = self.server._spawn(self._expire(grace))
            log.info("session %s detached; kept %g s for a resume", self.sid, grace)
            return
        await self.stop()
        log.info("session %s closed (%d live)", self.sid, len(self.server.clients))

    async def _expire(self, grace: float) -> None:
        await asyncio.sleep(grace)
        if self.detached_at is not None:
            log.info("session %s: no resume within %g s; ending it", self.sid, grace)
            await self.stop()

    async def stop(self) -> None:
        """Free everything: track, peer connection, session (its cache), recording. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        # The slot is free at once: the session's close job is queued on the device worker before any later
        # client's open, so its memory is released before a new session allocates (the worker is sequential).
        self.server.clients.pop(self.sid, None)
        self.server.stopping.add(self.sid)
        try:
            await self._close_pc()
            leftover = await self.session.close() if self.session is not None else []
            if self.recorder is not None:
                await self.recorder.write_all(leftover)   # generated but never played: keep it in the file
                await self._stop_recording()
        finally:
            self.server.stopping.discard(self.sid)

    async def fail(self, code: str, message: str, close_code: int) -> None:
        """Send a fatal error and close the websocket (run() then frees the session)."""
        self.failing = True
        if self.detached_at is not None:
            await self.stop()
            return
        await self.send_error(code, message, fatal=True)
        try:
            await self.ws.close(close_code, code)
        except ConnectionClosed:
            pass

    # ---- sending

    async def send(self, text: str) -> None:
        if self.ws is None:
            return
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            pass

    async def send_error(self, code: str, message: str, id: P.MessageId = None, fatal: bool = False) -> None:
        self.server.metrics.errors.inc(code=code)
        if not fatal and self.ws is not None and self.ws.transport.get_write_buffer_size() > 0:
            # the socket is full: the client does not read its answers (a flooder). Waiting here would stop us
            # reading its messages, so its flood budget would never run out; the answer is dropped instead.
            return
        await self.send(P.render_error(code, message, id, fatal))

    async def _push_stats(self) -> None:
        interval = self.server.config.stats_interval
        while True:
            await asyncio.sleep(interval)
            await self.send(P.render_stats(self.stats()))

    def stats(self) -> dict[str, Any]:
        s = self.session.stats()
        track = self.track
        sent, repeated, skipped = self._track_totals
        if track is not None:
            sent, repeated, skipped = sent + track.sent, repeated + track.repeated, skipped + track.skipped
        s.update({
            "t": time.time(),
            "fps_sent": track.fps_sent() if track else 0.0,
            "frames_sent": sent,                   # over the session's life, across peer connections
            "repeated_frames": repeated,
            "skipped_frames": skipped,
            "media": self.pc.connectionState if self.pc is not None else "none",
            "recording": ({"file": os.path.basename(self.recorder.path), "frames": self.recorder.frames}
                          if self.recorder is not None else None),
            "sessions": len(self.server.clients),
        })
        return s

    # ---- messages

    async def _on_message(self, raw: str | bytes) -> None:
        now = time.monotonic()
        if not self.flood.charge(len(raw), now):       # before any parsing or answering: bounded cost per client
            await self._flooded(now)
            return
        msg = None
        try:
            msg = P.parse_client_message(raw, self.server.config.limits)
            self.gate.check(msg, now)
            await self._dispatch(msg)
        except P.ProtocolError as e:
            await self.send_error(e.code, e.message, e.id)
        except ValueError as e:          # the engine's PromptError is a ValueError
            await self.send_error("bad_value", str(e), getattr(msg, "id", None))
        except ConnectionClosed:
            raise
        except Exception as e:  # noqa: BLE001 - the session lives on
            log.exception("session %s: handling %s failed", self.sid, type(msg).__name__)
            await self.send_error("internal", f"{type(e).__name__}: {e}", getattr(msg, "id", None))

    def _attach(self, ws: ServerConnection) -> None:
        self.ws = ws
        if isinstance(ws, BudgetedConnection):
            ws.on_control = self._on_control_frame

    def _on_control_frame(self, nbytes: int) -> None:
        """A ping or pong from the client (called inside websockets' frame parsing): charged as a message."""
        now = time.monotonic()
        if not self.flood.charge(nbytes, now) and not self._flood_closing:
            self._flood_closing = True                 # one close, however many frames the same read held
            self.server._spawn(self._flooded(now))

    async def _flooded(self, now: float) -> None:
        if self.failing:
            return
        cfg = self.server.config
        lim, address = cfg.limits, _address(self.ws)
        refused = not cfg.behind_front_door            # (behind one, the address is the front door's)
        if refused:
            self.server.penalty.add(address, now + lim.flood_cooldown)
        log.warning("session %s: %s flooded (over %g messages/s or %d bytes/s); closed%s", self.sid, address,
                    lim.flood_rate, lim.flood_bytes_rate,
                    f", address refused for {lim.flood_cooldown:g} s" if refused else " (the front door refuses it)")
        self.server.metrics.rejected.inc(reason="flood")
        if self.ws.transport.get_write_buffer_size() > 0:
            # it does not read (the socket is full): no error or close frame would arrive, and writing one could
            # wait forever. Drop the connection now (its handler then frees the session as for any disconnect).
            self.failing = True
            self.ws.transport.abort()
            return
        self.ws.close_timeout = 0.2                   # no long closing handshake for a flooder...
        # ...and none at all if writing the close frame itself waits on a full socket
        asyncio.get_running_loop().call_later(0.5, self.ws.transport.abort)
        await self.fail("rate_limited", lim.flood_refusal(), P.CLOSE_POLICY)

    async def _dispatch(self, msg: P.ClientMessage) -> None:
        s = self.session
        if isinstance(msg, P.Offer):
            try:
                sdp = await asyncio.wait_for(self._negotiate(msg), _OFFER_TIMEOUT)
            except asyncio.TimeoutError:
                raise P.ProtocolError("bad_sdp", f"negotiation took over {_OFFER_TIMEOUT:g} s", msg.id) from None
            await self.send(P.render_answer(sdp, msg.id))
        elif isinstance(msg, P.Prompt):
            effective = s.set_prompt(msg.text, msg.transition, msg.blend_chunks)
            await self.send(P.render_ack("prompt", msg.id, effective_chunk=effective, text=msg.text,
                                         transition=msg.transition))
        elif isinstance(msg, P.ImageCue):
            await self._image(msg)
        elif isinstance(msg, P.Pause):
            s.pause()
            await self.send(P.render_ack("pause", msg.id, chunk_index=s.chunk_index))
        elif isinstance(msg, P.Resume):
            s.resume()
            await self.send(P.render_ack("resume", msg.id, chunk_index=s.chunk_index))
        elif isinstance(msg, P.Reset):
            s.reset(msg.seed)
            await self.send(P.render_ack("reset", msg.id, effective_chunk=0, seed=msg.seed))
        elif isinstance(msg, P.Record):
            await self._record(msg)
        elif isinstance(msg, P.Ping):
            await self.send(P.render_pong(msg.id, time.time()))

    async def _image(self, msg: P.ImageCue) -> None:
        """Decode, check and fit the picture on a worker thread (streamer/images.py), then queue it with the engine:
        the start before the first chunk, a cut to it after. The ack carries a thumbnail of the fitted picture."""
        lim, preset = self.server.config.limits, self.preset
        limits = ImageLimits(lim.max_image_bytes, lim.max_image_pixels, lim.max_image_aspect)

        def prepare():
            rgb = decode_image(msg.data, limits)
            fitted = fit_image(rgb, preset.width, preset.height)
            return rgb.shape, fitted, thumbnail_data_url(fitted)

        try:
            shape, fitted, thumb = await asyncio.to_thread(prepare)
        except ImageError as e:
            raise P.ProtocolError("too_large" if e.too_large else "bad_image", str(e), msg.id) from None
        effective = self.session.set_image(fitted, msg.text, msg.transition, msg.blend_chunks, msg.restart)
        await self.send(P.render_ack("image", msg.id, effective_chunk=effective, start=effective == 0,
                                     text=msg.text, transition=msg.transition, width=int(shape[1]),
                                     height=int(shape[0]), restart=msg.restart, thumbnail=thumb))

    async def _negotiate(self, offer: P.Offer) -> str:
        """Answer an offer with a new peer connection carrying this session's track.

        A second offer (the client re-negotiating) replaces the old peer connection once the new one is
        answered; a bad offer leaves the running one untouched."""
        problem = offer_problem(offer.sdp)
        if problem is not None:                      # refused before anything replaces the running video
            raise P.ProtocolError("bad_sdp", problem, offer.id)
        pc = RTCPeerConnection()
        track = PacedVideoTrack(self.session, fps=self.preset.fps, on_frame=self._on_frame)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
            pc.addTrack(track)
            await pc.setLocalDescription(await pc.createAnswer())
            sdp = pc.localDescription.sdp
        except BaseException as exc:   # aiortc raises IndexError, AttributeError, AssertionError... on bad SDP
            track.stop()
            await pc.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise P.ProtocolError("bad_sdp", f"could not negotiate the offer: {type(exc).__name__}: {exc}",
                                  offer.id) from None
        await self._close_pc()
        self.pc, self.track = pc, track
        self.session.start()                       # generation begins with the first negotiated video

        @pc.on("connectionstatechange")
        async def on_state():
            log.info("session %s: media %s", self.sid, pc.connectionState)
            if pc is self.pc and pc.connectionState == "failed" and not self.failing:
                await self.fail("connection_failed", "the WebRTC connection failed (ICE or DTLS)", P.CLOSE_NORMAL)

        self.answered_at = time.monotonic()        # the sweeper gives it limits.connect_timeout to connect
        return sdp

    def connect_overdue(self, now: float) -> bool:
        """An answered peer connection that has not connected within limits.connect_timeout (ICE/DTLS failed)."""
        if self.answered_at is None or self.pc is None:
            return False
        if self.pc.connectionState == "connected":
            self.answered_at = None                 # connected once: losing it later is idle_timeout's business
            return False
        return now - self.answered_at > self.server.config.limits.connect_timeout

    async def _close_pc(self) -> None:
        pc, track = self.pc, self.track
        self.pc = self.track = None
        self.answered_at = None
        if track is not None:
            track.stop()
            a, b, c = self._track_totals
            self._track_totals = (a + track.sent, b + track.repeated, c + track.skipped)
        if pc is not None:
            await pc.close()

    def _on_frame(self, frame, fresh: bool) -> None:
        m = self.server.metrics
        m.frames_sent.inc()
        if not fresh:
            m.frames_repeated.inc()
        elif self.recorder is not None:
            self.recorder.write(frame)

    # ---- recording

    async def _record(self, msg: P.Record) -> None:
        if msg.action == "start":
            if self.server.config.record_dir is None:
                raise P.ProtocolError("bad_value", "recording is disabled on this server (see --record-dir)", msg.id)
            if self.recorder is None:
                self._start_recording()
            await self.send(P.render_ack("record", msg.id, action="start", recording=True,
                                         file=os.path.basename(self.recorder.path)))
        else:
            file, frames = await self._stop_recording()
            ack = {"file": file, "frames": frames}
            if file is None:
                ack["note"] = "no frame was recorded (stopped before the first frame played); no file was kept"
            await self.send(P.render_ack("record", msg.id, action="stop", recording=False, **ack))

    def _start_recording(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = os.path.join(self.server.config.record_dir, f"{stamp}-{self.sid}.mp4")
        n = 1
        while os.path.exists(path):
            n += 1
            path = os.path.join(self.server.config.record_dir, f"{stamp}-{self.sid}-{n}.mp4")
        rec = Mp4Recorder(path, self.preset.fps, self.preset.width, self.preset.height)
        rec.start()
        self.recorder = rec
        log.info("session %s: recording to %s", self.sid, path)

    async def _stop_recording(self) -> tuple[str | None, int]:
        rec, self.recorder = self.recorder, None
        if rec is None:
            return None, 0
        frames = await rec.close()
        if frames == 0:                             # nothing to play: no empty file left behind
            try:
                os.remove(rec.path)
            except OSError:
                pass
            log.info("session %s: recording %s stopped before its first frame; removed", self.sid, rec.path)
            return None, 0
        log.info("session %s: recording %s closed (%d frames)", self.sid, rec.path, frames)
        return os.path.basename(rec.path), frames


def _query(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(request.path).query).items()}


def _address(ws: ServerConnection) -> str:
    """The peer's IP (what the per-address throttles key on)."""
    addr = ws.remote_address
    return str(addr[0]) if isinstance(addr, (tuple, list)) and addr else str(addr)


def offer_problem(sdp: str) -> str | None:
    """Why an offer cannot carry our video (None when it can): checked before it replaces a running connection."""
    try:
        parsed = ParsedSdp.parse(sdp)
    except Exception as exc:  # noqa: BLE001 - aiortc's parser raises ValueError, IndexError, KeyError...
        return f"the SDP does not parse ({type(exc).__name__})"
    video = [m for m in parsed.media if m.kind == "video" and m.port != 0]
    if not video:
        return "the offer has no (enabled) video section"
    m = video[0]
    if (m.direction or "sendrecv") not in ("recvonly", "sendrecv"):
        return f"the offer's video is {m.direction}: the client would not receive it (use recvonly)"
    if m.dtls is None or not m.dtls.fingerprints:
        return "the offer has no DTLS fingerprint (WebRTC media must be encrypted)"
    if m.ice is None or not m.ice.usernameFragment or not m.ice.password:
        return "the offer has no ICE credentials (a=ice-ufrag / a=ice-pwd)"
    names = {c.mimeType.lower() for c in m.rtp.codecs}
    if not names & {"video/vp8", "video/h264"}:
        return "the offer's video codecs include neither VP8 nor H264"
    return None


def _response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(body))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
    ])
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


class BackgroundServer:
    """A StreamServer on an event loop thread of its own: for tests, notebooks and benchmarks.

        with BackgroundServer(ServerConfig(port=0), generator) as bg:
            print(bg.server.url)
    """

    def __init__(self, config: ServerConfig, generator):
        self.server = StreamServer(config, generator)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stream-server", daemon=True)

    def start(self, timeout: float = 120.0) -> "BackgroundServer":
        self._thread.start()
        self.call(self.server.start(), timeout)
        return self

    def call(self, coro, timeout: float | None = 60.0):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.close(), 60.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10.0)
            self.loop.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
