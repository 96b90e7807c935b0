"""Serving under load: 1, 2 and 4 concurrent aiortc clients against a real server process (tiny preset, CPU).

    python -m bench.serve                          # clients 1 2 4, 10 s each; table + bench/results/serve.png
    python -m bench.serve --clients 1 2 --seconds 5 --preset tiny

The server runs as a subprocess (`run_server.py`) so its CPU time is its own (read from /proc); the clients
(websocket + WebRTC receive + decode) run in this process. Per row:

- delivered FPS: decoded frames per second arriving at each client (mean, min over clients). The track paces
  at 16 FPS whatever the generation speed, so this stays ~16 while the server keeps up with *sending*;
- fresh FPS: of those, new frames per second (the rest are the last frame repeated because generation was
  behind playback). fresh FPS / 16 is the per-client real-time factor the viewer actually sees;
- first frame: seconds from the websocket connect to the first decoded frame (mean, max);
- server CPU / client: server process CPU-seconds per second of wall time, divided by clients;
- chunk latency p50 / p95: seconds from asking for a chunk to having it (queue on the shared device worker +
  generation), over each session's recent chunks (mean p50 and max p95 over clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from streamer.client import StreamClient

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def healthz(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=2) as r:
            return json.loads(r.read())
    except Exception:  # noqa: BLE001 - not up yet / 503 while loading
        return None


def start_server(preset: str, port: int, max_sessions: int, max_batch: int | None = None,
                 threads: int | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(ROOT / "run_server.py"), "--preset", preset, "--port", str(port),
           "--max-sessions", str(max_sessions), "--record-dir", "", "--log-level", "warning", "--device", "cpu"]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    end = time.monotonic() + 300
    while (h := healthz(url)) is None or h.get("status") != "ready":
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().strip()}")
        if time.monotonic() > end:
            proc.kill()
            raise SystemExit("server did not become ready in 300 s")
        time.sleep(0.3)
    return proc, url


async def run_clients(url: str, pid: int, n: int, seconds: float) -> dict:
    ws_url = url.replace("http://", "ws://") + "ws"
    clients = [StreamClient(ws_url) for _ in range(n)]

    async def first_frame(c: StreamClient) -> float:
        t0 = time.monotonic()
        await c.connect()
        await c.start_video()
        await c.wait_frames(1, timeout=120)
        return c.frames[0][0] - t0

    try:
        ttff = await asyncio.gather(*(first_frame(c) for c in clients))
        await asyncio.sleep(1.0)                                   # settle: every session streaming
        start_stats = [await c.wait_for(lambda m: m["type"] == "stats", past=False) for c in clients]
        t0, cpu0 = time.monotonic(), cpu_seconds(pid)
        await asyncio.sleep(seconds)
        t1, cpu1 = time.monotonic(), cpu_seconds(pid)
        end_stats = [await c.wait_for(lambda m: m["type"] == "stats", past=False) for c in clients]
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    fps = [c.fps(t0, t1) for c in clients]
    fresh = []
    for a, b in zip(start_stats, end_stats):
        dt = b["t"] - a["t"]
        sent = b["frames_sent"] - a["frames_sent"]
        repeated = b["repeated_frames"] - a["repeated_frames"]
        fresh.append((sent - repeated) / dt if dt > 0 else 0.0)
    p50 = [s["chunk_latency_p50"] for s in end_stats if s["chunk_latency_p50"] is not None]
    p95 = [s["chunk_latency_p95"] for s in end_stats if s["chunk_latency_p95"] is not None]
    return {
        "clients": n,
        "fps_mean": statistics.mean(fps), "fps_min": min(fps),
        "fresh_fps_mean": statistics.mean(fresh), "fresh_fps_min": min(fresh),
        "ttff_mean": statistics.mean(ttff), "ttff_max": max(ttff),
        "cpu_per_client": (cpu1 - cpu0) / (t1 - t0) / n,
        "latency_p50": statistics.mean(p50) if p50 else float("nan"),
        "latency_p95": max(p95) if p95 else float("nan"),
    }


def format_table(rows: list[dict], preset: str, seconds: float, load: tuple[float, float]) -> str:
    head = (f"{'clients':>7} | {'delivered FPS mean/min':>22} | {'fresh FPS mean/min':>18} | "
            f"{'first frame s mean/max':>22} | {'server CPU/client':>17} | {'chunk latency p50/p95 s':>23}")
    lines = [f"bench.serve: preset {preset}, {seconds:g} s per row, {os.cpu_count()} CPU cores, "
             f"load average {load[0]:.1f} before / {load[1]:.1f} after (other work on the machine skews it)", head,
             "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['clients']:>7} | {r['fps_mean']:>10.1f} / {r['fps_min']:>9.1f} | "
            f"{r['fresh_fps_mean']:>8.1f} / {r['fresh_fps_min']:>7.1f} | "
            f"{r['ttff_mean']:>10.2f} / {r['ttff_max']:>9.2f} | {r['cpu_per_client']:>11.2f} cores | "
            f"{r['latency_p50']:>11.2f} / {r['latency_p95']:>9.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["clients"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(n, [r["fps_mean"] for r in rows], "o-", label="delivered")
    axes[0].plot(n, [r["fresh_fps_mean"] for r in rows], "s-", label="fresh (new frames)")
    axes[0].axhline(16, color="grey", lw=0.8, ls="--")
    axes[0].set(title="FPS per client", xlabel="clients", ylim=(0, 18))
    axes[0].legend()
    axes[1].plot(n, [r["latency_p50"] for r in rows], "o-", label="p50")
    axes[1].plot(n, [r["latency_p95"] for r in rows], "s-", label="p95")
    axes[1].set(title="chunk latency (s)", xlabel="clients")
    axes[1].legend()
    axes[2].plot(n, [r["cpu_per_client"] for r in rows], "o-")
    axes[2].set(title="server CPU per client (cores)", xlabel="clients")
    for ax in axes:
        ax.set_xticks(n)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window per row")
    p.add_argument("--plot", default=str(ROOT / "bench" / "results" / "serve.png"), help="PNG path; '' for none")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the server's --max-batch (1: one session per device step, as before batching)")
    p.add_argument("--threads", type=int, default=None,
                   help="the server's torch CPU threads (default: the server's own, cores - 1)")
    args = p.parse_args(argv)

    load0 = os.getloadavg()[0]
    proc, url = start_server(args.preset, free_port(), max(args.clients), args.max_batch, args.threads)
    rows = []
    try:
        for n in args.clients:
            rows.append(asyncio.run(run_clients(url, proc.pid, n, args.seconds)))
            end = time.monotonic() + 30
            while (h := healthz(url)) is not None and h["sessions"] and time.monotonic() < end:
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    print(format_table(rows, args.preset, args.seconds, (load0, os.getloadavg()[0])))
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
