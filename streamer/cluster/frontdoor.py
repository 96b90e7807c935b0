"""FrontDoor: one public address for a cluster of StreamWorkers (Ray actors).

    browser --GET / ------------------> FrontDoor: the viewer (static files), /healthz and /metrics over all workers
            --websocket /ws ----------> admission: the worker with the most free slots (placement.pick)
                                        Relay: messages both ways, verbatim, to that worker's own /ws
            <==WebRTC video (UDP)=====  straight from the worker's aiortc (its node's address), not via the door

Why media does not pass through here: relaying WebRTC means decrypting and re-encrypting every packet (or
decoding and re-encoding every frame, which is what aiortc's MediaRelay does) on one machine for every stream,
which would make the front door the bottleneck the cluster exists to remove. The websocket carries only
signaling and control (a few small messages per second), so one front door serves many streams; the SDP answer
the worker writes carries the worker's own ICE candidates, so the browser connects to it directly.

A session is pinned to its worker for life: a `resume` names its session, and the front door routes it to the
worker that holds it (or, after a drain moved it, to the worker it moved to). Workers are reached with a secret
token the front door generated (clients never see it); the public token/origin checks happen here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable
from urllib.parse import urlencode

import websockets
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.http11 import Request, Response

from .. import protocol as P
from ..config import ServerConfig
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Registry
from ..server import (BackgroundServer, BudgetedConnection, Refused, StreamServer, _address, _query, _response,
                      send_refusal)
from . import exposition
from .config import ClusterConfig
from .placement import WorkerView, pick

log = logging.getLogger(__name__)

CLOSE_SERVICE_RESTART = 1012      # moved / worker lost: reconnect (with the resume key) and carry on
_LOOPBACK = ("127.", "::1", "::ffff:127.")


@dataclass
class Route:
    worker: str
    resume_key: str | None
    at: float                     # monotonic time of the welcome (or of the move)


class ClusterMetrics:
    """The front door's own numbers; /metrics adds every worker's, labelled worker="<name>"."""

    def __init__(self, door: "FrontDoor"):
        r = self.registry = Registry()
        r.gauge("cluster_workers_ready", "workers that are up, loaded and warm",
                fn=lambda: sum(v.ready for v in door.views.values()))
        r.gauge("cluster_workers_draining", "workers taking no new sessions",
                fn=lambda: sum(v.draining for v in door.views.values()))
        r.gauge("cluster_relays", "client websockets relayed to workers now", fn=lambda: len(door.relays))
        r.gauge("cluster_free_slots", "free session slots over ready, undrained workers",
                fn=lambda: sum(v.free() for v in door.views.values()))
        self.admitted = r.counter("cluster_admitted_total", "new sessions routed, by worker", ("worker",))
        self.resumed = r.counter("cluster_resumes_total", "resumes routed to the worker holding the session")
        self.rejected = r.counter("cluster_rejected_total", "connections refused at the front door, by reason",
                                  ("reason",))
        self.moved = r.counter("cluster_sessions_moved_total", "sessions moved off a draining worker, by outcome",
                               ("outcome",))
        self.lost = r.counter("cluster_sessions_lost_total", "relayed sessions whose worker died")
        self.restarts = r.counter("cluster_worker_restarts_total", "worker restarts seen (new incarnation)",
                                  ("worker",))
        self.messages = r.counter("cluster_relay_messages_total", "websocket messages relayed, by direction",
                                  ("direction",))

    def render(self) -> str:
        return self.registry.render()


class FrontDoor(StreamServer):
    """The public server of a cluster. `start()` listens, starts (or joins) Ray and spawns the workers.

    It reuses StreamServer for HTTP serving, access checks and lifecycle; sessions live on the workers."""

    def __init__(self, config: ServerConfig, cluster: ClusterConfig, factory: Callable[[], Any],
                 worker_config: ServerConfig | None = None, log_level: str = "WARNING"):
        super().__init__(config, generator=None)
        self.cluster = cluster
        self.factory = factory                    # builds the generator, on the worker
        self._secret = secrets.token_urlsafe(24)  # workers accept only the front door
        wc = worker_config or config             # moves and resumes need sessions to wait for their client a while
        self.worker_config = replace(wc, token=self._secret, allowed_origins=(), state_dir=None,
                                     reconnect_grace=wc.reconnect_grace or 30.0, behind_front_door=True)
        self.log_level = log_level
        self.views: dict[str, WorkerView] = {}
        self.routes: dict[str, Route] = {}        # session id -> the worker holding it
        self.relays: set[Relay] = set()
        self.cmetrics = ClusterMetrics(self)
        self._ray_started = False

    # ---- lifecycle

    async def start(self) -> None:
        await self.listen()
        await self.launch()

    async def launch(self) -> None:
        """Start (or join) Ray, spawn the workers and watch them; they load their models in the background."""
        await asyncio.to_thread(self._spawn_workers)
        self._spawn(self._poll())

    def _init_worker(self) -> None:
        """The front door generates nothing: its (idle) device thread needs no torch settings."""

    def _spawn_workers(self) -> None:
        import ray

        from .worker import spawn

        c = self.cluster
        if not ray.is_initialized():
            if c.ray_address:
                ray.init(address=c.ray_address, namespace=c.namespace, log_to_driver=True)
            else:
                import os
                ray.init(address="local",           # a new instance, never one found in /tmp/ray or $RAY_ADDRESS
                         num_cpus=max(os.cpu_count() or 1, int(c.workers * c.cpus_per_worker + 0.999)),
                         include_dashboard=False, namespace=c.namespace)
                self._ray_started = True
        gpus = c.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        cfg = self.worker_config
        if not gpus and cfg.cpu_threads is None:      # CPU workers share nodes: threads = the CPUs reserved
            cfg = replace(cfg, cpu_threads=max(1, int(c.cpus_per_worker)))
        for i in range(c.workers):
            name = f"w{i}"
            actor = spawn(name, cfg, self.factory, namespace=c.namespace, gpus=gpus, cpus=c.cpus_per_worker,
                          max_restarts=c.max_restarts, log_level=self.log_level)
            self.views[name] = WorkerView(name, actor)
        log.info("spawned %d worker(s) (%g GPU, %g CPU each)", c.workers, gpus, c.cpus_per_worker)

    async def wait_ready(self, workers: int | None = None, timeout: float = 600.0) -> None:
        """Until `workers` (default: all) are loaded and warm; raises if one failed to load."""
        want = len(self.views) if workers is None else workers
        end = time.monotonic() + timeout
        while sum(v.ready for v in self.views.values()) < want:
            errors = [f"{v.name}: {v.status['error']}" for v in self.views.values() if v.status and v.status["error"]]
            if errors:
                raise RuntimeError("; ".join(errors))
            if time.monotonic() > end:
                raise TimeoutError(f"{sum(v.ready for v in self.views.values())} of {want} workers ready "
                                   f"after {timeout:g} s")
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self._closing:
            return
        for relay in list(self.relays):
            await relay.say("shutting_down", "the server is shutting down")
        await super().close()                     # closes every client websocket; relays close their upstreams
        await asyncio.to_thread(self._stop_workers)

    def _stop_workers(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for v in self.views.values():
            try:
                ray.get(v.actor.shutdown.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001 - dead or stuck: killed below anyway
                log.info("worker %s did not shut down cleanly: %r", v.name, exc)
            ray.kill(v.actor, no_restart=True)
        if self._ray_started:
            ray.shutdown()
        log.info("workers stopped")

    # ---- knowing the workers

    async def _call(self, ref, timeout: float | None = None):
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout or self.cluster.call_timeout)

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.cluster.status_interval)

    async def refresh(self, views: list[WorkerView] | None = None) -> None:
        """Ask workers for their status now (all by default)."""
        await asyncio.gather(*(self._refresh_one(v) for v in (views or list(self.views.values()))))
        self.ready = any(v.ready for v in self.views.values())

    async def _refresh_one(self, v: WorkerView) -> None:
        asked = time.monotonic()
        try:
            status = await self._call(v.actor.status.remote())
        except Exception as exc:  # noqa: BLE001 - dead, restarting or not answering
            if not v.down:
                log.warning("worker %s is not answering (%s)", v.name, type(exc).__name__)
            status = None
        old = v.incarnation
        v.update(status, asked)
        if status is None:
            return
        if old is not None and status["incarnation"] != old:
            log.warning("worker %s restarted (incarnation %s -> %s)", v.name, old, status["incarnation"])
            self.cmetrics.restarts.inc(worker=v.name)
        held = set(status["sids"])
        for sid, r in list(self.routes.items()):  # sessions that ended on the worker (or died with it)
            if r.worker == v.name and sid not in held and r.at < asked:
                del self.routes[sid]

    # ---- HTTP

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            body = self.health()
            return _response(200 if body["status"] == "ready" else 503, json.dumps(body).encode(),
                             "application/json")
        if path == "/metrics":
            return _response(200, (await self.render_metrics()).encode(), METRICS_CONTENT_TYPE)
        if path.startswith("/admin/"):
            return await self._admin(connection, request, path)
        return await super()._http(connection, request)

    def health(self) -> dict:
        views = list(self.views.values())
        ready = [v for v in views if v.ready]
        return {
            "status": "ready" if ready else "starting",
            "sessions": sum(v.sessions() for v in ready),
            "max_sessions": sum(int(v.status["max_sessions"]) for v in ready if not v.draining),
            "preset": next((v.status["preset"] for v in ready), None),
            "workers": [{
                "name": v.name, "ready": v.ready, "down": v.down, "draining": v.draining,
                "sessions": v.sessions() if v.status else None, "free": v.free(),
                "max_sessions": v.status["max_sessions"] if v.status else None,
                "incarnation": v.incarnation, "node": v.status["node_ip"] if v.status else None,
                "device": v.status["device"] if v.status else None, "pid": v.status["pid"] if v.status else None,
                "error": v.status["error"] if v.status else None} for v in views],
        }

    async def render_metrics(self) -> str:
        views = [v for v in self.views.values() if not v.down]

        async def one(v):
            try:
                return v.name, await self._call(v.actor.metrics.remote())
            except Exception:  # noqa: BLE001 - a worker going away is left out of this scrape
                return v.name, None
        texts = {name: text for name, text in await asyncio.gather(*(one(v) for v in views)) if text}
        return self.cmetrics.render() + exposition.merge(texts)

    async def _admin(self, connection: ServerConnection, request: Request, path: str) -> Response:
        """GET /admin/drain?worker=w1, /admin/undrain?worker=w1: the token when the server has one, else only
        from this machine (loopback)."""
        q = _query(request)
        if self.config.token is not None:
            auth = request.headers.get("Authorization", "")
            given = q.get("token") or (auth[7:].strip() if auth.lower().startswith("bearer ") else "")
            if not hmac.compare_digest(given.encode(), self.config.token.encode()):
                return _json(403, {"error": "admin calls need the server's token"})
        elif not str((connection.remote_address or ("",))[0]).startswith(_LOOPBACK):
            return _json(403, {"error": "admin calls come from this machine only (or set --token)"})
        name = q.get("worker", "")
        if name not in self.views:
            return _json(404, {"error": f"no worker {name!r}; workers: {sorted(self.views)}"})
        if path == "/admin/drain":
            return _json(200, await self.drain(name))
        if path == "/admin/undrain":
            self.views[name].draining = False
            log.info("worker %s takes sessions again", name)
            return _json(200, {"worker": name, "draining": False})
        return _json(404, {"error": "admin calls: /admin/drain, /admin/undrain"})

    # ---- websocket: admission and relay

    def _choose(self, request: Request) -> tuple[WorkerView, bool]:
        """The worker for this websocket and whether it is a resume of a session the front door routed."""
        if self._closing:
            raise Refused("shutting_down", "the server is shutting down", P.CLOSE_TRY_AGAIN_LATER)
        route = self.routes.get(_query(request).get("resume", ""))
        if route is not None:
            v = self.views.get(route.worker)
            if v is not None and v.ready and v.draining:   # being moved right now: its new worker is not known yet
                raise Refused("moved", "this session is being moved to another worker; reconnect in a moment",
                              CLOSE_SERVICE_RESTART)
            if v is not None and v.ready:
                return v, True
        v = pick(list(self.views.values()))
        if v is not None:
            return v, False
        if not any(v.ready for v in self.views.values()):
            raise Refused("starting", "no worker is ready yet; try again in a moment", P.CLOSE_TRY_AGAIN_LATER)
        full = sum(int(v.status["max_sessions"]) for v in self.views.values() if v.ready and not v.draining)
        raise Refused("busy", f"every worker is full ({full} sessions); try again later", P.CLOSE_TRY_AGAIN_LATER)

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            self._check_access(ws.request)
            for attempt in range(2):                 # a worker that just died: once more, elsewhere
                v, resume = self._choose(ws.request)
                relay = Relay(self, ws, v, resume)
                if await relay.connect():
                    break
            else:
                raise Refused("busy", "no worker could take the session; try again later",
                              P.CLOSE_TRY_AGAIN_LATER)
        except Refused as r:
            self.cmetrics.rejected.inc(reason=r.code)
            await send_refusal(ws, r)
            return
        self.relays.add(relay)
        try:
            await relay.run()
        finally:
            self.relays.discard(relay)

    def _welcomed(self, relay: "Relay", welcome: dict) -> None:
        sid = welcome["session"]
        self.routes[sid] = Route(relay.view.name, welcome.get("resume_key"), time.monotonic())
        if relay.token is not None:
            relay.view.welcomed(relay.token)
            self.cmetrics.admitted.inc(worker=relay.view.name)
        else:
            self.cmetrics.resumed.inc()
        log.info("session %s on worker %s%s", sid, relay.view.name, " (resumed)" if welcome.get("resumed") else "")

    # ---- drain

    async def drain(self, name: str) -> dict:
        """Take no new sessions on `name` and move its sessions to other workers, all at once: each client is told
        (`moved`, close 1012) and reconnects through the front door with its resume key. Sessions that cannot be
        moved (no free slot elsewhere, or the move failed) are ended; their clients get a new session."""
        v = self.views[name]
        v.draining = True
        log.info("draining worker %s", name)
        relays = [r for r in list(self.relays) if r.view is v and r.sid is not None]

        async def one(relay: Relay) -> bool:
            if await self._move(relay.sid, v) is not None:
                await relay.leave("moved", "this worker is being drained; the session continues on another "
                                  "worker: reconnect with your resume key")
                return True
            self.routes.pop(relay.sid, None)
            await relay.leave("moved", "this worker is being drained and the session could not be moved "
                              "(no free slot elsewhere, or the move failed); reconnect for a new session")
            return False

        results = list(await asyncio.gather(*(one(r) for r in relays)))
        await self.refresh([v])
        relayed = {r.sid for r in relays}
        detached = [sid for sid in (v.status or {}).get("sids", []) if sid not in relayed]   # client away
        targets = await asyncio.gather(*(self._move(sid, v) for sid in detached))             # nobody to tell
        leftover = [sid for sid, t in zip(detached, targets) if t is None]
        if leftover:
            try:
                await self._call(v.actor.end_sessions.remote(leftover), self.cluster.move_timeout)
            except Exception as exc:  # noqa: BLE001
                log.warning("worker %s: ending its sessions failed: %r", name, exc)
        results += [t is not None for t in targets]
        for ok in results:
            self.cmetrics.moved.inc(outcome="moved" if ok else "new_session")
        report = {"worker": name, "draining": True, "moved": sum(results), "ended": len(results) - sum(results)}
        await self.refresh([v])
        log.info("worker %s drained: %d moved, %d ended", name, report["moved"], report["ended"])
        return report

    async def _move(self, sid: str, source: WorkerView) -> WorkerView | None:
        """Snapshot `sid` on `source` and adopt it on the worker with the most free slots (the snapshot travels
        through Ray's object store, worker to worker). None: not moved (no snapshots, no room, or it failed)."""
        target = pick([v for v in self.views.values() if v is not source])
        route = self.routes.get(sid)
        if target is None or route is None:
            return None
        token = target.reserve()
        try:
            payload = source.actor.export_session.remote(sid)
            index = await self._call(target.actor.adopt_session.remote(sid, route.resume_key, payload),
                                     self.cluster.move_timeout)
        except Exception as exc:  # noqa: BLE001 - the client gets a new session instead
            log.warning("moving session %s from %s to %s failed: %s", sid, source.name, target.name, exc)
            target.release(token)
            return None
        target.welcomed(token)
        self.routes[sid] = Route(target.name, route.resume_key, time.monotonic())
        log.info("session %s moved from %s to %s at chunk %d", sid, source.name, target.name, index)
        return target


class Relay:
    """One client websocket and its upstream websocket to a worker; messages pass verbatim both ways."""

    def __init__(self, door: FrontDoor, client: ServerConnection, view: WorkerView, resume: bool):
        self.door, self.client, self.view = door, client, view
        self.token = None if resume else view.reserve()   # a new session counts on the worker from now
        self.up = None
        self.sid: str | None = None
        self.leaving = False                   # the front door ended this relay on purpose (drain, flood)
        self.client_close = (P.CLOSE_NORMAL, "")   # how `run` closes the client at the end (`leave` sets its own)
        # Messages are charged by the worker (it parses them); ping/pong frames end here, so they are charged here.
        self.flood = P.FloodBudget(door.config.limits, time.monotonic())
        self._flooding = False
        if isinstance(client, BudgetedConnection):
            client.on_control = self._on_control_frame

    async def connect(self) -> bool:
        q = _query(self.client.request)
        params = {k: q[k] for k in ("resume", "key") if k in q}
        url = self.view.url + ("?" + urlencode(params) if params else "")
        cfg = self.door.config
        try:
            self.up = await websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {self.door._secret}"}, compression=None,
                max_size=2**22, open_timeout=10, ping_interval=cfg.ping_interval, ping_timeout=cfg.ping_timeout,
                close_timeout=2)
            return True
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            log.warning("worker %s unreachable at %s: %r", self.view.name, url, exc)
            self._release()
            self.view.down = True
            self.door._spawn(self.door.refresh([self.view]))
            return False

    def _release(self) -> None:
        if self.token is not None:
            self.view.release(self.token)
            self.token = None

    async def run(self) -> None:
        down = asyncio.create_task(self._down())
        upward = asyncio.create_task(self._up())
        try:
            done, _ = await asyncio.wait([down, upward], return_when=asyncio.FIRST_COMPLETED)
            ended = done.pop().result()
            if ended == "client" and not self.leaving:   # (leaving: `leave` closes the worker's side itself)
                rcvd = self.client.protocol.close_rcvd
                goodbye = rcvd is not None and rcvd.code == P.CLOSE_NORMAL
                await self.up.close(P.CLOSE_NORMAL if goodbye else P.CLOSE_GOING_AWAY, "client left")
            elif not self.leaving:
                await self._worker_closed()
        finally:
            for t in (down, upward):
                t.cancel()
            await asyncio.gather(down, upward, return_exceptions=True)
            if self.sid is None:
                self._release()               # refused or failed before its welcome
            await self.up.close()
            await self.client.close(*self.client_close)

    async def _down(self) -> str:
        """worker -> client. The first message (welcome or a refusal) is read; the rest pass unparsed."""
        count = self.door.cmetrics.messages
        try:
            async for msg in self.up:
                if self.sid is None:
                    self._first(msg)
                count.inc(direction="down")
                try:
                    await self.client.send(msg)
                except ConnectionClosed:
                    return "client"
        except ConnectionClosed:
            pass
        return "worker"

    def _first(self, msg) -> None:
        try:
            m = json.loads(msg)
        except ValueError:
            return
        if m.get("type") == "welcome":
            self.sid = m["session"]
            self.door._welcomed(self, m)
        elif m.get("type") == "error":
            self._release()

    async def _up(self) -> str:
        """client -> worker, verbatim (the worker parses, validates and rate-limits)."""
        count = self.door.cmetrics.messages
        try:
            async for msg in self.client:
                count.inc(direction="up")
                try:
                    await self.up.send(msg)
                except ConnectionClosed:
                    return "worker"
        except ConnectionClosed:
            pass
        return "client"

    async def _worker_closed(self) -> None:
        """The worker closed the websocket: pass its close on, or, if it vanished, say so."""
        rcvd = self.up.protocol.close_rcvd
        if rcvd is not None and rcvd.reason == "rate_limited":
            self._penalise()                   # the worker saw a flood: it cannot refuse the address, we can
        if rcvd is not None:                   # a close frame: the worker ended it (fatal error already relayed)
            code = rcvd.code if rcvd.code not in (1005, 1006, 1015) else P.CLOSE_NORMAL
            await self.client.close(code, rcvd.reason)
            return
        if self.door._closing:
            return
        self.door.cmetrics.lost.inc()
        self.door.routes.pop(self.sid, None)
        self.view.down = True
        self.door._spawn(self.door.refresh([self.view]))
        log.warning("worker %s lost session %s", self.view.name, self.sid)
        await self.say("worker_lost", "the worker running this session stopped; reconnect for a new session")
        await self.client.close(CLOSE_SERVICE_RESTART, "worker lost")

    async def say(self, code: str, message: str) -> None:
        try:
            await self.client.send(P.render_error(code, message, fatal=True))
        except ConnectionClosed:
            pass

    async def leave(self, code: str, message: str, close_code: int = CLOSE_SERVICE_RESTART) -> None:
        """End this relay on purpose: tell the client, close both websockets (the worker frees the session)."""
        self.leaving = True
        self.client_close = (close_code, code)   # `run` may close the client first, once the worker has gone
        await self.say(code, message)
        await self.client.close(close_code, code)  # the client first: the worker's closing handshake may be slow
        await self.up.close(P.CLOSE_NORMAL, code)

    def _penalise(self) -> None:
        """The client's address is refused for flood_cooldown (HTTP 429 before the upgrade, as on one server)."""
        lim = self.door.config.limits
        address = _address(self.client)
        self.door.penalty.add(address, time.monotonic() + lim.flood_cooldown)
        self.door.cmetrics.rejected.inc(reason="flood")
        log.warning("%s flooded session %s; closed, address refused for %g s", address, self.sid, lim.flood_cooldown)

    def _on_control_frame(self, nbytes: int) -> None:
        if not self.flood.charge(nbytes, time.monotonic()) and not self._flooding:
            self._flooding = True
            self._penalise()
            self.door._spawn(self.leave("rate_limited", self.door.config.limits.flood_refusal(), P.CLOSE_POLICY))


def _json(status: int, body: dict) -> Response:
    return _response(status, json.dumps(body).encode(), "application/json")


class BackgroundFrontDoor(BackgroundServer):
    """A FrontDoor on an event loop thread of its own (tests, benchmarks); start() returns once every worker is
    warm. stop() closes it and its workers (and Ray, if the front door started it)."""

    def __init__(self, door: FrontDoor):
        self.server = door
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="front-door", daemon=True)

    def start(self, timeout: float = 600.0) -> "BackgroundFrontDoor":
        self._thread.start()
        self.call(self._start(timeout), timeout + 10)
        return self

    async def _start(self, timeout: float) -> None:
        await self.server.start()
        await self.server.wait_ready(timeout=timeout)
