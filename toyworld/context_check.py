"""Does the DiT continue its context? Two measurements on rendered scenes no stage trained on.

    python -m toyworld.context_check [--weights W] [--scenes 24] [--threads 1]

1. **Shape after a true context.** The stream starts from the world's own first k chunks (`gen.open(start=...)`,
   encoded chunk by chunk as training encodes them) under the scene's caption, and the next chunk is read: is its
   subject the right shape? Beside it, the same chunk index of a stream drawn from the text alone. A model that
   continues its context keeps a true shape after any k; one that redraws from the text loses it as k grows.
2. **What the context is worth to a prediction.** The one-step x0 estimate of chunk k from noise level sigma, with
   the true chunks before it as context and with none, as mean squared error against the truth (the teacher-forcing
   view `forward_sequence` trains with). With a useful context the first is lower.

Session 19 found with it that the shipped first-chunk stage left a DiT whose context made its estimates worse
(eval/RETRAIN_PLAN.md, "Session 19").
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from . import metrics as M
from .world import BACKGROUNDS, SHAPES, SHIPPED_WORLD, WORLD_STYLES, caption, render, single_shape_scene

log = logging.getLogger("toyworld.context_check")

CONTEXT_CHUNKS = (1, 3, 6)
SIGMAS = (1.0, 0.6)
_COLORS = ("red", "yellow", "green", "blue", "purple", "cyan", "orange", "pink")
_BG_COLORS = ("blue", "green", "gray", "brown", "purple", "black", "white", "teal")
_MOTIONS = ("bounce", "orbit", "drift", "zigzag")


def scenes(n: int) -> list:
    """`n` one-subject scenes cycling every shape x pattern, as the shipped world draws them."""
    out = []
    for j in range(n):
        out.append(single_shape_scene(_COLORS[j % 8], shape=SHAPES[j % 3], motion=_MOTIONS[j % 4],
                                      background=BACKGROUNDS[(j // 3) % 4], bg_color=_BG_COLORS[(j * 3) % 8],
                                      seed=50 + j, style=WORLD_STYLES[SHIPPED_WORLD]))
    return out


def shape_after_context(gen, scene, frames: np.ndarray, seed: int) -> dict[str, bool]:
    """Right shape in chunk k after k true chunks (`forced k`) and in chunk k of a text-only stream (`free k`)."""
    want = scene.shapes[0].shape
    out = {}
    for k in CONTEXT_CHUNKS:
        s = gen.open(caption(scene), seed=seed, cache="packed", start=frames[:gen.preset.chunk_video_frames(k - 1)[1]])
        out[f"forced {k}"] = M.scene_report(s.next_chunk())["shape"] == want
        s.close()
    s = gen.open(caption(scene), seed=seed, cache="packed")
    chunks = [s.next_chunk() for _ in range(max(CONTEXT_CHUNKS) + 1)]
    s.close()
    out.update({f"free {k}": M.scene_report(chunks[k])["shape"] == want for k in CONTEXT_CHUNKS})
    return out


@torch.no_grad()
def context_worth(gen, scene, frames: np.ndarray, seed: int) -> dict[str, float]:
    """x0 error of chunk k's one-step estimate from each sigma, with the true context and without."""
    from packcache.vae import encode_by_chunks

    from .common import to_tensor
    from .train import teacher_forcing_mask
    p, model = gen.preset, gen.model
    T = p.cache.chunk_frames
    lat = torch.cat(encode_by_chunks(gen.vae.encode, to_tensor(frames)[None], T, p.vae.temporal_stride), 2)
    lat_dtype, lat = lat.dtype, lat.float()
    text = gen.encode_prompt(caption(scene))
    out = {}
    for k in CONTEXT_CHUNKS:
        truth = lat[:, :, k * T:(k + 1) * T]
        for sigma in SIGMAS:
            eps = torch.randn(truth.shape, generator=torch.Generator().manual_seed(seed * 31 + k))
            noisy = (1 - sigma) * truth + sigma * eps
            for name, ctx in (("context", lat[:, :, :k * T]), ("alone", lat[:, :, :0])):
                f = ctx.shape[2] + T
                clean, seq = torch.cat([ctx, truth], 2), torch.cat([ctx, noisy], 2)
                ts = torch.cat([torch.zeros(1, 2 * f - T), torch.full((1, T), sigma)], 1) * 1000.0
                pos = torch.arange(f, dtype=torch.float64)
                mask = teacher_forcing_mask(list(range(f // T)), p.tokens_per_frame, T)
                v = model.forward_sequence(torch.cat([clean, seq], 2).to(lat_dtype), ts, text,
                                           torch.cat([pos, pos]), mask)[:, :, -T:].float()
                out[f"{name} k{k} s{sigma}"] = float((noisy - sigma * v - truth).pow(2).mean())
    return out


def run(gen, n_scenes: int) -> dict:
    shape_rows, worth_rows = [], []
    last = gen.preset.chunk_video_frames(max(CONTEXT_CHUNKS))[1]
    for j, scene in enumerate(scenes(n_scenes)):
        frames = render(scene, start=0, num_frames=last, size=gen.preset.height)
        shape_rows.append(shape_after_context(gen, scene, frames, 700 + j))
        worth_rows.append(context_worth(gen, scene, frames, j))
        log.info("scene %d/%d: %s", j + 1, n_scenes, caption(scene))
    return {"scenes": n_scenes,
            "shape": {k: float(np.mean([r[k] for r in shape_rows])) for k in shape_rows[0]},
            "x0_mse": {k: float(np.mean([r[k] for r in worth_rows])) for k in worth_rows[0]}}


def report(res: dict) -> str:
    lines = [f"Continuation check, {res['scenes']} rendered scenes (shape of chunk k; packed cache)", "",
             "| chunk k | after k true chunks | text-only stream | x0 MSE from sigma 1: context / alone "
             "| from sigma 0.6: context / alone |", "|---|---|---|---|---|"]
    sh, mse = res["shape"], res["x0_mse"]
    for k in CONTEXT_CHUNKS:
        lines.append(f"| {k} | {sh[f'forced {k}']:.0%} | {sh[f'free {k}']:.0%} | "
                     f"{mse[f'context k{k} s1.0']:.3f} / {mse[f'alone k{k} s1.0']:.3f} | "
                     f"{mse[f'context k{k} s0.6']:.3f} / {mse[f'alone k{k} s0.6']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="a toy bundle (default: the shipped one)")
    ap.add_argument("--scenes", type=int, default=24, help="rendered scenes (cycling shape x pattern)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.scenes < 1:
        ap.error("--scenes must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from .evaluate import load_generator
    print(report(run(load_generator(args.weights), args.scenes)))


if __name__ == "__main__":
    main()
