"""Start a toy stream from a picture: does it keep the picture's subject, and does a prompt override it?

    python -m toyworld.start_image              # all subjects in one process; writes toyworld/eval/START.md
    python -m toyworld.start_image --subjects 0 & ... --subjects 2; python -m toyworld.start_image --report

For each subject (a colour and a shape, rendered by the world itself at frame 0) the stream starts from that one
frame with an **empty prompt** and runs 120 s with the packed cache, 60 s with window and full. Each chunk's
subject colour is read with the world's exact metric (`toyworld.metrics.dominant_color`); the table gives the share
of chunks in the picture's colour, by cache, and by 10 s window, with the preset's context guidance
(`SamplerConfig.context_guidance`, 2 on the toy preset); an ablation runs the packed cache without it. Then each
start frame is combined with a prompt asking for another colour: the prompt should win within 2 chunks. The time to
the first chunk is compared with a text-only stream's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import metrics as M
from .world import render, single_shape_scene

log = logging.getLogger("toyworld.start_image")

SUBJECTS = [("red", "circle", "stripes", "blue"), ("green", "square", "solid", "gray"),
            ("blue", "triangle", "checker", "black")]
SWITCH_TO = {"red": "a blue circle bouncing on a striped blue background",
             "green": "a pink square drifting on a plain gray background",
             "blue": "a yellow triangle orbiting on a checkered black background"}
TEXT_PROMPT = "a red circle bouncing on a striped blue background"
OUT = Path(__file__).resolve().parent / "eval"


def start_frame(color: str, shape: str, background: str, bg_color: str, seed: int) -> np.ndarray:
    scene = single_shape_scene(color, shape=shape, background=background, bg_color=bg_color, seed=seed)
    return render(scene, 0, 1, 64)[0]


def stream(gen, prompt: str, start: np.ndarray | None, cache: str, chunks: int, seed: int) -> dict:
    t0 = time.perf_counter()
    s = gen.open(prompt, seed=seed, cache=cache, start=start)
    colors, frames, first_s = [], [], None
    for i in range(chunks):
        c = s.next_chunk()
        if first_s is None:
            first_s = time.perf_counter() - t0
        colors.append(M.dominant_color(c))
        frames.append(c)
        if (i + 1) % 40 == 0:
            log.info("  %s chunk %d/%d", cache, i + 1, chunks)
    st = s.stats()
    s.close()
    return {"colors": colors, "frames": np.concatenate(frames), "first_chunk_s": first_s,
            "wall_s": time.perf_counter() - t0, "kv_bytes": st.get("kv_bytes", 0)}


def chunks_for(seconds: float, fps: int, per_chunk: int = 12) -> int:
    """Chunks of a stream of `seconds` (the first chunk has 9 frames, the others `per_chunk`)."""
    return int(np.ceil((seconds * fps - 9) / per_chunk)) + 1


def keep_picture(gen, i: int, cache: str, seconds: float) -> dict:
    """SUBJECTS[i]'s start picture with an empty prompt for `seconds` under `cache`: nothing but the stream's own
    memory holds the subject (the picture is its first chunk, the sink). `stream`'s result plus `kept` (share of
    chunks in the picture's colour), `last_10s` and `by_10s`."""
    color, shape, bg, bgc = SUBJECTS[i]
    img = start_frame(color, shape, bg, bgc, seed=i)
    assert M.dominant_color(img) == color, "the rendered start frame must measure as its colour"
    r = stream(gen, "", img, cache, chunks_for(seconds, gen.fps), seed=10 + i)
    win = int(10 * gen.fps / 12)
    return dict(r, start=img, subject=f"{color} {shape}", kept=kept(r["colors"], color),
                last_10s=kept(r["colors"][-win:], color), by_10s=by_window(r["colors"], color, win))


def kept(colors: list, want: str) -> float:
    return sum(c == want for c in colors) / max(1, len(colors))


def by_window(colors: list, want: str, chunks_per_window: int) -> list[float]:
    return [kept(colors[i:i + chunks_per_window], want) for i in range(0, len(colors), chunks_per_window)]


def save_strip(rows: list[tuple[np.ndarray, np.ndarray]], path: Path, every: int, scale: int = 2) -> None:
    """One row per run: the start frame, a gap, then one frame every `every` frames."""
    from PIL import Image
    pad = lambda f: np.pad(f, ((2, 2), (2, 2), (0, 0)), constant_values=255)   # noqa: E731
    out = []
    for start, frames in rows:
        cells = [pad(start), np.full((68, 8, 3), 255, np.uint8)] + [pad(frames[i]) for i in range(0, len(frames), every)]
        out.append(np.concatenate(cells, axis=1))
    width = max(r.shape[1] for r in out)
    out = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in out]
    img = Image.fromarray(np.concatenate(out, axis=0))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="the packed cache's run")
    ap.add_argument("--other-seconds", type=float, default=60.0, help="the window and full caches' runs")
    ap.add_argument("--ablation-seconds", type=float, default=120.0, help="packed without context guidance")
    ap.add_argument("--switch-chunks", type=int, default=6)
    ap.add_argument("--context-guidance", type=float, default=None,
                    help="SamplerConfig.context_guidance for the long runs (default: the preset's; the ablation "
                         "runs without)")
    ap.add_argument("--caches", default="packed,window,full")
    ap.add_argument("--subjects", default=",".join(str(i) for i in range(len(SUBJECTS))),
                    help="indices into SUBJECTS; run them in separate processes, then --report")
    ap.add_argument("--report", action="store_true", help="only assemble START.md and the strip from the parts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    caches = args.caches.split(",")
    if not args.report:
        torch.set_num_threads(args.threads)
        for i in (int(k) for k in args.subjects.split(",")):
            run_subject(i, args, caches, out)
    parts = sorted(out.glob("start_part*.json"))
    res = {"seconds": args.seconds, "other_seconds": args.other_seconds, "long": [], "ablation": [], "switch": [],
           "text_first_chunk_s": [], "context_guidance": None}
    rows = []
    for part in parts:
        r = json.loads(part.read_text())
        for key in ("long", "ablation", "switch"):
            res[key] += r[key]
        res["text_first_chunk_s"].append(r["text_first_chunk_s"])
        res["context_guidance"] = r.get("context_guidance")
        with np.load(part.with_suffix(".npz")) as z:
            rows += [(z["start"], z[f"row{k}"]) for k in range(len(r["long"]))]
    (out / "start.json").write_text(json.dumps(res, indent=1, default=str))
    save_strip(rows, out / "start_strip.png", every=1)
    (out / "START.md").write_text(report(res, caches))
    print(report(res, caches))
    return 0


def run_subject(i: int, args, caches: list[str], out: Path) -> None:
    """One subject: its long runs, the ablation and the prompt switch -> start_part<i>.json / .npz."""
    from packcache import Generator
    from packcache.sampler import FlowSampler

    from .evaluate import sampler_settings
    gen = Generator.from_preset("toy", device="cpu")
    # the long runs and the switch use --context-guidance, by default the preset's
    if args.context_guidance is not None:
        gen.sampler = FlowSampler(replace(gen.sampler.config, context_guidance=args.context_guidance))
    gen.warmup()
    fps = gen.fps
    color, shape, _, _ = SUBJECTS[i]
    res: dict = {"long": [], "ablation": [], "switch": [], "context_guidance": gen.sampler.config.context_guidance}
    res["text_first_chunk_s"] = stream(gen, TEXT_PROMPT, None, "packed", 1, seed=0)["first_chunk_s"]
    img = start_frame(*SUBJECTS[i], seed=i)
    strip = {"start": img}
    for k, cache in enumerate(caches):
        log.info("%s %s, empty prompt, %s", color, shape, cache)
        r = keep_picture(gen, i, cache, args.seconds if cache == "packed" else args.other_seconds)
        res["long"].append({"subject": r["subject"], "cache": cache, "seconds": len(r["frames"]) / fps,
                            "kept": r["kept"], "last_10s": r["last_10s"], "by_10s": r["by_10s"],
                            "colors": r["colors"], "first_chunk_s": r["first_chunk_s"], "wall_s": r["wall_s"],
                            "kv_bytes": r["kv_bytes"]})
        log.info("  kept %.0f%%", 100 * r["kept"])
        strip[f"row{k}"] = r["frames"][::10 * fps]
    with sampler_settings(gen, context_guidance=1.0):
        r = stream(gen, "", img, "packed", chunks_for(args.ablation_seconds, fps), seed=10 + i)
    res["ablation"].append({"subject": f"{color} {shape}", "kept": kept(r["colors"], color), "colors": r["colors"]})
    want = M.prompt_color(SWITCH_TO[color])
    r = stream(gen, SWITCH_TO[color], img, "packed", args.switch_chunks, seed=20 + i)
    lag = next((k + 1 for k, c in enumerate(r["colors"]) if c == want), None)
    res["switch"].append({"subject": f"{color} {shape}", "prompt": SWITCH_TO[color], "want": want,
                          "colors": r["colors"], "chunks_to_switch": lag,
                          "kept_after": kept(r["colors"][(lag or 1) - 1:], want) if lag else 0.0})
    (out / f"start_part{i}.json").write_text(json.dumps(res, indent=1, default=str))
    np.savez_compressed(out / f"start_part{i}.npz", **strip)


def report(res: dict, caches: list[str]) -> str:
    lines = ["# Starting a toy stream from a picture (empty prompt)", "",
             "Generated by `python -m toyworld.start_image` (one torch thread per process). Colour = the world's "
             "exact metric (`toyworld.metrics.dominant_color`) per 12-frame chunk. Context guidance "
             f"(`SamplerConfig.context_guidance`): {res.get('context_guidance')}.", "",
             "| subject | cache | seconds | chunks in the picture's colour | last 10 s | first chunk s | by 10 s window |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in res["long"]:
        lines.append(f"| {r['subject']} | {r['cache']} | {r['seconds']:.0f} | {100 * r['kept']:.0f}% | "
                     f"{100 * r['last_10s']:.0f}% | "
                     f"{r['first_chunk_s']:.2f} | {' '.join(f'{100 * v:.0f}' for v in r['by_10s'])} |")
    for cache in caches:
        rows = [r["kept"] for r in res["long"] if r["cache"] == cache]
        lines.append(f"| **all** | **{cache}** | | **{100 * np.mean(rows):.0f}%** | | | |")
    text_s = ", ".join(f"{t:.2f}" for t in res["text_first_chunk_s"])
    lines += ["", f"Text-only stream, time to its first chunk (open + first chunk, same processes): {text_s} s.", "",
              "Ablation, packed without context guidance (`context_guidance=1`), first "
              f"{len(res['ablation'][0]['colors'])} chunks:", "",
              "| subject | chunks in the picture's colour | colours |", "|---|---:|---|"]
    for r in res["ablation"]:
        lines.append(f"| {r['subject']} | {100 * r['kept']:.0f}% | {' '.join(str(c) for c in r['colors'][:12])} … |")
    lines += ["", "Start picture plus a prompt of another colour (packed):", "",
              "| start | prompt | chunks to the prompt's colour | share after | colours |", "|---|---|---:|---:|---|"]
    for r in res["switch"]:
        lines.append(f"| {r['subject']} | {r['prompt']} | {r['chunks_to_switch'] or 'never'} | "
                     f"{100 * r['kept_after']:.0f}% | {' '.join(str(c) for c in r['colors'])} |")
    lines += ["", "Strip (`start_strip.png`): per row the start frame, then one frame every 10 s; rows are the "
              f"subjects in order, each with the caches {', '.join(caches)}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
