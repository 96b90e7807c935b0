"""streamer.cluster: many GPU workers on Ray behind one public address (`run_server.py --cluster ray`).

    config.py      ClusterConfig: workers, Ray address, resources per worker
    worker.py      StreamWorker: a Ray actor owning one device, its generator and a StreamServer
    frontdoor.py   FrontDoor: the viewer, /healthz and /metrics over all workers, admission, websocket relay,
                   drain; Relay: one client websocket <-> its worker's
    placement.py   WorkerView (the front door's view of a worker) and pick(): most free slots wins
    exposition.py  merging the workers' Prometheus text, labelled by worker
    cli.py         serve_cluster(): what run_server.py runs with --cluster ray

Ray is an optional dependency (`pip install -e '.[cluster]'`); nothing outside this package imports it.
"""

from .config import ClusterConfig

__all__ = ["ClusterConfig"]
