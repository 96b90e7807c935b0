"""Issue 16: would a patch-1x1x1 DiT draw shapes, patterns and one subject where the shipped patch-1x2x2 one draws
blobs? A CPU-sized probe of the plan's step 3 (eval/RETRAIN_PLAN.md, "Session 14"), on the first chunk, where
shape and background come from the text alone.

    python -m toyworld.patch_probe --work DIR data                          # 1,536 first-chunk clips, ~2.5 min
    python -m toyworld.patch_probe --work DIR train p1 --steps 700          # arms, one torch thread each by default
    python -m toyworld.patch_probe --work DIR train p2 --steps 700
    python -m toyworld.patch_probe --work DIR train p2bg --steps 700 --set fg_weight=0   # a loss setting
    python -m toyworld.patch_probe --work DIR eval shipped p1init p1 p2     # first 2 chunks of 68 prompts, a PNG
    python -m toyworld.patch_probe --work DIR2 data --world placed --spatial-embedding   # session 15's arms

Arms: `shipped` (the shipped DiT, untouched), `p1init` / `p1hinit` (the shipped DiT moved to patch 1x1x1 by
`transfer_to_patch1`, untrained), and any trained arm: `p1*` names train the moved DiT (`p1h*`: with the spatial
positions halved, `spatial_positions`), `p2*` names the shipped one, all on first chunks alone (the `first` stage's
loss, batches of 32) from the same clips. Same steps isolates what the 4x tokens buy; a longer `p2` arm gives the
shipped size the patch-1 arm's wall time. In `p1` arms the
positions stay on the integer token grid (a patch-1 token sits at 0..7, not 0..3): the moved DiT's learned RoPE
distances are twice as local at first, which the fine-tune has to relearn.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import train as T
from .world import WORLD_STYLES

log = logging.getLogger("toyworld.patch_probe")

FIRST_CLIPS = 1536
EVAL_CHUNKS = 2
STRIP_PROMPTS = 6


def patch1_preset(preset):
    """The toy preset with patch 1x1x1 (64 tokens per 8x8 latent frame instead of 16), no shipped weights."""
    return replace(preset, name=f"{preset.name}-patch1", weights=None,
                   transformer=replace(preset.transformer, patch_size=(1, 1, 1)))


def transfer_to_patch1(state: dict[str, torch.Tensor], prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """A patch-1x2x2 DiT's weights for patch 1x1x1: the embedding sums its 2x2 taps (a latent constant over a 2x2
    patch embeds every one of its four new tokens as the old token), the head averages its four sub-pixel outputs
    (out features ordered (pt, ph, pw, channel)); every other weight is shape-free and kept."""
    out = dict(state)
    w = state[prefix + "patch_embedding.weight"]                      # (dim, C, 1, 2, 2)
    if tuple(w.shape[2:]) != (1, 2, 2):
        raise ValueError(f"expected a 1x2x2 patch embedding, got kernel {tuple(w.shape[2:])}")
    out[prefix + "patch_embedding.weight"] = w.sum(dim=(3, 4), keepdim=True)
    pw, pb = state[prefix + "proj_out.weight"], state[prefix + "proj_out.bias"]
    c = w.shape[1]
    out[prefix + "proj_out.weight"] = pw.reshape(4, c, -1).mean(0)
    out[prefix + "proj_out.bias"] = pb.reshape(4, c).mean(0)
    return out


@contextlib.contextmanager
def spatial_positions(arm: str):
    """`p1h*` arms: every chunk's token positions on a half-step spatial grid at cell centres (a patch-1 token sits at
    its old patch-2 token's position +- 0.25), so the moved DiT starts with the shipped one's RoPE distances.
    Probe-only: swaps `packcache.model`'s `grid_positions` for the duration (the engine has no such setting yet;
    shipping it needs a `TransformerConfig` field used wherever positions are built, RETRAIN_PLAN.md)."""
    if not arm.startswith("p1h"):
        yield
        return
    import packcache.model as model_module
    from packcache.rope import grid_positions

    def halved(frames, height, width, t_offsets=None, spatial_stride=1.0):
        return grid_positions(frames, height, width, t_offsets, spatial_stride * 0.5)

    model_module.grid_positions = halved
    try:
        yield
    finally:
        model_module.grid_positions = grid_positions


def shipped_bundle_path() -> Path:
    from packcache.generator import shipped_weights_path
    from packcache.presets import get_preset
    return shipped_weights_path(get_preset("toy").weights)


def shipped_bundle() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(shipped_bundle_path()))


def arm_preset(arm: str, work: Path):
    """The toy preset of the work folder's setup (`train.Setup`: a spatial embedding or not), at the arm's patch."""
    toy = T.toy_preset(T.Setup.of(work))
    return patch1_preset(toy) if arm.startswith("p1") else replace(toy, name="toy-probe", weights=None)


def arm_init(arm: str, bundle: dict, work: Path) -> dict[str, torch.Tensor]:
    """The arm's start from the shipped DiT. Its spatial table (since session 16) goes where the arm has none; an arm
    with a table the bundle lacks, or one over another token grid (patch 1), starts it as the model builds it."""
    dit = {k: v for k, v in bundle.items() if k.startswith("transformer.")}
    state = transfer_to_patch1(dit) if arm.startswith("p1") else dit
    model = T.build_model(arm_preset(arm, work), 0)
    own, table = model.state_dict(), "transformer.spatial_embedding"
    if table not in own:
        state.pop(table, None)
    elif table not in state or state[table].shape != own[table].shape:
        state[table] = own[table]
    model.load_state_dict(state)                     # strict: every key and shape of the arm's model
    return model.state_dict()


def make_data(work: Path) -> dict:
    T.vae_from_bundle(shipped_bundle_path(), work)
    return T.make_first_chunk_dataset(arm_preset("p2", work), work, 1000 + T.FirstChunkRecipe().data_seed,
                                      FIRST_CLIPS)


def train_arm(work: Path, arm: str, steps: int, recipe=None, lr: float | None = None) -> dict:
    """The `first` stage's loss alone (`first_share` 1, batch 32, lr 3e-4 unless `lr`, cosine, EMA) from the
    arm's start; `recipe`: the DiTRecipe whose loss settings apply (default: the `dit` stage's)."""
    first = torch.load(work / "data_first.pt")
    folder = work / arm
    folder.mkdir(exist_ok=True)
    init = folder / "init.pt"
    torch.save(arm_init(arm, shipped_bundle(), work), init)
    recipe = replace(recipe or T.DiTRecipe(), steps=steps, lr=lr or T.FirstChunkRecipe().lr, drift_prob=0.0,
                     roll_prob=0.0)
    with spatial_positions(arm):
        info = T.train_dit(arm_preset(arm, work), folder, 60, recipe, data=first, init=init, out_name="dit.pt",
                           name=arm, warmup=T.FirstChunkRecipe().warmup, first=first, first_share=1.0,
                           first_batch=T.FirstChunkRecipe().batch)
    return {k: v for k, v in info.items() if v == v}  # noqa: PLR0124 - drops the NaN clip losses (no clip steps)


def arm_generator(work: Path, arm: str, bundle: dict):
    """A generator of the arm's preset with the shipped VAE and text encoder and the arm's DiT (window cache only:
    the probe reads first chunks; the pool compressor stands in for the shipped HR branch, unused here)."""
    from packcache.generator import Generator
    from packcache.presets import register_preset
    from packcache.weights import load_module_weights
    preset = arm_preset(arm, work)
    register_preset(preset)
    gen = Generator.from_preset(preset.name, compression="pool")
    load_module_weights(gen.vae.vae, {k[4:]: v for k, v in bundle.items() if k.startswith("vae.")}, "vae")
    trained = work / arm / "dit.pt"
    gen.model.load_state_dict(torch.load(trained) if trained.exists() else arm_init(arm, bundle, work))
    return gen


def read_arm(work: Path, arm: str, bundle: dict) -> tuple[dict, list]:
    """Every scene-evaluation prompt (68), its first EVAL_CHUNKS chunks, each read by the scene readers."""
    from . import scene_eval as S
    gen = arm_generator(work, arm, bundle)
    runs, shown = [], []
    start = time.perf_counter()
    prompts = [p for ps in S.prompt_sets(False).values() for p in ps]
    with spatial_positions(arm):
        for k, p in enumerate(prompts):
            run, frames = S.run_prompt(gen, p, 400 + k, chunks=EVAL_CHUNKS, cache="window")
            runs.append(run)
            if len(shown) < STRIP_PROMPTS and k % 11 == 0:
                shown.append((p, frames))
    gen.close()
    row = {"arm": arm, "prompts": len(runs), "eval_s": round(time.perf_counter() - start, 1)}
    for c in range(EVAL_CHUNKS):
        row[f"chunk{c}"] = {"one_subject": float(np.mean([r["chunks"][c]["one_subject"] for r in runs])),
                            **{key: float(np.mean([r["hits"][key][c] for r in runs]))
                               for key in ("shape", "bg_color", "pattern", "color")}}
    trained = work / arm / f"{arm}.json"
    if trained.exists():
        row["training"] = json.loads(trained.read_text())
    return row, shown


def strip_png(shown: dict[str, list], path: Path) -> None:
    """One row per (prompt, arm): the truth frame, then the middle frame of chunks 0 and 1."""
    from . import scene_eval as S
    rows = []
    arms = list(shown)
    for i in range(len(shown[arms[0]])):
        for arm in arms:
            prompt, frames = shown[arm][i]
            rows.append((f"{arm}: {prompt[:22]}", S.truth_frame(prompt), frames))
    S.strip(rows, path, show_chunks=tuple(range(EVAL_CHUNKS)))


def table(rows: list[dict]) -> str:
    head = "| arm | chunk | one subject | shape | bg colour | pattern | colour |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        for c in range(EVAL_CHUNKS):
            m = r[f"chunk{c}"]
            lines.append(f"| {r['arm']} | {c} | {m['one_subject']:.0%} | {m['shape']:.0%} | {m['bg_color']:.0%} | "
                         f"{m['pattern']:.0%} | {m['color']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toyworld.patch_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a folder for the clips, arms and results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per arm: run two arms at once)")
    ap.add_argument("command", choices=("data", "train", "eval"))
    ap.add_argument("arms", nargs="*", help="train: one arm (p1..., p2...); eval: shipped, p1init and trained arms")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--lr", type=float, default=None, help="train: peak learning rate (default: the first stage's)")
    ap.add_argument("--world", choices=tuple(WORLD_STYLES), default=None,
                    help="data: the world of the clips (toyworld.world.WorldStyle), kept in the work folder")
    ap.add_argument("--spatial-embedding", action="store_true",
                    help="data: every arm of this work folder gets a spatial embedding (shipped DiT + a new table)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="train: a DiTRecipe loss setting, e.g. --set fg_weight=0 or --set sigma_levels=shifted")
    args = ap.parse_args(argv)
    recipe = T.recipe_with(T.DiTRecipe(), None, args.set, ap, option="--set")   # bad settings: before any work
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    untrained = ("shipped", "p1init", "p1hinit")
    bad = [a for a in args.arms if not (a in untrained or a[:2] in ("p1", "p2"))]
    if bad or (args.command == "train" and (len(args.arms) != 1 or args.arms[0] in untrained)):
        print(f"error: arms are shipped, p1init, p1hinit or names starting p1 / p2 (train: exactly one trained arm); "
              f"got {' '.join(args.arms) or 'none'}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command == "data":
        T.Setup(world=args.world or "varied", spatial_embedding=args.spatial_embedding).save(args.work)
        print(json.dumps(make_data(args.work)))
    elif args.command == "train":
        info = train_arm(args.work, args.arms[0], args.steps, recipe, args.lr)
        print(json.dumps({**info, "set": args.set, "lr": args.lr, "setup": T.Setup.of(args.work).__dict__}))
    else:
        bundle = shipped_bundle()
        rows, shown = [], {}
        for arm in args.arms or ["shipped", "p1init"]:
            row, shown[arm] = read_arm(args.work, arm, bundle)
            rows.append(row)
            print(table([row]).splitlines()[-2:], file=sys.stderr, flush=True)
        (args.work / "patch_probe.json").write_text(json.dumps(rows, indent=1))
        strip_png(shown, args.work / "patch_probe_strip.png")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
