"""The Ray cluster (streamer/cluster) on this machine's CPUs: a local Ray instance, two StreamWorker actors on the
tiny preset behind one FrontDoor, real websocket relaying and real WebRTC from the workers to aiortc clients.

What the tests hold (rates are measured over each test's own observed window, with wide margins: this machine has
2 shared cores and three sessions generate on them; the track paces 16 FPS and repeats frames when generation is
behind, so delivered FPS is the pacing contract and chunk progress is checked separately):
  * admission spreads sessions: no worker gets a second session while another has a free slot; `busy` only when
    every worker is full;
  * three clients over two workers all receive video (>= 8 of 16 FPS over a 6 s window) while their chunks advance;
  * /healthz and /metrics at the front door cover both workers, labelled by worker;
  * draining a worker moves its sessions: its client is told (`moved`), resumes through the front door with its key
    on the other worker, and receives video again; the other worker's client is untouched;
  * killing a worker's process: its client is told (`worker_lost`) and gets a new session on the worker that is up,
    the other worker's client keeps receiving video with no error, and Ray restarts the dead worker (a new process
    and incarnation).
  * a client flooding through the front door (messages, which the worker charges, or ping frames, which end at the
    front door) is closed with rate_limited and its address refused at the front door, while both workers keep
    taking new sessions (a worker cannot refuse the address it sees: it is the front door's).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import websockets

from streamer.client import ServerError, StreamClient
from streamer.cluster.exposition import add_label, merge
from streamer.cluster.placement import WorkerView, pick
from streamer.config import ServerConfig

WINDOW = 6.0            # seconds of video each FPS check observes
MIN_FPS = 8.0           # of 16: delivered frames; half, for a 2-core machine shared with other jobs


# ---- without Ray: the pure parts

def test_add_label_and_merge_keep_families_together():
    assert add_label('m{a="b"} 1', "worker", "w0") == 'm{worker="w0",a="b"} 1'
    assert add_label("m 2.5", "worker", "w1") == 'm{worker="w1"} 2.5'
    assert add_label('h_bucket{le="+Inf"} 3', "worker", 'x"y') == 'h_bucket{worker="x\\"y",le="+Inf"} 3'
    w = "# HELP c total\n# TYPE c counter\nc 1\n# HELP h hist\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 3\n"
    out = merge({"w0": w, "w1": w.replace("c 1", "c 7")}).splitlines()
    assert out == ["# HELP c total", "# TYPE c counter", 'c{worker="w0"} 1', 'c{worker="w1"} 7',
                   "# HELP h hist", "# TYPE h histogram", 'h_bucket{worker="w0",le="1"} 2', 'h_sum{worker="w0"} 3',
                   'h_bucket{worker="w1",le="1"} 2', 'h_sum{worker="w1"} 3']


def _view(name, sessions, max_sessions=2, ready=True):
    v = WorkerView(name)
    v.update({"incarnation": "a", "ready": ready, "sessions": sessions, "max_sessions": max_sessions, "sids": []},
             asked=time.monotonic())
    return v


def test_pick_most_free_slots_counts_admissions_in_flight_and_skips_draining():
    a, b = _view("a", 1), _view("b", 0)
    assert pick([a, b]) is b
    token = b.reserve()                      # routed, not yet in b's own count: both now have 1 free
    assert b.free() == 1 and pick([a, b]) is a
    b.welcomed(token)
    b.update({**b.status, "sessions": 1}, asked=time.monotonic())   # a status asked after the welcome counts it
    assert b.counted() == 0 and b.free() == 1
    b.draining = True
    assert pick([a, b]) is a
    a.reserve()
    assert pick([a, b]) is None              # full (or draining) everywhere: the front door says busy
    c = _view("c", 0, ready=False)
    assert c.free() == 0 and pick([c]) is None
    b.update(None, asked=time.monotonic())   # a failed status call: down, takes nothing
    assert b.down and not b.ready


def test_run_server_cluster_options_fail_with_one_line():
    """The CLI: the cluster options are listed, and bad ones fail before Ray or a model is started."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = [sys.executable, str(root / "run_server.py")]
    out = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=60, cwd=root)
    for opt in ("--cluster", "--workers", "--ray-address", "--worker-gpus", "--worker-cpus"):
        assert opt in out.stdout
    for args in (["--cluster", "ray", "--workers", "0"], ["--cluster", "slurm"], ["--cluster", "ray", "--worker-cpus", "-1"]):
        out = subprocess.run(run + args, capture_output=True, text=True, timeout=60, cwd=root)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("run_server.py: error:"), out.stderr


# ---- a local Ray cluster

ray = pytest.importorskip("ray", reason="the cluster tests need Ray: pip install -e '.[cluster]'")


@pytest.fixture(scope="module")
def cluster():
    import torch

    from packcache import Generator
    from streamer.cluster.config import ClusterConfig
    from streamer.cluster.frontdoor import BackgroundFrontDoor, FrontDoor

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=96 * 2**20, log_to_driver=False,
             namespace=f"test-cluster-{os.getpid()}")
    factory = functools.partial(Generator.from_preset, "tiny", device="cpu", dtype=torch.float32)
    config = ServerConfig(port=0, max_sessions=2, cpu_threads=1, record_dir=None, reconnect_grace=30.0)
    door = FrontDoor(config, ClusterConfig(workers=2, status_interval=0.25, call_timeout=3.0), factory)
    bg = BackgroundFrontDoor(door).start(timeout=300)
    try:
        yield bg
    finally:
        bg.stop()
        left = ray.util.list_named_actors()          # the front door's close() kills its workers
        ray.shutdown()
    assert not left, left


@pytest.fixture
def door(cluster):
    """Each test starts with both workers ready, taking sessions and holding none."""
    d = cluster.server
    for v in d.views.values():
        v.draining = False
    _wait(lambda: all(v.ready and v.status["sessions"] == 0 and v.counted() == 0 for v in d.views.values()), 240)
    return d


def _wait(cond, timeout):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _worker_of(door, client) -> str:
    return door.routes[client.welcome["session"]].worker


async def _connect(door, url=None, video=True):
    c = StreamClient(url or door.ws_url)
    await c.connect()
    if video:
        await c.start_video()
    return c


async def _observe(clients, seconds=WINDOW):
    """(fps over the window, chunks generated during it) for each client."""
    before = [c.last_stats["chunk_index"] if c.last_stats else 0 for c in clients]
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    t1 = time.monotonic()
    return [(c.fps(t0, t1), c.last_stats["chunk_index"] - b) for c, b in zip(clients, before)]


@pytest.mark.slow
async def test_spread_video_health_metrics_and_busy(door):
    clients = []
    try:
        for _ in range(3):
            clients.append(await _connect(door, video=False))
        workers = [_worker_of(door, c) for c in clients]
        assert sorted(workers[:2]) == ["w0", "w1"], workers      # no second session while another is free
        for c in clients:
            await c.start_video()
        for c in clients:
            await c.wait_frames(1, timeout=90)
        seen = await _observe(clients)
        print("fps, chunks per client over", WINDOW, "s:", seen)
        for fps, chunks in seen:
            assert fps >= MIN_FPS and chunks >= 1, seen
        assert not any(c.errors() for c in clients)

        status, body = await asyncio.to_thread(_get, door.url + "healthz")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ready" and health["sessions"] == 3
        assert health["max_sessions"] == 4 and {w["name"] for w in health["workers"]} == {"w0", "w1"}
        status, body = await asyncio.to_thread(_get, door.url + "metrics")
        text = body.decode()
        assert status == 200 and "cluster_workers_ready 2" in text
        for w in ("w0", "w1"):
            assert f'streamer_sessions{{worker="{w}"}}' in text and f'streamer_chunks_total{{worker="{w}"}}' in text
        assert sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("streamer_sessions{")) == 3

        clients.append(await _connect(door, video=False))      # the last free slot
        with pytest.raises(ServerError) as refused:              # every worker full: busy
            await _connect(door, video=False)
        assert refused.value.code == "busy"
    finally:
        for c in clients:
            await c.close()


@pytest.mark.slow
async def test_drain_moves_sessions_and_leaves_the_other_worker_alone(door):
    a = await _connect(door)
    b = await _connect(door)
    try:
        wa, wb = _worker_of(door, a), _worker_of(door, b)
        assert wa != wb
        await a.wait_frames(1, timeout=90)
        await b.wait_frames(1, timeout=90)
        await asyncio.sleep(1.0)
        seen_chunk, seen_playing = a.last_stats["chunk_index"], a.last_stats["playing_chunk"]

        status, body = await asyncio.to_thread(_get, f"{door.url}admin/drain?worker={wa}")
        report = json.loads(body)
        assert status == 200 and report["moved"] == 1 and report["ended"] == 0, report
        moved = await a.wait_for(lambda m: m["type"] == "error", timeout=30)
        told = time.monotonic()
        assert moved["code"] == "moved" and moved["fatal"]

        sid, key = a.welcome["session"], a.welcome["resume_key"]
        await a.close()
        a = await _connect(door, f"{door.ws_url}?resume={sid}&key={key}")
        assert _worker_of(door, a) == wb
        # the same stream, continued where it was: same session, no chunk generated again from scratch
        assert a.welcome["resumed"] and a.welcome["session"] == sid and a.welcome["chunk_index"] >= seen_chunk
        await a.wait_frames(1, timeout=60)
        print(f"drain: first frame on the new worker {a.frames[0][0] - told:.2f} s after 'moved'")
        first = await a.wait_for(lambda m: m["type"] == "stats", timeout=30, past=False)   # after a new frame
        # the unplayed chunks moved too: playback resumes at the chunk it was on (or the next; stats are 0.5 s
        # apart), not after the chunks that had been buffered on the old worker
        assert seen_playing <= first["playing_chunk"] <= seen_playing + 2, (seen_playing, first["playing_chunk"])
        seen = await _observe([a, b])
        print("fps, chunks after the drain:", seen)
        for fps, chunks in seen:
            assert fps >= MIN_FPS and chunks >= 1, seen
        assert not b.errors()
        health = door.health()
        drained = next(w for w in health["workers"] if w["name"] == wa)
        assert drained["draining"] and drained["sessions"] == 0
        tmp = tempfile.gettempdir()                  # the snapshot files of the move are gone (workers share /tmp)
        assert not [n for n in os.listdir(tmp) if n.startswith(("move-", "adopt-"))]
    finally:
        await a.close()
        await b.close()
        await asyncio.to_thread(_get, f"{door.url}admin/undrain?worker={wa}")


@pytest.mark.slow
async def test_killing_a_worker_leaves_the_other_workers_clients_untouched(door):
    a = await _connect(door)
    b = await _connect(door)
    try:
        wa, wb = _worker_of(door, a), _worker_of(door, b)
        await a.wait_frames(1, timeout=90)
        await b.wait_frames(1, timeout=90)
        victim = door.views[wa]
        pid, incarnation = victim.status["pid"], victim.incarnation
        os.kill(pid, signal.SIGKILL)
        lost = await a.wait_for(lambda m: m["type"] == "error", timeout=30)
        assert lost["code"] == "worker_lost" and lost["fatal"]
        seen = await _observe([b])
        print("fps, chunks of the other worker's client after the kill:", seen)
        # Untouched: same session and peer connection, no error, video and chunks still coming. The FPS margin is
        # wider than elsewhere: Ray is starting the dead worker's replacement on these same 2 cores meanwhile
        # (on a real cluster it restarts on its own GPU machine).
        assert seen[0][0] >= MIN_FPS / 2 and seen[0][1] >= 1 and not b.errors(), seen
        assert _worker_of(door, b) == wb and b.pc.connectionState == "connected"

        await a.close()
        a = await _connect(door, video=False)          # its client's new session, on the worker that is up
        assert _worker_of(door, a) == wb and not a.welcome["resumed"]
        # Ray restarts the dead worker: a new process and incarnation (the front door routes to it once it has
        # loaded the model again; the `door` fixture of any later test waits for that)
        await asyncio.to_thread(_wait, lambda: not victim.down and victim.incarnation != incarnation, 240)
        assert victim.status["pid"] != pid and door.health()["status"] == "ready"
    finally:
        await a.close()
        await b.close()



async def _flood(url: str, kind: str, frames: int):
    """Send `frames` messages or ping frames as fast as possible; the close frame the server ends it with."""
    async with websockets.connect(url, max_size=None) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for i in range(frames):
                if kind == "messages":
                    await ws.send(json.dumps({"type": "ping"}))
                else:
                    await ws.ping(str(i))
                if i % 50 == 0:
                    await asyncio.sleep(0)
            while True:
                await asyncio.wait_for(ws.recv(), 30)
    return closed.value.rcvd


@pytest.mark.slow
async def test_a_flooder_is_refused_at_the_front_door_and_the_workers_keep_taking_sessions(door):
    lim = door.config.limits
    for kind in ("messages", "pings"):
        rcvd = await _flood(door.ws_url, kind, 20 * lim.flood_burst)
        assert rcvd is not None and (rcvd.code, rcvd.reason) == (1008, "rate_limited"), (kind, rcvd)
        assert door.penalty.remaining("127.0.0.1", time.monotonic()) > 0, kind     # refused at the front door
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(door.ws_url, open_timeout=10):
                pass
        assert refused.value.response.status_code == 429
        door.penalty._until.clear()          # the test's next clients share the flooder's address
        clients = []
        try:
            for _ in range(2):
                clients.append(await _connect(door, video=False))
            # both workers still take sessions from the front door: none refused it (429) or was marked down
            assert sorted(_worker_of(door, c) for c in clients) == ["w0", "w1"], kind
            assert not any(v.down for v in door.views.values())
        finally:
            for c in clients:
                await c.close()
        _wait(lambda: all(v.status["sessions"] == 0 and v.counted() == 0 for v in door.views.values()), 60)
