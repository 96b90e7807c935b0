"""Many sessions on one device: batched (one model call per denoising step for all sessions) vs one at a time.

    python -m bench.sessions --sessions 1,2,4,8                                  # CPU, toy preset
    python -m bench.sessions --device cuda --preset wan2.1-t2v-1.3b --sessions 1,2,4,8   # real size, random weights
    python -m bench.sessions ... --decoder taehv          # the TAEHV decoder, batched too (rows in *_taehv.json)

For each session count N, two sets of N open sessions (warmed past the sink, so every chunk has the steady-state
shape) advance in rounds: `batched` calls `Generator.next_chunks(all N)` once per round; `serial` calls each
session's `next_chunk()` in turn (what the device worker did before batching). The two modes alternate every
`--block` rounds in the same run, so load from other processes falls on both alike. Every chunk is decoded to
frames (what a viewer gets). Per row:

- aggregate FPS: frames produced per wall second, all sessions together;
- per-session FPS: frames per wall second of the slowest session; a viewer sees min(16, this) fresh frames/s;
- chunk latency p50/p95: seconds from the start of a round to the moment a session's frames are ready (serial: it
  waits for the sessions before it; batched: the whole step).

Real size uses the 1.3B architecture with random weights and a one-layer text encoder, as `bench.realsize` does
(speed does not depend on weight values). Rows are written as JSON (`--json`) and plotted (`--plot`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from packcache import Generator

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("a red circle bouncing on a striped blue background", "a green triangle drifting over a yellow field",
           "a blue square spinning on a white background", "a yellow circle moving left on a black background")


def device_slug(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device)).lower().replace("nvidia", "")
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"
    return "cpu"


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Mode:
    """N open sessions advanced round by round, batched or serially; accumulates frames, wall time, latencies."""

    def __init__(self, gen: Generator, n: int, mode: str, cache: str, warm_chunks: int):
        self.gen, self.mode = gen, mode
        self.sessions = [gen.open(PROMPTS[i % len(PROMPTS)], seed=i, cache=cache) for i in range(n)]
        self.frames = [0] * n
        self.wall = 0.0
        self.latencies: list[float] = []
        for _ in range(warm_chunks):
            self._round(record=False)

    def _sync(self) -> None:
        if self.gen.device.type == "cuda":
            torch.cuda.synchronize(self.gen.device)

    def _round(self, record: bool = True) -> None:
        self._sync()
        t0 = time.perf_counter()
        if self.mode == "batched":
            results = self.gen.next_chunks(self.sessions)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            self._sync()
            done = [time.perf_counter()] * len(results)
        else:
            results, done = [], []
            for s in self.sessions:
                results.append(s.next_chunk())
                self._sync()
                done.append(time.perf_counter())
        if record:
            self.wall += done[-1] - t0
            self.latencies += [d - t0 for d in done]
            for i, frames in enumerate(results):
                self.frames[i] += len(frames)

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self._round()

    def row(self, device: str, preset: str) -> dict:
        n = len(self.sessions)
        return {
            "device": device, "preset": preset, "sessions": n, "mode": self.mode,
            "aggregate_fps": sum(self.frames) / self.wall,
            "per_session_fps": min(self.frames) / self.wall,
            "p50_s": percentile(self.latencies, 0.5), "p95_s": percentile(self.latencies, 0.95),
            "chunks": len(self.latencies),
        }

    def close(self) -> None:
        for s in self.sessions:
            s.close()


def measure(gen: Generator, n: int, rounds: int, block: int, cache: str, warm: int, device: str,
            preset: str) -> list[dict]:
    modes = [Mode(gen, n, "batched", cache, warm), Mode(gen, n, "serial", cache, warm)]
    try:
        done = 0
        while done < rounds:
            step = min(block, rounds - done)
            order = modes if (done // block) % 2 == 0 else modes[::-1]    # alternate who goes first
            for m in order:
                m.run(step)
            done += step
        return [m.row(device, preset) for m in modes]
    finally:
        for m in modes:
            m.close()


def format_table(rows: list[dict], header: str) -> str:
    head = (f"{'sessions':>8} | {'mode':>7} | {'aggregate FPS':>13} | {'per-session FPS':>15} | "
            f"{'>=16':>4} | {'latency p50 s':>13} | {'p95 s':>6} | {'batched/serial':>14}")
    lines = [header, head, "-" * len(head)]
    serial = {r["sessions"]: r for r in rows if r["mode"] == "serial"}
    for r in rows:
        ratio = ""
        if r["mode"] == "batched" and r["sessions"] in serial:
            ratio = f"{r['aggregate_fps'] / serial[r['sessions']]['aggregate_fps']:.2f}x"
        lines.append(f"{r['sessions']:>8} | {r['mode']:>7} | {r['aggregate_fps']:>13.1f} | "
                     f"{r['per_session_fps']:>15.1f} | {'yes' if r['per_session_fps'] >= 16 else 'no':>4} | "
                     f"{r['p50_s']:>13.3f} | {r['p95_s']:>6.3f} | {ratio:>14}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode, style, color in (("batched", "o-", "tab:blue"), ("serial", "s--", "tab:orange")):
        rs = [r for r in rows if r["mode"] == mode]
        n = [r["sessions"] for r in rs]
        axes[0].plot(n, [r["aggregate_fps"] for r in rs], style, color=color, label=mode)
        axes[1].plot(n, [r["per_session_fps"] for r in rs], style, color=color, label=mode)
        axes[2].plot(n, [r["p50_s"] for r in rs], style, color=color, label=f"{mode} p50")
        axes[2].plot(n, [r["p95_s"] for r in rs], style, color=color, alpha=0.4, label=f"{mode} p95")
    axes[1].axhline(16, color="grey", lw=0.8, ls=":", label="16 FPS")
    axes[0].set(title="aggregate frames/s", xlabel="sessions")
    axes[1].set(title="per-session frames/s (slowest)", xlabel="sessions")
    axes[2].set(title="chunk latency (s)", xlabel="sessions")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["sessions"] for r in rows}), [str(s) for s in sorted({r["sessions"] for r in rows})])
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def session_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("session counts must be at least 1")
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=session_counts, default=[1, 2, 4, 8], help="comma-separated, e.g. 1,2,4,8")
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--cache", default="packed", choices=("packed", "window", "full"))
    ap.add_argument("--rounds", type=int, default=8, help="measured rounds per mode and session count")
    ap.add_argument("--block", type=int, default=2, help="rounds per turn before the other mode runs")
    ap.add_argument("--warm", type=int, default=None,
                    help="chunks before measuring (default: sink + recent + 1, the steady-state shape)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: cores - 1, at least 1, as the server's device worker)")
    ap.add_argument("--decoder", default="wan", choices=("wan", "taehv"),
                    help="frame decoder (taehv: batched too; random weights in the taew2_1 layout unless given)")
    ap.add_argument("--taehv-weights", default=None, metavar="FILE", help="a real TAEHV checkpoint for --decoder taehv")
    ap.add_argument("--json", default=None, help="rows as JSON (default: bench/results/sessions_<device>.json)")
    ap.add_argument("--plot", default=None, help="PNG (default: bench/results/sessions_<device>.png); '' for none")
    args = ap.parse_args(argv)
    if args.taehv_weights and args.decoder != "taehv":
        ap.error("--taehv-weights needs --decoder taehv")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device} but no CUDA device is available")
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    preset = args.preset
    if args.device.startswith("cuda") or preset not in ("toy", "tiny"):
        from bench.realsize import random_weights_preset
        preset = random_weights_preset(preset)
    gen = Generator.from_preset(preset, device=args.device, dtype=dtype)
    if args.decoder == "taehv":
        from bench.realsize import write_random_taehv
        weights = args.taehv_weights
        if weights is None:
            weights = os.path.join(tempfile.mkdtemp(prefix="bench-sessions-"), "taew2_1-random.pth")
            write_random_taehv(Path(weights), gen.preset.vae.z_dim)
        gen.use_decoder("taehv", weights)
    gen.warmup()
    cfg = gen.preset.cache
    warm = args.warm if args.warm is not None else cfg.sink_chunks + cfg.recent_chunks + 1
    slug = device_slug(args.device)
    out_slug = slug + ("_taehv" if args.decoder == "taehv" else "")
    where = torch.cuda.get_device_name(gen.device) if gen.device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} cores"
    load0 = os.getloadavg()[0]
    rows = []
    for n in args.sessions:
        print(f"{n} session(s)...", file=sys.stderr, flush=True)
        rows += [{**r, "decoder": args.decoder}
                 for r in measure(gen, n, args.rounds, args.block, args.cache, warm, slug, args.preset)]
    header = (f"bench.sessions: preset {args.preset} ({gen.preset.width}x{gen.preset.height}, {gen.dtype}), {where}, "
              f"{args.decoder} decoder, "
              f"{args.cache} cache, {args.rounds} rounds per row after {warm} warm-up chunks, modes interleaved "
              f"every {args.block} rounds; load average {load0:.1f} before / {os.getloadavg()[0]:.1f} after")
    print(format_table(rows, header))
    json_path = Path(args.json or ROOT / "bench" / "results" / f"sessions_{out_slug}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"rows: {json_path}")
    plot_path = args.plot if args.plot is not None else str(ROOT / "bench" / "results" / f"sessions_{out_slug}.png")
    if plot_path:
        plot(rows, Path(plot_path), f"bench.sessions: {args.preset}, {where}, {args.cache} cache, "
             f"load average {load0:.1f}")
        print(f"plot: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
