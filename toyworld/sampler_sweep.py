"""Choose sampler settings on prompts the evaluation never uses, so its 20 prompts stay a fair test.

    python -m toyworld.sampler_sweep                  # guidance:shift[:rescale] specs, 48 prompts x 8 chunks
    python -m toyworld.sampler_sweep --specs 3:1 3:5 5:5:1 --prompts 24 --chunks 3

Prompts are single-shape scenes drawn (seeded) from the caption grammar, half of them paraphrased, the colours
cycling through all eight. Each spec `guidance:shift[:rescale]` runs with the preset's other sampler settings
(Euler steps); the table gives the share of chunks whose dominant colour is the prompt's, over the first four
chunks, all of them, and the last one (drift). This is how the toy preset's shift 5 (session 4, 3 chunks) and its
guidance 5 rescaled 1.0 (session 5, 8 chunks) were picked (toyworld/README.md).

With `--scene` the table instead reads what `toyworld.evaluate`'s scene section reads (one subject, shape, pattern,
background colour, colour; chunk 0 and the last chunk apart, where the continuation's losses show) on the same
kind of prompts: how the toy preset's guidance 2 was picked (session 18: guidance 3 over-drives the continuation
into extra regions and rounder shapes).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from . import metrics as M
from .evaluate import SAMPLER_COLUMNS, load_generator, md_table, sampler_variants
from .world import (
    BACKGROUND_COLORS,
    BACKGROUNDS,
    MOTIONS,
    SHAPE_COLORS,
    SHAPES,
    caption,
    single_shape_scene,
)


def grammar_prompts(n: int, seed: int = 12345) -> list[str]:
    """n single-shape captions, colours cycling through the eight, each naming its subject's colour unambiguously."""
    rng = np.random.default_rng(seed)
    colors = list(SHAPE_COLORS)
    prompts: list[str] = []
    while len(prompts) < n:
        color = colors[len(prompts) % len(colors)]
        scene = single_shape_scene(color, shape=str(rng.choice(SHAPES)), motion=str(rng.choice(MOTIONS)),
                                   background=str(rng.choice(BACKGROUNDS)),
                                   bg_color=str(rng.choice(list(BACKGROUND_COLORS))), seed=int(rng.integers(1 << 30)))
        text = caption(scene, rng if rng.random() < 0.5 else None)
        if M.prompt_color(text) == color:
            prompts.append(text)
    return prompts


SCENE_COLUMNS = [("guidance", "guidance", "g"), ("shift", "shift", "g"), ("rescale", "rescale", "g"),
                 ("one_subject", "one subject", ".0%"), ("shape", "shape", ".0%"), ("shape_first", "shape, chunk 0", ".0%"),
                 ("shape_last", "shape, last chunk", ".0%"), ("pattern", "pattern", ".0%"),
                 ("bg_color", "bg colour", ".0%"), ("color", "colour", ".0%"), ("s_per_chunk", "s/chunk", ".3f"),
                 ("shipped", "shipped", "")]


def scene_variants(gen, prompts: list[str], chunks: int, specs: list[tuple[float, float, float]],
                   seed: int = 500) -> list[dict]:
    """The scene readers' verdicts (`toyworld.scene_eval`) under each guidance:shift:rescale spec, side by side."""
    import sys
    import time

    from .evaluate import sampler_settings
    from .scene_eval import run_prompt, summarize
    cfg = gen.sampler.config
    shipped = (cfg.guidance_scale, cfg.shift, cfg.guidance_rescale)
    rows = []
    for g, shift, rescale in specs:
        with sampler_settings(gen, guidance_scale=g, shift=shift, guidance_rescale=rescale):
            t = time.perf_counter()
            runs = [run_prompt(gen, p, seed=seed + i, chunks=chunks)[0] for i, p in enumerate(prompts)]
            wall = time.perf_counter() - t
        s = summarize(runs)
        rows.append({"guidance": g, "shift": shift, "rescale": rescale, "one_subject": s["one_subject"],
                     "shape": s["shape"], "shape_first": s["shape_by_chunk"][0], "shape_last": s["shape_by_chunk"][-1],
                     "pattern": s["pattern"], "bg_color": s["bg_color"], "color": s["color"],
                     "s_per_chunk": wall / (len(prompts) * chunks), "shipped": "yes" if (g, shift, rescale) == shipped
                     else ""})
        print(f"guidance {g:g} shift {shift:g} rescale {rescale:g}: one subject {s['one_subject']:.0%}, "
              f"shape {s['shape']:.0%}, pattern {s['pattern']:.0%}", file=sys.stderr, flush=True)
    return rows


def parse_spec(spec: str) -> tuple[float, float, float]:
    """"guidance:shift" or "guidance:shift:rescale" (rescale 0 when left out)."""
    try:
        parts = [float(x) for x in spec.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
    except ValueError:
        raise SystemExit(f"bad spec {spec!r}: expected guidance:shift[:rescale], e.g. 3:5 or 5:5:1") from None
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="a bundle .safetensors (default: the shipped toy weights)")
    ap.add_argument("--specs", nargs="+",
                    default=["3:5", "3:5:0.5", "3:5:1", "4:5:0.75", "5:5", "5:5:0.75", "5:5:1", "6:5:1"],
                    help="guidance:shift[:rescale] settings")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scene", action="store_true",
                    help="read one subject, shape and pattern (toyworld.scene_eval) instead of the colour alone")
    args = ap.parse_args(argv)
    specs = [parse_spec(s) for s in args.specs]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    gen = load_generator(args.weights)
    if args.scene:
        rows = scene_variants(gen, grammar_prompts(args.prompts), args.chunks, specs)
        print(md_table(rows, SCENE_COLUMNS))
        return
    between = gen.sampler.config.between_steps
    rows = sampler_variants(gen, grammar_prompts(args.prompts), args.chunks,
                            variants=[(between, g, shift, rescale) for g, shift, rescale in specs], seed=500)
    print(md_table(rows, SAMPLER_COLUMNS[1:]))


if __name__ == "__main__":
    main()
