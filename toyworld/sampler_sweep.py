"""Choose sampler settings on prompts the evaluation never uses, so its 20 prompts stay a fair test.

    python -m toyworld.sampler_sweep                  # guidance:shift[:rescale] specs, 48 prompts x 8 chunks
    python -m toyworld.sampler_sweep --specs 3:1 3:5 5:5:1 --prompts 24 --chunks 3

Prompts are single-shape scenes drawn (seeded) from the caption grammar, half of them paraphrased, the colours
cycling through all eight. Each spec `guidance:shift[:rescale]` runs with the preset's other sampler settings
(Euler steps); the table gives the share of chunks whose dominant colour is the prompt's, over the first four
chunks, all of them, and the last one (drift). This is how the toy preset's shift 5 (session 4, 3 chunks) and its
guidance 5 rescaled 1.0 (session 5, 8 chunks) were picked (toyworld/README.md).
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
    args = ap.parse_args(argv)
    specs = [parse_spec(s) for s in args.specs]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    gen = load_generator(args.weights)
    between = gen.sampler.config.between_steps
    rows = sampler_variants(gen, grammar_prompts(args.prompts), args.chunks,
                            variants=[(between, g, shift, rescale) for g, shift, rescale in specs], seed=500)
    print(md_table(rows, SAMPLER_COLUMNS[1:]))


if __name__ == "__main__":
    main()
