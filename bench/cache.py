"""Packed vs full vs window: seconds per chunk and K/V bytes as a stream grows (tiny preset, CPU).

    python -m bench.cache                      # chunks 10, 100, 500; table + bench/results/cache.png
    python -m bench.cache --checkpoints 10 50  # quicker

The three variants stream one session each, advanced in lockstep in the same process; at each checkpoint the table
records the median CPU and wall time of the last few chunks and the cache's K/V bytes. Timing covers the transformer passes and the cache
(selection, RoPE re-packing, compression); VAE decode is left out (`session.advance()` with the zero-shot `pool`
compressor) because it costs the same for every cache and would only hide the difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from packcache import Generator

VARIANTS = ("packed", "window", "full")


def measure(gen: Generator, checkpoints: list[int], window: int) -> dict[str, dict]:
    """Advance one session per variant in lockstep, so that load from other processes hits all variants alike.

    Per chunk: wall seconds and this thread's CPU seconds (torch runs on one intra-op thread here, so the thread's
    CPU time is the chunk's compute, whatever else the machine is doing).
    """
    sessions = {kind: gen.open("a red circle bouncing on a striped blue background", seed=0, cache=kind)
                for kind in VARIANTS}
    samples: dict[str, list[tuple[float, float]]] = {kind: [] for kind in VARIANTS}
    results: dict[str, dict] = {kind: {"series": []} for kind in VARIANTS}
    try:
        for i in tqdm(range(1, max(checkpoints) + 1), desc="chunks (all variants)", unit="chunk", file=sys.stderr):
            for kind, session in sessions.items():
                w0, c0 = time.perf_counter(), time.thread_time()
                session.advance()
                samples[kind].append((time.perf_counter() - w0, time.thread_time() - c0))
                st = session.stats()
                results[kind]["series"].append((i, samples[kind][-1][1], st["kv_bytes"]))
                if i in checkpoints:
                    recent = samples[kind][-window:]
                    results[kind][i] = {"seconds": statistics.median(w for w, _ in recent),
                                        "cpu": statistics.median(c for _, c in recent),
                                        "kv_bytes": st["kv_bytes"], "attended": st["attended_tokens"]}
    finally:
        for session in sessions.values():
            session.close()
    return results


def format_table(results: dict[str, dict], checkpoints: list[int]) -> str:
    head = f"{'cache':<8}" + "".join(f" | chunk {c:>4}: cpu ms  wall ms  KV KiB  attended" for c in checkpoints)
    lines = [head, "-" * len(head)]
    for kind, rows in results.items():
        cells = "".join(
            f" | {rows[c]['cpu'] * 1e3:>14.1f} {rows[c]['seconds'] * 1e3:>8.1f} {rows[c]['kv_bytes'] / 1024:>7.0f}"
            f" {rows[c]['attended']:>9}" for c in checkpoints)
        lines.append(f"{kind:<8}{cells}")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, rows in results.items():
        xs = [r[0] for r in rows["series"]]
        a.plot(xs, [r[1] * 1000 for r in rows["series"]], label=kind, lw=0.6)
        b.plot(xs, [r[2] / 1024 for r in rows["series"]], label=kind)
    a.set(xlabel="chunk", ylabel="CPU ms per chunk (1 thread)", title="compute per chunk")
    b.set(xlabel="chunk", ylabel="K/V KiB", title="cache memory")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[10, 100, 500])
    ap.add_argument("--window", type=int, default=9, help="chunks whose median is reported at each checkpoint")
    ap.add_argument("--plot", default="bench/results/cache.png")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the three caches are compared at the same, steady setting)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads) if args.threads else None
    gen = Generator.from_preset(args.preset, device="cpu", compression="pool")
    results = measure(gen, sorted(args.checkpoints), args.window)
    print(format_table(results, sorted(args.checkpoints)))
    plot(results, Path(args.plot))
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
