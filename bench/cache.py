"""Packed vs full vs window: seconds per chunk and K/V bytes as a stream grows (tiny preset, CPU).

    python -m bench.cache                      # chunks 10, 100, 500; table + bench/results/cache.png
    python -m bench.cache --checkpoints 10 50  # quicker

Each variant streams one session chunk after chunk in the same process; at each checkpoint the table records the
mean seconds of the last few chunks and the cache's K/V bytes. Timing covers the transformer passes and the cache
(selection, RoPE re-packing, compression); VAE decode is left out (`session.advance()` with the zero-shot `pool`
compressor) because it costs the same for every cache and would only hide the difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from packcache import Generator

VARIANTS = ("packed", "window", "full")


def measure(gen: Generator, kind: str, checkpoints: list[int], window: int) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    session = gen.open("a red circle bouncing on a striped blue background", seed=0, cache=kind)
    times: list[float] = []
    series = []
    try:
        for i in tqdm(range(1, max(checkpoints) + 1), desc=kind, unit="chunk", file=sys.stderr):
            t0 = time.perf_counter()
            session.advance()
            times.append(time.perf_counter() - t0)
            st = session.stats()
            series.append((i, times[-1], st["kv_bytes"]))
            if i in checkpoints:
                recent = times[-window:]
                rows[i] = {"seconds": sum(recent) / len(recent), "kv_bytes": st["kv_bytes"],
                           "attended": st["attended_tokens"]}
    finally:
        session.close()
    rows["series"] = series
    return rows


def format_table(results: dict[str, dict], checkpoints: list[int]) -> str:
    head = f"{'cache':<8}" + "".join(f" | chunk {c:>4}: s/chunk   KV KiB  attended" for c in checkpoints)
    lines = [head, "-" * len(head)]
    for kind, rows in results.items():
        cells = "".join(
            f" | {rows[c]['seconds']:>17.4f} {rows[c]['kv_bytes'] / 1024:>8.0f} {rows[c]['attended']:>9}"
            for c in checkpoints)
        lines.append(f"{kind:<8}{cells}")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, rows in results.items():
        xs = [r[0] for r in rows["series"]]
        a.plot(xs, [r[1] * 1000 for r in rows["series"]], label=kind, lw=0.8)
        b.plot(xs, [r[2] / 1024 for r in rows["series"]], label=kind)
    a.set(xlabel="chunk", ylabel="ms per chunk", title="time per chunk")
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
    ap.add_argument("--window", type=int, default=5, help="chunks averaged at each checkpoint")
    ap.add_argument("--plot", default="bench/results/cache.png")
    args = ap.parse_args(argv)
    gen = Generator.from_preset(args.preset, device="cpu", compression="pool")
    results = {kind: measure(gen, kind, sorted(args.checkpoints), args.window) for kind in VARIANTS}
    print(format_table(results, sorted(args.checkpoints)))
    plot(results, Path(args.plot))
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
