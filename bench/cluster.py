"""Front-door overhead of the Ray cluster: CPU of the front door per relayed stream (tiny preset, CPU workers).

    python -m bench.cluster                          # 0 1 2 3 streams over 2 workers, 10 s each
    python -m bench.cluster --streams 0 2 4 --seconds 20 --workers 2 --max-sessions 2

The front door runs as a subprocess (`run_server.py --cluster ray`, which starts a local Ray instance), so its CPU
time is its own, read from /proc: the relay (websocket in, websocket out), the status polls of every worker and
Ray's driver threads. Workers, Ray's own daemons and the clients (this process) are not counted. Streams are
added one at a time and kept; each row observes `--seconds` of wall time with that many streams playing.

- front door CPU: CPU-seconds per second of wall time (1.0 = one core busy);
- per stream: (front door CPU - the 0-stream row) / streams: what one more stream costs the front door;
- relayed msgs/s: websocket messages through the front door per second (both directions, all streams);
- delivered FPS: decoded frames per second at each client (mean, min).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
import urllib.request

from bench.serve import ROOT, cpu_seconds, free_port, healthz
from streamer.client import StreamClient


def relayed(url: str) -> float:
    with urllib.request.urlopen(url + "metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(m) for m in re.findall(r"^cluster_relay_messages_total\{[^}]*\} (\S+)$", text, re.M))


def start(args, port: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(ROOT / "run_server.py"), "--cluster", "ray", "--workers", str(args.workers),
           "--preset", args.preset, "--port", str(port), "--max-sessions", str(args.max_sessions),
           "--record-dir", "", "--log-level", "warning", "--device", "cpu", "--worker-cpus", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    end = time.monotonic() + args.startup_timeout
    while True:
        h = healthz(url)
        if h and sum(w["ready"] for w in h["workers"]) == args.workers:
            return proc, url
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise SystemExit(f"bench.cluster: the cluster did not start (exit {proc.poll()})")
        time.sleep(1.0)


async def run(args) -> list[dict]:
    proc, url = start(args, free_port())
    clients: list[StreamClient] = []
    rows = []
    try:
        for n in args.streams:
            while len(clients) < n:
                c = StreamClient(url.replace("http://", "ws://") + "ws")
                await c.connect()
                await c.start_video()
                await c.wait_frames(1, timeout=120)
                clients.append(c)
            await asyncio.sleep(2.0)                    # settle after the last negotiation
            cpu0, msgs0, t0 = cpu_seconds(proc.pid), relayed(url), time.monotonic()
            await asyncio.sleep(args.seconds)
            cpu1, msgs1, t1 = cpu_seconds(proc.pid), relayed(url), time.monotonic()
            fps = [c.fps(t0, t1) for c in clients]
            rows.append({"streams": n, "cpu": (cpu1 - cpu0) / (t1 - t0), "msgs": (msgs1 - msgs0) / (t1 - t0),
                         "fps_mean": statistics.mean(fps) if fps else None, "fps_min": min(fps) if fps else None})
            print(f"  {n} stream(s): front door {rows[-1]['cpu']:.3f} CPU", flush=True)
    finally:
        for c in clients:
            await c.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def table(rows: list[dict]) -> str:
    base = next((r["cpu"] for r in rows if r["streams"] == 0), 0.0)
    out = ["| streams | front door CPU (cores) | per stream (cores) | relayed msgs/s | delivered FPS mean / min |",
           "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        per = f"{(r['cpu'] - base) / r['streams']:.4f}" if r["streams"] else "–"
        fps = f"{r['fps_mean']:.1f} / {r['fps_min']:.1f}" if r["fps_mean"] is not None else "–"
        out.append(f"| {r['streams']} | {r['cpu']:.4f} | {per} | {r['msgs']:.1f} | {fps} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-sessions", type=int, default=2, help="per worker")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if max(args.streams) > args.workers * args.max_sessions:
        p.error("more streams than workers x max-sessions")
    rows = asyncio.run(run(args))
    print(table(rows))


if __name__ == "__main__":
    main()
