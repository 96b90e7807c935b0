"""The paper's ablations in miniature, on the toy world: selection, sink, compression, and the two baselines.

    python -m toyworld.ablate                   # writes toyworld/eval/ABLATIONS.md, ablations.json, ablations.png
    python -m toyworld.ablate --quick           # a smoke test: fewer trials, 10 s instead of 120 s
    python -m toyworld.ablate --variants window,full --out /tmp/a    # a subset (e.g. one process per core) ...
    python -m toyworld.ablate --merge /tmp/a /tmp/b                  # ... merged into one report

Variants (one row each): packed top-k with the shipped `hr+lr` compressor, packed FIFO selection, packed without a
sink, the compressor as `hr`, `lr` and `pool`, the sink + sliding `window`, and `full` history. Each runs

* the memory test (`toyworld/memory.py`): a subject seen after the sink, gone for longer than the recent window,
  then a prompt that names no colour: `memory_recall` is the share of generated chunks in the subject's colour,
  `subject_drawn` the share with any subject at all (a model that continues the empty gap recalls nothing either),
  and for packed top-k rows `memory_recall_forced`, the same trials with the subject's blocks forced into the
  selection (`memory.force_selection`): whether the model reads them, apart from whether top-k picks them;
* the 120 s extrapolation (24x the 5 s training clips, as `toyworld.evaluate`): `subject_consistency` is colour and
  shape agreement with the first second, averaged over 10 s windows; K/V KiB, attended tokens per layer and
  seconds per chunk at the end of it;
* the same length from a start picture with an empty prompt (`toyworld.start_image`'s subjects): `picture_kept` is
  the share of chunks in the picture's colour. Here nothing but the stream's own memory holds the subject; in the
  text extrapolation the prompt, re-read every chunk, pins it whatever the cache keeps (no sink loses nothing
  there), so this is where the sink's and the full history's part show;
* prompt following on a few of the evaluation's prompts (share of chunks in the prompt's colour).

The strip PNG has one row per variant: the memory test's generated chunks (first trial, one frame each), then one
frame every 10 s of the extrapolation, then of the first start picture's run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
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
                prompt_chunks: int, pictures: list[int]) -> tuple[dict, dict]:
    from .evaluate import long_run, prompt_following
    from .start_image import keep_picture
    # the same script for every variant: the shipped preset's sink and gap (no sink: those chunks go to the bank)
    sink, gap = gen.preset.cache.sink_chunks, memory_gap(gen.preset)
    with applied(gen, v):
        mem = [MEM.run_trial(gen, t, cache=v.cache, sink=sink, gap=gap, probe=probe, seed=i)
               for i, t in enumerate(trials)]
        # the same trials with the subject's blocks forced into the selection: does the model read them at all?
        forced = ([MEM.run_trial(gen, t, cache=v.cache, sink=sink, gap=gap, probe=probe, seed=i, force_subject=True)
                   for i, t in enumerate(trials)] if v.cache == "packed" and gen.preset.cache.selection == "topk"
                  else None)
        t0 = time.perf_counter()
        long = long_run(gen, v.cache, seconds)
        windows = M.window_report(long["frames"], window_s=10.0)
        kept = [keep_picture(gen, i, v.cache, seconds) for i in pictures]
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
        "memory_recall_forced": float(np.mean([m["recall"] for m in forced])) if forced else None,
        "subject_drawn": float(np.mean([m["drawn"] for m in mem])),
        "subject_blocks_selected": _mean_or_none([m["subject_selected"] for m in mem]),
        "prompt_following": follow,
        "kv_kib": kv / 1024,
        "attended_tokens": attended,
        "s_per_chunk": long["wall_s"] / long["chunks"],
        "subject_last_10s": windows[-1]["subject_consistency"],
        "picture_kept": _mean_or_none([k["kept"] for k in kept]),
        "picture_last_10s": _mean_or_none([k["last_10s"] for k in kept]),
        "picture_colours": {k["subject"]: " ".join(str(c) for c in k["colors"]) for k in kept},
        "memory_colours": [" ".join(str(g) for g in m["got"]) for m in mem],
        "seconds": len(long["frames"]) / gen.fps,
    }
    strip = {"memory": mem[0]["frames"], "long": long["frames"], "picture": kept[0]["frames"] if kept else None}
    return row, strip


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def strip_row(s: dict, probe_frames: int, every_s: float = 10.0, fps: int = 16, scale: int = 2) -> np.ndarray:
    """One variant's strip: a frame per generated memory-test chunk, a gap, a frame every 10 s of the long run, a
    gap, a frame every 10 s of the picture run."""
    mem = [s["memory"][i] for i in range(0, len(s["memory"]), probe_frames)]
    step = int(every_s * fps)
    tiles = [np.pad(f, ((2, 2), (2, 2), (0, 0)), constant_values=255) for f in mem]
    for run in (s["long"], s.get("picture")):
        if run is None:
            continue
        tiles.append(np.full((mem[0].shape[0] + 4, 8, 3), 255, np.uint8))
        tiles += [np.pad(run[i], ((2, 2), (2, 2), (0, 0)), constant_values=255) for i in range(0, len(run), step)]
    row = np.concatenate(tiles, axis=1)
    return row.repeat(scale, axis=0).repeat(scale, axis=1)


COLUMNS = [("variant", "variant", ""), ("setting", "cache", ""), ("memory_recall", "memory recall", ".2f"),
           ("memory_recall_forced", "recall, subject's blocks forced", ".2f"),
           ("subject_drawn", "probe chunks with a subject", ".2f"),
           ("subject_blocks_selected", "subject blocks selected", ".2f"),
           ("subject_consistency", "subject consistency", ".2f"), ("subject_last_10s", "subject, last 10 s", ".2f"),
           ("picture_kept", "picture kept, no prompt", ".2f"), ("picture_last_10s", "picture, last 10 s", ".2f"),
           ("prompt_following", "prompt following", ".0%"), ("kv_kib", "K/V KiB", ".0f"),
           ("attended_tokens", "attended tokens", ""), ("s_per_chunk", "s/chunk", ".3f")]


def write_report(rows: list[dict], meta: dict, out: Path, strip_rows: list[np.ndarray]) -> str:
    """ablations.json, ABLATIONS.md and ablations.png (one strip row per table row) under `out`."""
    from PIL import Image

    from .evaluate import md_table
    out.mkdir(parents=True, exist_ok=True)
    width = max(r.shape[1] for r in strip_rows)
    strip = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                            for r in strip_rows])
    Image.fromarray(strip).save(out / "ablations.png")
    (out / "ablations.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    m = meta["memory"]
    md = [f"# Ablations on the toy world\n\n`{meta['command'].strip()}`: preset {meta['preset']}, torch threads "
          f"{meta['threads']}, {meta['wall_s']:.0f} s of wall time. Memory test: {m['trials']} trials, the subject in "
          f"view for {m['seen']} chunks after {m['sink']} empty sink chunks, then {m['gap']} empty chunks, then "
          f"{m['probe']} generated chunks under a prompt without a colour (chance about 0.12). Extrapolation: "
          f"{meta['seconds']:.0f} s, subject consistency averaged over 10 s windows; from a start picture with an "
          f"empty prompt ({meta.get('pictures', 0)} subjects of `toyworld.start_image`), the share of chunks in the "
          "picture's colour. Prompt following: "
          f"{meta['prompt_following']['prompts']} prompts x {meta['prompt_following']['chunks']} chunks. Strip: "
          "`ablations.png` (rows in table order; the memory test's generated chunks, a gap, then one frame every "
          "10 s of the extrapolation, a gap, one frame every 10 s of the first start picture's run).\n"]
    if meta.get("parts"):
        md.append("Merged from runs in parallel processes: " + "; ".join(meta["parts"]) + ".\n")
    md += [md_table(rows, COLUMNS), ""]
    text = "\n".join(md) + "\n"
    (out / "ABLATIONS.md").write_text(text)
    return text


def merge(dirs: list[Path], out: Path, command: str) -> str:
    """One report from runs of variant subsets: rows in the standard order, strip rows with them."""
    from PIL import Image
    rows, strips, metas, parts = [], {}, [], []
    for d in dirs:
        data = json.loads((d / "ablations.json").read_text())
        metas.append(data["meta"])
        parts.append(f"`{data['meta']['command'].strip()}` ({', '.join(r['variant'] for r in data['rows'])})")
        img = np.asarray(Image.open(d / "ablations.png").convert("RGB"))
        h = img.shape[0] // len(data["rows"])
        for k, r in enumerate(data["rows"]):
            rows.append(r)
            strips[r["variant"]] = img[k * h:(k + 1) * h]
    order = [v.name for v in VARIANTS]
    rows.sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    meta = dict(metas[0], command=command.strip(), parts=parts, wall_s=sum(m["wall_s"] for m in metas))
    return write_report(rows, meta, out, [strips[r["variant"]] for r in rows])


def main(argv=None) -> int:
    from .evaluate import PROMPTS, load_generator
    ap = argparse.ArgumentParser(prog="python -m toyworld.ablate", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "eval")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the extrapolation runs")
    ap.add_argument("--trials", type=int, default=4, help="memory-test trials per variant")
    ap.add_argument("--variants", default=",".join(KEYS), help=f"comma-separated, of {', '.join(KEYS)}")
    ap.add_argument("--preset", default="toy", help="toy (shipped weights) or tiny (random, for tests)")
    ap.add_argument("--quick", action="store_true", help="2 trials, 10 s, 2 prompts: a smoke test")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="DIR", help="merge the reports of earlier runs")
    ap.add_argument("--weights", type=Path, default=None,
                    help="a toy bundle .safetensors to ablate (default: the shipped toy weights)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = "python -m toyworld.ablate " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        missing = [str(d) for d in args.merge if not (d / "ablations.json").is_file()]
        if missing:
            ap.error(f"no ablations.json in {', '.join(missing)}")
        print(merge(args.merge, args.out, command))
        return 0
    unknown = [k for k in args.variants.split(",") if k not in KEYS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(KEYS)}")
    import torch
    torch.set_num_threads(args.threads)
    if args.weights is not None and (args.preset != "toy" or not args.weights.is_file()):
        ap.error("--weights takes a toy bundle file that exists (with --preset toy)")
    if args.preset == "toy":
        gen = load_generator(args.weights)
    else:
        from packcache import Generator
        gen = Generator.from_preset(args.preset, device="cpu")
    from .start_image import SUBJECTS
    trials, probe, seconds, prompts, prompt_chunks = MEM.trials(args.trials), 3, args.seconds, PROMPTS[::4], 3
    pictures = list(range(len(SUBJECTS)))
    if args.quick:
        trials, probe, seconds, prompts, prompt_chunks = MEM.trials(2), 2, min(seconds, 10.0), PROMPTS[:2], 2
        pictures = pictures[:1]
    wanted = [KEYS[k] for k in args.variants.split(",")]
    variants = [v for v in VARIANTS if v.name in wanted]
    if gen.compressor.hr is None:   # random-weight presets have no trained HR branch
        variants = [v for v in variants if "hr" not in (v.compression or gen.preset.compressor.mode)]
    rows, strips = [], {}
    start = time.perf_counter()
    for v in variants:
        row, strip = run_variant(gen, v, trials, probe, seconds, prompts, prompt_chunks, pictures)
        rows.append(row)
        strips[v.name] = strip
        log.info("%s", {k: row[k] for k in ("variant", "memory_recall", "subject_consistency", "picture_kept",
                                                "prompt_following", "kv_kib", "attended_tokens", "s_per_chunk")})
    wall = time.perf_counter() - start
    frames_per_chunk = gen.preset.cache.chunk_frames * gen.preset.vae.temporal_stride
    c = gen.preset.cache
    meta = {"command": command, "preset": gen.preset.name, "threads": args.threads, "wall_s": wall,
            "weights": str(args.weights) if args.weights else "shipped",
            "seconds": seconds,
            "memory": {"trials": len(trials), "sink": c.sink_chunks, "seen": 3, "gap": memory_gap(gen.preset),
                       "probe": probe, "prompts": [t.prompt for t in trials], "colours": [t.color for t in trials]},
            "pictures": len(pictures), "prompt_following": {"prompts": len(prompts), "chunks": prompt_chunks}}
    print(write_report(rows, meta, args.out, [strip_row(strips[r["variant"]], frames_per_chunk) for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
