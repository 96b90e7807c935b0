"""serve_cluster(): run_server.py --cluster ray --workers N [--ray-address ADDR]."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import replace
from typing import Any, Callable

from ..console import listen_error, ready_line
from .config import ClusterConfig

log = logging.getLogger(__name__)


class ArgsFactory:
    """Builds the generator on the worker from run_server's arguments, so device defaults ("cuda if available"),
    --model-dir and --checkpoint are resolved on the worker's machine, not the front door's."""

    def __init__(self, make: Callable[[Any], Callable[[], Any]], args):
        self.make, self.args = make, args

    def __call__(self):
        return self.make(self.args)()


def cluster_config_from_args(args) -> ClusterConfig:
    return ClusterConfig(workers=args.workers, ray_address=args.ray_address, gpus_per_worker=args.worker_gpus,
                         cpus_per_worker=args.worker_cpus)


async def serve_cluster(args, config, make_factory: Callable[[Any], Callable[[], Any]]) -> int:
    """The front door on args.host:args.port; args.workers StreamWorkers on Ray. Returns the exit status."""
    try:
        import ray  # noqa: F401
    except ImportError:
        print("run_server.py: error: --cluster ray needs Ray: pip install -e '.[cluster]'", file=sys.stderr)
        return 2
    from .frontdoor import FrontDoor

    if args.preset and not args.model_dir:   # unknown names fail here, not on every worker
        from packcache import get_preset
        get_preset(args.preset)

    cluster = cluster_config_from_args(args)
    if config.state_dir:
        log.warning("--state-dir is not used with --cluster: drained sessions move between workers instead")
    if config.reconnect_grace == 0:     # moves off a drained worker are resumes: keep sessions a while
        config = replace(config, reconnect_grace=30.0)
    door = FrontDoor(config, cluster, ArgsFactory(make_factory, args), log_level=args.log_level.upper())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    on_signals()
    try:
        await door.listen()
    except OSError as exc:
        print(listen_error(config.host, config.port, exc), file=sys.stderr)
        return 1
    print(f"starting {cluster.workers} worker(s) on Ray… (/healthz says 'starting' until one is warm: "
          f"{door.url}healthz)", flush=True)
    status = 0
    try:
        start = asyncio.create_task(_start(door, on_signals))
        await asyncio.wait([start, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if start.done() and start.exception() is not None:
            print(f"run_server.py: error: {start.exception()}", file=sys.stderr)
            status = 1
        elif not stop.is_set():
            print(ready_line(door.url, bool(config.token), f"{len(door.views)} workers"), flush=True)
            await stop.wait()
        start.cancel()
    finally:
        print("shutting down…", flush=True)
        await door.close()
    return status


async def _start(door, on_signals: Callable[[], None]) -> None:
    await door.launch()
    on_signals()          # again: Ray's core worker installed its own SIGTERM handler (a stack dump) meanwhile
    await door.wait_ready()
