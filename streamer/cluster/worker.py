"""StreamWorker: the Ray actor that owns one device, its generator and its sessions.

Each worker runs an ordinary `StreamServer` (the single-machine server, unchanged) on an event loop thread of its
own, listening on its node's address. The front door relays each client's websocket to it; WebRTC media goes from
here straight to the browser. The actor's methods are how the front door sees and steers it: status, metrics,
ending sessions, moving sessions (snapshot out, adopt in).

Ray restarts the actor when its process dies (`max_restarts`): __init__ runs again, so a restarted worker listens
on a new port, loads the model again and reports a new `incarnation`; the front door notices and routes to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import replace
from typing import Any, Callable

from ..config import ServerConfig
from ..server import BackgroundServer

log = logging.getLogger(__name__)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Factory:
    """factory() on the device thread, with SystemExit (run_server's argument errors) turned into an error:
    a SystemExit escaping a coroutine would stop the worker's event loop."""

    def __init__(self, factory: Callable[[], Any]):
        self.factory = factory

    def __call__(self):
        try:
            return self.factory()
        except SystemExit as exc:
            raise RuntimeError(str(exc.code)) from None


class StreamWorker:
    """One device, one generator, one StreamServer. Created by `spawn()` as a Ray actor."""

    def __init__(self, name: str, config: ServerConfig, factory: Callable[[], Any], log_level: str = "WARNING"):
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("aioice", "aiortc", "websockets"):
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
        import ray

        self.name = name
        self.incarnation = secrets.token_hex(4)
        self.error: str | None = None
        self.node_ip = ray.util.get_node_ip_address()
        self._bg = BackgroundServer(replace(config, host=self.node_ip, port=0), None).start()
        self._load = asyncio.run_coroutine_threadsafe(self._bg.server.load(_Factory(factory)), self._bg.loop)
        self._load.add_done_callback(self._loaded)
        log.info("worker %s (%s) listening on %s; loading the model", name, self.incarnation, self.server.ws_url)

    @property
    def server(self):
        return self._bg.server

    def _loaded(self, fut) -> None:
        exc = fut.exception()
        if exc is not None:
            self.error = f"could not load the model: {exc}"
            log.error("worker %s: %s", self.name, self.error)

    # ---- what the front door asks

    def status(self) -> dict:
        return self._bg.call(self._status(), 10.0)

    async def _status(self) -> dict:
        s = self.server
        gen = s.generator
        return {
            "name": self.name, "incarnation": self.incarnation, "pid": os.getpid(), "node_ip": self.node_ip,
            "ws_url": s.ws_url, "ready": s.ready and self.error is None, "error": self.error,
            "sessions": len(s.clients), "max_sessions": s.config.max_sessions, "sids": sorted(s.clients),
            "detached": sum(1 for c in s.clients.values() if c.detached_at is not None),
            "device": str(getattr(gen, "device", "")) if gen is not None else None,
            "preset": gen.preset.name if gen is not None and s.ready else None,
        }

    def metrics(self) -> str:
        return self._bg.call(self._metrics(), 10.0)

    async def _metrics(self) -> str:
        return self.server.metrics.render()

    def end_sessions(self, sids: list[str] | None = None) -> int:
        """Free the named sessions (None: all), detached ones included. Returns how many were ended."""
        return self._bg.call(self._end(sids), 60.0)

    async def _end(self, sids) -> int:
        clients = [c for sid, c in list(self.server.clients.items()) if sids is None or sid in sids]
        for c in clients:
            if c.detached_at is None and c.ws is not None:   # connected: told, then freed when its handler ends
                await c.fail("moved", "this worker is being drained; reconnect for a new session", 1012)
            else:
                await c.stop()
        return len(clients)

    def export_session(self, sid: str) -> bytes:
        """Snapshot a live session for a move (moves.export); it generates nothing more here until it is ended."""
        from . import moves
        return self._bg.call(moves.export(self.server, sid), 120.0)

    def adopt_session(self, sid: str, resume_key: str | None, payload: bytes) -> int:
        """Continue a moved session here, waiting for its client's resume (moves.adopt)."""
        from . import moves
        return self._bg.call(moves.adopt(self.server, sid, resume_key, payload), 120.0)

    def shutdown(self) -> None:
        self._bg.stop()


def spawn(name: str, config: ServerConfig, factory: Callable[[], Any], *, namespace: str, gpus: float,
          cpus: float, max_restarts: int, log_level: str = "WARNING"):
    """Start one worker actor. It reserves `gpus` GPUs (Ray then sets CUDA_VISIBLE_DEVICES, so "cuda" is its own
    device) and `cpus` CPUs; its torch CPU threads follow `config.cpu_threads`."""
    import ray

    path = os.environ.get("PYTHONPATH", "")
    env = {"PYTHONPATH": _REPO_ROOT + (os.pathsep + path if path else ""),   # this checkout wins on the worker too
           # Ray starts workers at niceness 15 so its own daemons stay responsive; a stream worker is the
           # latency-critical process of its node: at 15, any other busy process on the node (a CPU worker's
           # neighbour, a batch job) took nearly all its CPU, and two CPU hogs kept workers from loading in 300 s
           "RAY_worker_niceness": "0"}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if var in os.environ:
            env[var] = os.environ[var]
    actor = ray.remote(StreamWorker).options(
        name=f"worker-{name}", namespace=namespace, max_restarts=max_restarts, max_task_retries=0,
        max_concurrency=8, num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": env})
    return actor.remote(name, config, factory, log_level)
