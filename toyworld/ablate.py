"""The paper's ablations in miniature, on the toy world: selection, sink, compression, and the two baselines.

    python -m toyworld.ablate                   # writes toyworld/eval/ABLATIONS.md, ablations.json, ablations.png
    python -m toyworld.ablate --quick           # a smoke test: fewer trials, 10 s instead of 120 s

Variants (one row each): packed top-k with the shipped `hr+lr` compressor, packed FIFO selection, packed without a
sink, the compressor as `hr`, `lr` and `pool`, the sink + sliding `window`, and `full` history. Each runs

* the memory test (`toyworld/memory.py`): a subject seen after the sink, gone for longer than the recent window,
  then a prompt that names no colour: `memory_recall` is the share of generated chunks in the subject's colour;
* the 120 s extrapolation (24x the 5 s training clips, as `toyworld.evaluate`): `subject_consistency` is colour and
  shape agreement with the first second, averaged over 10 s windows; K/V KiB, attended tokens per layer and
  seconds per chunk at the end of it;
* prompt following on a few of the evaluation's prompts (share of chunks in the prompt's colour).

The strip PNG has one row per variant: the memory test's generated chunks (first trial, one frame each), then one
frame every 10 s of the extrapolation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import memory as MEM
from . import metrics as M

HERE = Path(__file__).resolve().parent
log = logging.getLogger("toyworld.ablate")


@dataclass(frozen=True)
class Variant:
    name: str
    cache: str = "packed"                          # packed | window | full
    overrides: dict = field(default_factory=dict)  # CacheConfig fields
    compression: str | None = None                 # None: the preset's


VARIANTS = [
    Variant("packed top-k"),
    Variant("packed fifo", overrides={"selection": "fifo"}),
    Variant("no sink", overrides={"sink_chunks": 0}),
    Variant("hr", compression="hr"),
    Variant("lr", compression="lr"),
    Variant("pool", compression="pool"),
    Variant("window", cache="window"),
    Variant("full", cache="full"),
]
KEYS = {"topk": "packed top-k", "fifo": "packed fifo", "nosink": "no sink", "hr": "hr", "lr": "lr",
        "pool": "pool", "window": "window", "full": "full"}


@contextlib.contextmanager
def applied(gen, v: Variant):
    """Swap the generator's cache settings and compressor for one variant (restored afterwards)."""
    from packcache.compress import MidCompressor
    preset, comp = gen.preset, gen.compressor
    try:
        p = preset.with_cache(**v.overrides) if v.overrides else preset
        mode = v.compression or preset.compressor.mode
        if mode != comp.mode:
            p = replace(p, compressor=replace(p.compressor, mode=mode))
            new = MidCompressor(p.compressor, gen.model.dim, gen.model.patch_embedding, gen.vae)
            if new.hr is not None:
                if comp.hr is None:
                    raise ValueError(f"{v.name}: the HR branch needs trained weights the generator does not have")
                new.hr.load_state_dict(comp.hr.state_dict())
            gen.compressor = new.to(device=gen.device, dtype=gen.dtype).eval().requires_grad_(False)
        gen.preset = p
        yield gen
    finally:
        gen.preset, gen.compressor = preset, comp


def memory_gap(preset) -> int:
    """Empty chunks after the subject: enough that neither the window nor FIFO's newest blocks can still see it."""
    c = preset.cache
    return max(c.window_chunks, c.recent_chunks + c.mid_topk)


def run_variant(gen, v: Variant, trials: list, probe: int, seconds: float, prompts: list[str],
                prompt_chunks: int) -> tuple[dict, dict]:
    from .evaluate import long_run, prompt_following
    # the same script for every variant: the shipped preset's sink and gap (no sink: those chunks go to the bank)
    sink, gap = gen.preset.cache.sink_chunks, memory_gap(gen.preset)
    with applied(gen, v):
        mem = [MEM.run_trial(gen, t, cache=v.cache, sink=sink, gap=gap, probe=probe, seed=i)
               for i, t in enumerate(trials)]
        t0 = time.perf_counter()
        long = long_run(gen, v.cache, seconds)
        windows = M.window_report(long["frames"], window_s=10.0)
        _, follow = prompt_following(gen, prompts, chunks=prompt_chunks, cache=v.cache)
        log.info("%s: %.0f s", v.name, time.perf_counter() - t0)
        c = gen.preset.cache
        setting = ("full history" if v.cache == "full" else
                   f"sink {c.sink_chunks}, window {c.window_chunks}" if v.cache == "window" else
                   f"sink {c.sink_chunks}, {c.selection} {c.mid_topk} of {c.mid_capacity}, recent {c.recent_chunks}, "
                   f"{gen.compressor.mode}")
    kv, attended = long["kv"][long["chunks"]]
    row = {
        "variant": v.name,
        "setting": setting,
        "subject_consistency": float(np.mean([w["subject_consistency"] for w in windows])),
        "memory_recall": float(np.mean([m["recall"] for m in mem])),
        "prompt_following": follow,
        "kv_kib": kv / 1024,
        "attended_tokens": attended,
        "s_per_chunk": long["wall_s"] / long["chunks"],
        "subject_last_10s": windows[-1]["subject_consistency"],
        "memory_colours": [" ".join(str(g) for g in m["got"]) for m in mem],
        "seconds": len(long["frames"]) / gen.fps,
    }
    strip = {"memory": mem[0]["frames"], "long": long["frames"]}
    return row, strip


def save_strip(strips: dict[str, dict], path: Path, probe_frames: int, every_s: float = 10.0, fps: int = 16,
               scale: int = 2) -> None:
    from PIL import Image
    rows = []
    for s in strips.values():
        mem = [s["memory"][i] for i in range(0, len(s["memory"]), probe_frames)]
        long = [s["long"][i] for i in range(0, len(s["long"]), int(every_s * fps))]
        tiles = [np.pad(f, ((2, 2), (2, 2), (0, 0)), constant_values=255) for f in mem]
        tiles.append(np.full((mem[0].shape[0] + 4, 8, 3), 255, np.uint8))
        tiles += [np.pad(f, ((2, 2), (2, 2), (0, 0)), constant_values=255) for f in long]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    img = Image.fromarray(np.concatenate(rows, axis=0))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


COLUMNS = [("variant", "variant", ""), ("setting", "cache", ""), ("memory_recall", "memory recall", ".2f"),
           ("subject_consistency", "subject consistency", ".2f"), ("subject_last_10s", "subject, last 10 s", ".2f"),
           ("prompt_following", "prompt following", ".0%"), ("kv_kib", "K/V KiB", ".0f"),
           ("attended_tokens", "attended tokens", ""), ("s_per_chunk", "s/chunk", ".3f")]


def main(argv=None) -> int:
    from .evaluate import PROMPTS, load_generator, md_table
    ap = argparse.ArgumentParser(prog="python -m toyworld.ablate", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "eval")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the extrapolation runs")
    ap.add_argument("--trials", type=int, default=4, help="memory-test trials per variant")
    ap.add_argument("--variants", default=",".join(KEYS), help=f"comma-separated, of {', '.join(KEYS)}")
    ap.add_argument("--preset", default="toy", help="toy (shipped weights) or tiny (random, for tests)")
    ap.add_argument("--quick", action="store_true", help="2 trials, 10 s, 2 prompts: a smoke test")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = [k for k in args.variants.split(",") if k not in KEYS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(KEYS)}")
    import torch
    torch.set_num_threads(args.threads)
    if args.preset == "toy":
        gen = load_generator()
    else:
        from packcache import Generator
        gen = Generator.from_preset(args.preset, device="cpu")
    trials, probe, seconds, prompts, prompt_chunks = MEM.trials(args.trials), 3, args.seconds, PROMPTS[::4], 3
    if args.quick:
        trials, probe, seconds, prompts, prompt_chunks = MEM.trials(2), 2, min(seconds, 10.0), PROMPTS[:2], 2
    wanted = [KEYS[k] for k in args.variants.split(",")]
    variants = [v for v in VARIANTS if v.name in wanted]
    if gen.compressor.hr is None:   # random-weight presets have no trained HR branch
        variants = [v for v in variants if "hr" not in (v.compression or gen.preset.compressor.mode)]
    rows, strips = [], {}
    start = time.perf_counter()
    for v in variants:
        row, strip = run_variant(gen, v, trials, probe, seconds, prompts, prompt_chunks)
        rows.append(row)
        strips[v.name] = strip
        log.info("%s", {k: row[k] for k in ("variant", "memory_recall", "subject_consistency", "prompt_following",
                                                "kv_kib", "attended_tokens", "s_per_chunk")})
    wall = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    frames_per_chunk = gen.preset.cache.chunk_frames * gen.preset.vae.temporal_stride
    save_strip(strips, args.out / "ablations.png", frames_per_chunk)
    c = gen.preset.cache
    meta = {"command": "python -m toyworld.ablate " + " ".join(argv if argv is not None else []),
            "preset": gen.preset.name, "threads": args.threads, "wall_s": wall, "seconds": seconds,
            "memory": {"trials": len(trials), "sink": c.sink_chunks, "seen": 3, "gap": memory_gap(gen.preset),
                       "probe": probe, "prompts": [t.prompt for t in trials], "colours": [t.color for t in trials]},
            "prompt_following": {"prompts": len(prompts), "chunks": prompt_chunks}}
    (args.out / "ablations.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = [f"# Ablations on the toy world\n\n`{meta['command'].strip()}`: preset {gen.preset.name}, torch threads "
          f"{args.threads}, {wall:.0f} s. Memory test: {len(trials)} trials, subject in view for 3 chunks after "
          f"{c.sink_chunks} empty sink chunks, then {memory_gap(gen.preset)} empty chunks, then {probe} generated "
          f"chunks under a prompt without a colour (chance about 0.12). Extrapolation: {seconds:.0f} s. Prompt "
          f"following: {len(prompts)} prompts x {prompt_chunks} chunks. Strip: `ablations.png` (rows in table "
          "order; the memory test's generated chunks, a gap, then one frame every 10 s).\n",
          md_table(rows, COLUMNS), ""]
    (args.out / "ABLATIONS.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
