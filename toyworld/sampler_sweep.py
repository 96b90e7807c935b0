"""Choose sampler settings on prompts the evaluation never uses, so its 20 prompts stay a fair test.

    python -m toyworld.sampler_sweep                                  # guidance:shift pairs, 48 prompts x 3 chunks
    python -m toyworld.sampler_sweep --specs 3:1 3:5 4:5 --prompts 24

Prompts are single-shape scenes drawn (seeded) from the caption grammar, half of them paraphrased, the colours
cycling through all eight. Each spec `guidance:shift` runs with the preset's other sampler settings (Euler steps);
the table gives the share of chunks whose dominant colour is the prompt's. This is how the toy preset's shift 5 was
picked (toyworld/README.md).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from . import metrics as M
from .evaluate import load_generator, md_table, sampler_variants
from .world import BACKGROUND_COLORS, BACKGROUNDS, MOTIONS, SHAPE_COLORS, SHAPES, caption, single_shape_scene


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


def parse_spec(spec: str) -> tuple[float, float]:
    try:
        guidance, shift = (float(x) for x in spec.split(":"))
    except ValueError:
        raise SystemExit(f"bad spec {spec!r}: expected guidance:shift, e.g. 3:5") from None
    return guidance, shift


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="a bundle .safetensors (default: the shipped toy weights)")
    ap.add_argument("--specs", nargs="+", default=["3:1", "3:5", "3:8", "3:12", "2:5", "4:5"],
                    help="guidance:shift pairs")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    specs = [parse_spec(s) for s in args.specs]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    gen = load_generator(args.weights)
    between = gen.sampler.config.between_steps
    rows = sampler_variants(gen, grammar_prompts(args.prompts), args.chunks,
                            variants=[(between, g, shift) for g, shift in specs], seed=500)
    print(md_table(rows, [("guidance", "guidance", "g"), ("shift", "shift", "g"), ("accuracy", "prompt colour", ".0%"),
                          ("s_per_chunk", "s/chunk", ".3f"), ("shipped", "shipped", "")]))


if __name__ == "__main__":
    main()
