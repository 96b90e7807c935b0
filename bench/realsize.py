"""Real-size speed and memory: the Wan2.1-T2V-1.3B architecture with random weights (speed does not depend on
weight values), 832x480, packed cache, per stage (denoise / commit / decode / compress), end to end, over a long
stream, for the full Wan VAE and the TAEHV decoder side by side.

    python -m bench.realsize                                   # on a GPU: the prepared run (<= 8.5 min: --minutes)
    python -m bench.realsize --preset tiny --device cpu --chunks 3 --baseline-chunks 2   # smoke test of the script

Rows, in order:
  1. baseline: Wan VAE, PyTorch's default SDPA, no compile, serial chunks (what bench/results/realsize_h200.txt
     measured before: 15.2 FPS);
  2. when compiling (the CUDA default): one row per --decoders entry, uncompiled (--eager-chunks), so the run has
     numbers for the attention backend and the pipeline even if the compile is slow or fails;
  3. one row per --decoders entry: the chosen attention backend, compiled, each chunk's finish (decode, compressed
     backup) on the side stream while the next chunk denoises (`submit_chunk`).
Each row reports the per-stage milliseconds per chunk (mean over the steady chunks, CUDA events on the stream the
stage ran on), end-to-end FPS (frames delivered / wall time, excluding the first chunk), the time from opening a
session to its first frames (after warm-up), the wall time per chunk early (chunks 15-25) and late (the last 10)
in the stream, KV GB and peak GB. Everything goes to --out as it happens: realsize_<device>.log (this output and
the engine's log lines) and realsize_<device>.json (one object per row, rewritten after each row).

The TAEHV row uses a random checkpoint in the published taew2_1 layout (loaded through the same path as a real
file). The umT5-XXL text encoder is replaced by a one-layer random umT5 of the same width (4096): the prompt is
encoded once per prompt, off the per-chunk path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from packcache import Generator
from packcache.presets import get_preset, register_preset

log = logging.getLogger("bench.realsize")

FIELDS = ("device", "torch", "cache", "decoder", "attention", "compiled", "chunks", "fps", "first_frame_s",
          "ms_denoise", "ms_commit", "ms_decode", "ms_compress", "kv_gb", "peak_gb")
PROMPT = "a red panda eating bamboo in a snowy forest"


def random_weights_preset(name: str) -> str:
    base = get_preset(name)
    bench = replace(base, name=f"{name}-random", weights=None,
                    text=replace(base.text, kind="tiny", tiny_layers=1, tiny_heads=32 if base.text.dim >= 4096
                                 else base.text.tiny_heads))
    register_preset(bench)
    return bench.name


def device_label(device: torch.device) -> str:
    """'h200' for an NVIDIA H200, 'cpu' on the CPU: the file-name suffix."""
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).split()[-1].lower().replace("/", "-")


class Report:
    """Prints a line and appends it to the log file at once (a run cut short still leaves its lines)."""

    def __init__(self, log_path: Path):
        self.path = log_path
        self.file = open(log_path, "a", buffering=1, encoding="utf-8")
        handler = logging.StreamHandler(self.file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        self.handler = handler

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.file.close()


def write_random_taehv(path: Path, z_dim: int, seed: int = 0) -> None:
    from packcache.taehv import TAEHVModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save(TAEHVModel(z_dim).state_dict(), path)


def measure(gen: Generator, cache: str, chunks: int, pipelined: bool, deadline: float) -> dict:
    """One stream of `chunks` chunks (fewer if the deadline passes); see the module docstring for what is measured."""
    cuda = gen.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    done_at: list[float] = []
    with gen.open(PROMPT, seed=0, cache=cache) as s:
        s.next_chunk()                                   # frames are on the host: the device work is done
        first_frame = time.perf_counter() - t0
        first_frames = s.stats()["frames"]
        t1 = time.perf_counter()
        prev = None
        for i in range(1, chunks):
            if time.perf_counter() > deadline:
                log.warning("time budget reached after %d chunks", i)
                break
            if pipelined:
                future = s.submit_chunk()                # denoise + commit here; the finish on the side worker
                if prev is not None:
                    prev.result()
                    done_at.append(time.perf_counter())
                prev = future
            else:
                s.next_chunk()
                done_at.append(time.perf_counter())
            if i % 50 == 0:
                log.info("%s: chunk %d/%d, %.3f s/chunk so far", gen.decoder_kind, i, chunks,
                         (time.perf_counter() - t1) / i)
        if prev is not None:
            prev.result()
            done_at.append(time.perf_counter())
        if cuda:
            torch.cuda.synchronize()
        steady = time.perf_counter() - t1
        st = s.stats()
        rows = s.clock.rows()
    ran = 1 + len(done_at)
    walls = [b - a for a, b in zip([t1] + done_at, done_at)]
    early = walls[14:25] or walls
    late = walls[-10:]
    stages = rows[5:] if len(rows) > 10 else rows[1:] or rows
    mean = {k: sum(r[k] for r in stages) / len(stages) for k in ("denoise", "commit", "decode", "compress")}
    return {
        "chunks": ran, "fps": (st["frames"] - first_frames) / steady if steady > 0 else 0.0,
        "first_frame_s": first_frame,
        "ms_denoise": mean["denoise"], "ms_commit": mean["commit"], "ms_decode": mean["decode"],
        "ms_compress": mean["compress"],
        "kv_gb": st["kv_bytes"] / 1e9,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,   # JSON has no NaN
        "pipelined": pipelined, "attended": st["attended_tokens"],
        "ms_chunk_early": 1e3 * sum(early) / len(early) if early else 0.0,
        "ms_chunk_late": 1e3 * sum(late) / len(late) if late else 0.0,
        "ms_chunk_wall": [round(1e3 * w, 2) for w in walls],
    }


HEADER = (f"{'decoder':<8} {'attention':<9} {'comp':<5} {'pipe':<5} {'chunks':>6} {'FPS':>6} {'1st s':>6} "
          f"{'denoise':>8} {'commit':>7} {'decode':>7} {'compress':>8} {'ms@20':>7} {'ms@end':>7} {'KV GB':>6} "
          f"{'peak GB':>7}")


def format_row(r: dict) -> str:
    return (f"{r['decoder']:<8} {r['attention']:<9} {'yes' if r['compiled'] else 'no':<5} "
            f"{'yes' if r['pipelined'] else 'no':<5} {r['chunks']:>6} {r['fps']:>6.1f} {r['first_frame_s']:>6.2f} "
            f"{r['ms_denoise']:>8.1f} {r['ms_commit']:>7.1f} {r['ms_decode']:>7.1f} {r['ms_compress']:>8.1f} "
            f"{r['ms_chunk_early']:>7.1f} {r['ms_chunk_late']:>7.1f} {r['kv_gb']:>6.2f} "
            f"{'-' if r['peak_gb'] is None else format(r['peak_gb'], '.2f'):>7}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.realsize", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--cache", default="packed", choices=("packed", "window", "full"))
    ap.add_argument("--compression", default="lr", choices=("hr+lr", "hr", "lr", "pool"))
    ap.add_argument("--chunks", type=int, default=200, help="chunks per row (the issue asks for >= 200)")
    ap.add_argument("--baseline-chunks", type=int, default=40,
                    help="chunks of the baseline row (default SDPA, no compile, serial); 0 skips it")
    ap.add_argument("--eager-chunks", type=int, default=60,
                    help="when compiling: chunks of the same rows run uncompiled first (numbers even if the compile "
                         "is slow or fails); 0 skips them")
    ap.add_argument("--decoders", nargs="+", default=["wan", "taehv"], choices=("wan", "taehv"))
    ap.add_argument("--taehv-weights", default=None, metavar="FILE",
                    help="a real TAEHV checkpoint (default: random weights in the taew2_1 layout)")
    ap.add_argument("--attention", default="auto", choices=("auto", "fa3", "cudnn", "flash", "sdpa"))
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile the measured rows (default: on for cuda, off for cpu)")
    ap.add_argument("--compile-mode", default="default",
                    choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend ('eager' traces without generating code: a quick check of the path)")
    ap.add_argument("--serial", action="store_true", help="measured rows without the decode pipeline")
    ap.add_argument("--minutes", type=float, default=8.5,
                    help="time budget for the whole run: rows stop early (and say so) once it is spent")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), metavar="DIR",
                    help="where realsize_<device>.log and .json go (default: bench/results/)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for --device cpu (default: cores - 1, see packcache/threads.py)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        from packcache.threads import set_threads
        set_threads(args.threads)
    if args.chunks < 2:
        ap.error("--chunks must be at least 2")
    started = time.perf_counter()
    deadline = started + 60 * args.minutes
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = device_label(device)
    json_path, log_path = out / f"realsize_{label}.json", out / f"realsize_{label}.log"
    json_path.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)                   # the engine's progress lines belong in the log file
    rep = Report(log_path)
    try:
        command = " ".join(sys.argv[1:] if argv is None else argv)
        return _run(args, device, label, json_path, rep, started, deadline, command)
    finally:
        rep.close()
        root.setLevel(level)


def _run(args, device, label, json_path, rep, started, deadline, command) -> int:
    from packcache.compile import CompileConfig, compile_generator, default_enabled

    rep.say(f"python -m bench.realsize {command}".rstrip())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    extras = []
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            __import__(module)
            extras.append(module)
        except Exception:  # noqa: BLE001
            pass
    rep.say(f"torch {torch.__version__}, cuda {torch.version.cuda}, cudnn "
            f"{torch.backends.cudnn.version() if device.type == 'cuda' else '-'}, {name}; attention packages: "
            f"{', '.join(extras) or 'none'}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t = time.perf_counter()
    gen = Generator.from_preset(random_weights_preset(args.preset), device=str(device), dtype=dtype,
                                compression=args.compression)
    p = gen.preset
    rep.say(f"{args.preset} random weights, {p.width}x{p.height}, {gen.dtype}, cache {args.cache}, "
            f"built in {time.perf_counter() - t:.1f} s")
    rows: list[dict] = []
    common = {"device": name, "torch": torch.__version__, "cache": args.cache, "preset": args.preset,
              "width": p.width, "height": p.height}

    def record(r: dict) -> None:
        rows.append(r)
        rep.say(format_row(r))
        json_path.write_text(json.dumps(rows, indent=1) + "\n")

    # 1. baseline: default SDPA, eager, serial, Wan VAE
    if args.baseline_chunks:
        gen.use_attention("sdpa")
        t = time.perf_counter()
        gen.warmup()
        rep.say(f"baseline warm-up {time.perf_counter() - t:.1f} s; rows (ms per chunk; ms@20 / ms@end: wall time "
                f"per chunk around chunk 20 / over the last 10):")
        rep.say(HEADER)
        r = measure(gen, args.cache, max(2, args.baseline_chunks), pipelined=False, deadline=deadline)
        record({**common, "decoder": "wan", "attention": "sdpa", "compiled": False, **r})
    gen.use_attention(args.attention)

    # 2. measured rows: compile once (with the TAEHV decoder in place when it is measured, so it compiles too)
    taehv_path = args.taehv_weights
    tmp = None
    if "taehv" in args.decoders and taehv_path is None:
        tmp = tempfile.TemporaryDirectory()
        taehv_path = os.path.join(tmp.name, "taew2_1-random.pth")
        write_random_taehv(Path(taehv_path), p.vae.z_dim)
    compile_on = default_enabled(device) if args.compile is None else args.compile

    def measured_row(decoder: str, chunks: int) -> None:
        if time.perf_counter() > deadline:
            rep.say(f"skipped decoder {decoder} ({'compiled' if gen.compiled else 'eager'}): time budget of "
                    f"{args.minutes} min spent")
            return
        gen.use_decoder(decoder, taehv_path if decoder == "taehv" else None)
        gen.warmup()                                      # one chunk: the new decoder's first call
        r = measure(gen, args.cache, chunks, pipelined=not args.serial, deadline=deadline)
        record({**common, "decoder": decoder, "attention": gen.attention_backend, "compiled": gen.compiled, **r})

    try:
        if not args.baseline_chunks:
            rep.say(HEADER)
        if compile_on and args.eager_chunks:   # the same rows uncompiled first: numbers even if compile is slow
            for decoder in args.decoders:
                measured_row(decoder, max(2, args.eager_chunks))
        if compile_on and time.perf_counter() < deadline:
            if "taehv" in args.decoders:
                gen.use_decoder("taehv", taehv_path)
            t = time.perf_counter()
            try:
                info = compile_generator(gen, CompileConfig(backend=args.compile_backend, mode=args.compile_mode,
                                                               cache=args.cache))
                rep.say(f"compiled ({args.compile_mode}) and warmed up over {info['chunks']} chunks in "
                        f"{info['seconds']:.1f} s (first chunk {info['first_chunk_s']:.1f} s, steady "
                        f"{info['steady_chunk_s']:.3f} s)")
            except Exception as exc:  # noqa: BLE001 - report and measure uncompiled rather than lose the run
                from packcache.compile import uncompile_generator
                uncompile_generator(gen)
                rep.say(f"compile failed after {time.perf_counter() - t:.1f} s ({type(exc).__name__}: {exc}); "
                        "measuring uncompiled")
                log.exception("compile failed")
        for decoder in args.decoders:     # compiled; or, when compile is off or failed, the long eager rows
            measured_row(decoder, args.chunks)
    finally:
        if tmp is not None:
            tmp.cleanup()
    rep.say(f"total {time.perf_counter() - started:.0f} s; rows in {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
