"""Does the model draw what the prompt says, beyond its colour? Per chunk over a stream: one subject, its shape,
its motion, the background's colour and pattern (issue 16). Called by `toyworld.evaluate` (stage `scene`).

Prompt sets: the evaluation's 20 prompts; a grid of 24 scenes (every shape x every pattern twice, motions and
colours cycled) in the grammar's canonical wording; the same scenes in paraphrases drawn from the grammar; and
four families that vary one attribute with the rest fixed (shape, background pattern, background colour, motion),
each drawn as a strip PNG in toyworld/eval/ so a reader sees what the numbers mean.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from . import metrics as M
from .scene_check import confusion, confusion_md
from .world import (BACKGROUND_COLORS, BACKGROUNDS, MOTIONS, SHAPE_COLORS, SHAPES, SHIPPED_WORLD, WORLD_STYLES, caption,
                    render, single_shape_scene)

CHUNKS = 8
MOTION_CHUNKS = 4          # the motion word is read over 4 chunks (3 s): one chunk is too short (scene_check)
_PATTERN_WORD = {"solid": "plain", "gradient": "gradient", "stripes": "striped", "checker": "checkered"}
_MOTION_WORD = {"bounce": "bouncing", "orbit": "orbiting", "drift": "drifting", "zigzag": "zigzagging"}


def grid_scenes() -> list:
    """24 one-subject scenes: every shape under every pattern twice; colours, motions, background colours cycled."""
    out = []
    bg_colors, colors = list(BACKGROUND_COLORS), list(SHAPE_COLORS)
    for i in range(24):
        shape, kind = SHAPES[i % 3], BACKGROUNDS[(i // 3) % 4]
        out.append(single_shape_scene(colors[(i * 3) % 8], shape=shape, motion=MOTIONS[(i + i // 4) % 4],
                                      background=kind, bg_color=bg_colors[(i * 5 + 1) % 8], seed=i))
    return out


def families() -> dict[str, list[str]]:
    """One attribute varied, the rest fixed: the strips' rows."""
    return {
        "shape": [f"a red {s} bouncing on a plain gray background" for s in SHAPES],
        "pattern": [f"a yellow circle bouncing on a {_PATTERN_WORD[k]} blue background" for k in BACKGROUNDS],
        "bg_color": [f"a red square drifting on a plain {c} background" for c in BACKGROUND_COLORS],
        "motion": [f"a green circle {_MOTION_WORD[m]} on a plain black background" for m in MOTIONS],
    }


def prompt_sets(quick: bool = False) -> dict[str, list[str]]:
    from .evaluate import PROMPTS
    rng = np.random.default_rng(16)
    scenes = grid_scenes()
    sets = {"evaluation prompts": PROMPTS, "grid, canonical": [caption(s) for s in scenes],
            "grid, paraphrased": [caption(s, rng) for s in scenes]}
    if quick:
        sets = {k: v[::6] for k, v in sets.items()}
    return sets


def run_prompt(gen, prompt: str, seed: int, chunks: int = CHUNKS,
               cache: str = "packed") -> tuple[dict, list[np.ndarray]]:
    """Generate `chunks` chunks and read each: (the per-chunk verdicts against what the prompt asks for, the
    chunks' frames)."""
    want = M.prompt_scene(prompt)
    s = gen.open(prompt, seed=seed, cache=cache)
    frames = [s.next_chunk() for _ in range(chunks)]
    s.close()
    return {"prompt": prompt, "want": want, **read_chunks(frames, want)}, frames


def read_chunks(chunks: list[np.ndarray], want: dict) -> dict:
    """Per chunk: share of one-subject frames, shape, background colour and pattern, colour; per window of
    MOTION_CHUNKS chunks: the motion word."""
    reps = [M.scene_report(c) for c in chunks]
    rows = [{"one_subject": r["one_subject"], "one_blob": r["one_blob"], "shape": r["shape"], "iou": r["iou"],
             "bg_color": r["bg_color"], "pattern": r["pattern"], "color": M.dominant_color(c)}
            for r, c in zip(reps, chunks)]
    motions = []
    for a in range(0, len(chunks) - MOTION_CHUNKS + 1, MOTION_CHUNKS):
        cents = np.concatenate([reps[k]["centroids"] for k in range(a, a + MOTION_CHUNKS)])
        motions.append(M.classify_motion(M.motion_features(cents)))
    frames = [len(c) for c in chunks]
    return {"chunks": rows, "motions": motions,
            "one_subject_frames": float(np.average([r["one_subject"] for r in rows], weights=frames)),
            "one_blob_frames": float(np.average([r["one_blob"] for r in rows], weights=frames)),
            "hits": {k: [r[k] == want[k] for r in rows] for k in ("shape", "bg_color", "pattern", "color")},
            "motion_hits": [m == want["motion"] for m in motions]}


def summarize(runs: list[dict]) -> dict:
    """Accuracies over all chunks of all runs, by chunk index, and confusions (shape, pattern, background colour,
    motion)."""
    out = {"prompts": len(runs), "one_subject": float(np.mean([r["one_subject_frames"] for r in runs])),
           "one_blob": float(np.mean([r["one_blob_frames"] for r in runs]))}
    for k in ("shape", "bg_color", "pattern", "color"):
        hits = np.array([r["hits"][k] for r in runs], dtype=float)
        out[k] = float(hits.mean())
        out[f"{k}_by_chunk"] = hits.mean(0).tolist()
    out["one_subject_by_chunk"] = np.mean([[c["one_subject"] for c in r["chunks"]] for r in runs], 0).tolist()
    out["motion"] = float(np.mean([h for r in runs for h in r["motion_hits"]])) if runs[0]["motion_hits"] else 0.0
    out["iou"] = float(np.mean([c["iou"] for r in runs for c in r["chunks"]]))
    pairs = lambda k: [(r["want"][k], c[k]) for r in runs for c in r["chunks"] if r["want"][k] is not None]
    out["confusion"] = {"shape": confusion(pairs("shape"), SHAPES, ("blob",)),
                        "pattern": confusion(pairs("pattern"), BACKGROUNDS, ("other",)),
                        "bg_color": confusion(pairs("bg_color"), tuple(BACKGROUND_COLORS)),
                        "motion": confusion([(r["want"]["motion"], m) for r in runs for m in r["motions"]], MOTIONS)}
    return out


def strip(rows: list[tuple[str, np.ndarray, list[np.ndarray]]], path: Path, scale: int = 2,
          show_chunks: tuple[int, ...] = (0, 1, 3, 5, 7)) -> None:
    """One row per prompt: the label, a rendered ground-truth frame of what the prompt asks for, then the middle
    frame of chunks `show_chunks` of the generated stream."""
    from PIL import Image, ImageDraw
    pad, label_w = 2, 150
    tiles = []
    for label, truth, chunks in rows:
        frames = [truth] + [chunks[k][len(chunks[k]) // 2] for k in show_chunks if k < len(chunks)]
        tiles.append((label, np.concatenate([np.pad(f, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
                                             for f in frames], axis=1)))
    th, tw = tiles[0][1].shape[:2]
    img = Image.new("RGB", ((label_w + tw) * scale, (th * len(tiles) + 14) * scale), "white")
    draw = ImageDraw.Draw(img)
    draw.text((label_w * scale + 4, 2), "truth", fill="black")
    for j, k in enumerate(show_chunks):
        draw.text(((label_w + (j + 1) * (tw // (len(show_chunks) + 1))) * scale + 4, 2), f"chunk {k}", fill="black")
    for i, (label, row) in enumerate(tiles):
        y = (14 + i * th) * scale
        tile = Image.fromarray(row).resize((tw * scale, th * scale), Image.NEAREST)
        img.paste(tile, (label_w * scale, y))
        draw.text((4, y + th * scale // 2 - 6), label, fill="black")
    img.save(path)


def truth_frame(prompt: str, seed: int = 0) -> np.ndarray:
    """A rendered frame of the scene a prompt describes (the grammar read back by `metrics.prompt_scene`), drawn
    as the world the shipped model learned draws it."""
    w = M.prompt_scene(prompt)
    scene = single_shape_scene(w["color"], shape=w["shape"], motion=w["motion"], background=w["pattern"],
                               bg_color=w["bg_color"], seed=seed, style=WORLD_STYLES[SHIPPED_WORLD])
    return render(scene, 24, 1)[0]


def evaluate_scenes(gen, out_dir: Path, quick: bool = False, seed: int = 400) -> dict:
    """All prompt sets and families, packed cache, CHUNKS chunks each; writes one strip PNG per family."""
    res: dict = {"sets": {}, "families": {}}
    k = 0
    for name, prompts in prompt_sets(quick).items():
        runs = []
        for p in prompts:
            runs.append(run_prompt(gen, p, seed + k)[0])
            k += 1
        res["sets"][name] = {"summary": summarize(runs), "runs": runs}
        print(f"scene: {name}: {format_summary(res['sets'][name]['summary'])}", file=sys.stderr, flush=True)
    fams = families()
    for fam, prompts in fams.items():
        if quick:
            prompts = prompts[:2]
        runs, rows = [], []
        for p in prompts:
            r, frames = run_prompt(gen, p, seed + k)
            k += 1
            runs.append(r)
            read = " ".join(str(m) for m in r["motions"]) if fam == "motion" else \
                " ".join(str(c[fam]) for c in r["chunks"][:3])           # the family's attribute, first 3 chunks
            rows.append((f"{r['want'][fam]}: read {read}", truth_frame(p), frames))
        strip(rows, out_dir / f"strip_{fam}.png")
        res["families"][fam] = {"summary": summarize(runs), "runs": runs, "prompts": prompts}
        print(f"scene family {fam}: {format_summary(res['families'][fam]['summary'])}", file=sys.stderr, flush=True)
    return res


def format_summary(s: dict) -> str:
    return (f"one subject {s['one_subject']:.0%}, shape {s['shape']:.0%}, bg colour {s['bg_color']:.0%}, "
            f"pattern {s['pattern']:.0%}, motion {s['motion']:.0%}, colour {s['color']:.0%}")


SUMMARY_COLUMNS = [("set", "prompts", ""), ("prompts", "n", "d"), ("one_subject", "one subject (frames)", ".0%"),
                   ("one_blob", "one region, any colour (frames)", ".0%"),
                   ("shape", "shape", ".0%"), ("iou", "shape IoU", ".2f"), ("bg_color", "background colour", ".0%"),
                   ("pattern", "pattern", ".0%"), ("motion", "motion (4-chunk windows)", ".0%"),
                   ("color", "colour", ".0%")]


def report_md(res: dict, md_table) -> list[str]:
    rows = [{"set": n, **v["summary"]} for n, v in res["sets"].items()]
    rows += [{"set": f"family: {n}", **v["summary"]} for n, v in res["families"].items()]
    allruns = [r for v in res["sets"].values() for r in v["runs"]]
    total = summarize(allruns)
    rows.append({"set": "**all three sets**", **total})
    md = ["## What the stream shows besides colour: subject count, shape, background, motion (packed cache, "
          f"{CHUNKS} chunks per prompt)\n",
          "Read with the scene readers of `toyworld/metrics.py` (their accuracy on rendered frames is the next "
          "section). One subject = share of frames with exactly one same-colour region of >= "
          f"{M.MIN_SUBJECT_AREA} px (a rim of a neighbouring hue or a ghost of another colour makes two); one region = "
          "share of frames with exactly one foreground region of any colour (a rim touching the subject is part of "
          "it), reported beside, not instead; shape, background colour and pattern per chunk; motion per window of "
          f"{MOTION_CHUNKS} chunks; colour = the dominant foreground colour (the measure above). Targets (issue 16): "
          "one subject >= 90%, shape >= 80%, background colour >= 85%, pattern >= 75%, colour >= 95%. Strips: "
          "`eval/strip_shape.png`, `strip_pattern.png`, `strip_bg_color.png`, `strip_motion.png` (per row: the "
          "prompt's ground truth rendered, then the middle frame of chunks 0, 1, 3, 5, 7).\n",
          md_table(rows, SUMMARY_COLUMNS), "",
          f"### By chunk index, all three sets ({total['prompts']} prompts)\n"]
    by = [{"measure": m, **{f"c{k}": v for k, v in enumerate(total[f"{key}_by_chunk"])}}
          for m, key in (("one subject", "one_subject"), ("shape", "shape"), ("background colour", "bg_color"),
                         ("pattern", "pattern"), ("colour", "color"))]
    md += [md_table(by, [("measure", "measure", "")] + [(f"c{k}", f"chunk {k}", ".0%") for k in range(CHUNKS)]), ""]
    for key, title in (("shape", "Shape"), ("pattern", "Background pattern"), ("bg_color", "Background colour"),
                       ("motion", "Motion word")):
        unit = f"{MOTION_CHUNKS}-chunk windows" if key == "motion" else "chunks"
        md += [f"### {title}: confusion over all {unit} of the three sets (rows: asked for; columns: read)\n",
               confusion_md(total["confusion"][key]), ""]
    return md
