"""Train the toy world model from scratch: one seeded command, CPU-friendly.

    python -m toyworld.train --out packcache/weights/toy.safetensors

Stages (each saves its state under --work, so a stage can be re-run alone with --stages):

1. `vae`   the small `AutoencoderKLWan` (Wan2.2 layout) on toy frames and 9-frame clips, by foreground-weighted MSE;
           the latent normalisation is then folded into its quant convs (`toyworld/train_vae.py`).
   `vae_tune` (not in the default stages: the shipped bundle's VAE has had it) fine-tunes that VAE, encoder and
           decoder, against the rims and ghosts that made the scene readers see two subjects where the truth has
           one (`VAETuneRecipe`); the untuned copy stays in the work folder as vae_untuned.pt.
   `vae_stream` (not in the default stages either, for the same reason) fine-tunes the decoder alone on
           stream-length clips, so a stream's later chunks decode as cleanly as its first (`StreamDecoderRecipe`);
           the encoder and so the DiT's latents stay as they were.
   `vae_blotch` (not in the default stages either) fine-tunes the decoder alone once more, on latents with blotchy
           noise (`BLOTCH_DECODER`): the DiT's error on a plain background, decoded flatter.
2. `data`  encode 5-second clips (81 frames -> 21 latent frames = 7 chunks of 3) with the trained VAE; keep the
           scenes so captions can be re-drawn (augmented) at every step, and each latent position's foreground share.
3. `dit`   the causal Wan DiT (packcache.model.CausalWanModel) by flow matching with teacher forcing: the sequence is
           [clean copy ; noisy copy]; noisy chunk i attends clean chunks < i and itself, the clean copy is
           block-causal, both copies share temporal positions. One noise level per chunk (diffusion-forcing
           style). Caption augmentation (synonyms, templates), 10% empty prompts (for classifier-free guidance),
           positions under shapes weighted up, random context dropping (the packed/windowed contexts met beyond
           5 s) and mid-clip scene cuts (prompt switches).
   `recode` fine-tunes it on fresh clips encoded chunk by chunk (`RecodeRecipe`: more still starts and returns).
   `first`  fine-tunes it on first chunks alone, in bulk (`FirstChunkRecipe`): where the text alone decides the
           scene. Since session 16 the clips come from the `placed` world and the DiT has a spatial table
           (`Setup`; `--world varied --no-spatial-embedding` for the earlier model's).
   `drift` (optional, not in the default stages: measured, no gain with the shipped sampler) fine-tunes the DiT
           against the drift of long streams: contexts from colour-drifted copies of the clips, or from chunks the
           model sampled itself (`DriftRecipe`).
4. `hr`    the HR compressor branch, end-to-end through the frozen DiT: chunk i is denoised against
           [sink chunks ; compressed mid blocks ; recent chunk] and the loss back-propagates into the HR convs
           (`toyworld/train_hr.py`).
5. `memory` (optional, not in the default stages) the DiT on that same packed view with leave-and-return clips,
           loss where the subject returns, so that it reads the compressed mid blocks (`toyworld/train_memory.py`,
           `MemoryRecipe`; issue 13). Its other steps are anchored to the start DiT's own predictions
           (`MemoryRecipe.anchor`), which keeps the shape (session 26: 82% -> 83%; unanchored, session 24: 67%)
           while top-k learns to recall what left the frame (0.75 against FIFO 0.06). The shipped bundle is the
           default stages, then `--init-from packcache/weights/toy.safetensors --stages memory,pack` (~18 minutes on
           2 cores with the clips made, ~32 from nothing; the default stages alone take the 88 of the 90-minute
           budget, so it is a second command, not a default stage).
           `--init-from BUNDLE` runs it on a packed bundle (the shipped one) without the stages before it.

Everything is written into one safetensors file with key prefixes `transformer.`, `vae.`, `compressor.`, plus a
JSON sidecar (same stem) with the losses and wall times. Loss curves are saved as PNG in toyworld/curves/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import cosine_lr, noise_like, progress, save_curve, to_tensor
from .drift import drift_colors
from .metrics import foreground
from .train_vae import (
    BLOTCH_DECODER,
    StreamDecoderRecipe,
    VAERecipe,
    VAETuneRecipe,
    encode_chunkwise,
    load_vae,
    train_vae,
    tune_stream_decoder,
    tune_vae,
)
from .world import SHIPPED_WORLD, WORLD_STYLES, ClipMix, World, caption, render, replace

logger = logging.getLogger("toyworld.train")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "packcache" / "weights" / "toy.safetensors"


@dataclass
class Setup:
    """What every stage of one work folder shares, fixed by its first run (`setup.json`): the world its clips come
    from (`toyworld.world.WORLD_STYLES`) and whether the DiT has a spatial embedding
    (`TransformerConfig.spatial_embedding`). A later `--stages` run without the options keeps them."""
    world: str = SHIPPED_WORLD
    spatial_embedding: bool = True

    @classmethod
    def of(cls, work: Path) -> "Setup":
        path = work / SETUP_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, work: Path) -> None:
        (work / SETUP_FILE).write_text(json.dumps(self.__dict__))


SETUP_FILE = "setup.json"


def world_for(work: Path, seed: int) -> World:
    return World(seed, style=WORLD_STYLES[Setup.of(work).world])


def toy_preset(setup: Setup | None = None):
    """The toy preset, its DiT with a spatial table over its token grid when `setup` asks for one."""
    from packcache.presets import get_preset
    preset = get_preset("toy")
    if setup is None or not setup.spatial_embedding:
        return preset
    _, ph, pw = preset.transformer.patch_size
    grid = (preset.latent_height // ph, preset.latent_width // pw)
    return replace(preset, transformer=replace(preset.transformer, spatial_embedding=grid))


def set_threads(n: int | None):
    n = n or int(os.environ.get("TOYWORLD_THREADS", "2"))
    torch.set_num_threads(n)


# =========================================================================================== stage 2: data

CLIP_FRAMES = 81          # 5 s at 16 FPS -> 21 latent frames = 7 chunks of 3


def chunk_bounds(preset, frames: int = CLIP_FRAMES) -> list[tuple[int, int]]:
    """[start, end) video frames of each stream chunk of a training clip (`Preset.chunk_video_frames`)."""
    bounds = [preset.chunk_video_frames(0)]
    while bounds[-1][1] < frames:
        bounds.append(preset.chunk_video_frames(len(bounds)))
    assert bounds[-1][1] == frames, (bounds, frames)
    return bounds


def scene_to_dict(scene, kind: str = "normal") -> dict:
    """The scene as stored with its clip, plus the clip's kind (`toyworld.world.CLIP_KINDS`), which decides how
    its captions are drawn (`CaptionSampler`)."""
    import dataclasses
    return {**dataclasses.asdict(scene), "clip": kind}


def scene_from_dict(d: dict):
    from .world import Background, Scene, ShapeSpec
    return Scene(background=Background(**d["background"]), shapes=tuple(ShapeSpec(**s) for s in d["shapes"]))


def foreground_fraction(frames: np.ndarray, temporal: int = 4, spatial: int = 8) -> torch.Tensor:
    """Share of foreground pixels under each latent position, (F_latent, h, w): frame 0 alone, then groups of 4
    frames, as the VAE groups them. The DiT loss weighs these positions up."""
    mask, _ = foreground(frames)
    m = torch.from_numpy(mask.astype(np.float32))                                  # (F, H, W)
    groups = [m[:1]] + [m[1 + temporal * i:1 + temporal * (i + 1)] for i in range((len(m) - 1) // temporal)]
    per = torch.stack([g.mean(0) for g in groups])                                  # (F_latent, H, W)
    return F.avg_pool2d(per[:, None], spatial)[:, 0]


@torch.no_grad()
def _encode_shard(args) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[dict]]:
    preset_name, work, seed, clips, batch, device, drifted_copies = args
    torch.set_num_threads(1)
    from packcache.presets import get_preset
    preset = get_preset(preset_name)
    vae = load_vae(preset, Path(work), device=device)
    world = world_for(Path(work), seed)
    drift_rng = np.random.default_rng(seed + 7)      # its own stream: the clips are those of the world seed alone
    lat, drifted, fg, scenes = [], [], [], []
    for _ in progress(range(0, clips, batch), (clips + batch - 1) // batch, f"data[{seed}]"):
        xs, ds = [], []
        for _ in range(batch):
            frames, scene, kind = world.sample_training(chunk_bounds(preset), preset.height)
            xs.append(to_tensor(frames))
            if drifted_copies:
                backdrop = render(replace(scene, shapes=()), num_frames=1, size=preset.height)[0]
                ds.append(to_tensor(drift_colors(frames, drift_rng, backdrop)))
            fg.append(foreground_fraction(frames).half())
            scenes.append(scene_to_dict(scene, kind))
        lat.append(vae.encode(torch.stack(xs).to(device)).latent_dist.mean.half().cpu())
        if drifted_copies:
            drifted.append(vae.encode(torch.stack(ds).to(device)).latent_dist.mean.half().cpu())
    return (torch.cat(lat)[:clips], torch.cat(drifted)[:clips] if drifted_copies else None, torch.stack(fg)[:clips],
            scenes[:clips])


def make_dataset(preset, work: Path, seed: int, clips: int, batch: int = 8, workers: int = 2,
                 device: str = "cpu", drifted_copies: bool = False) -> dict:
    """Encode `clips` 5-second toy clips with the trained VAE -> latents (N, 16, 21, h, w), their foreground maps
    (N, 21, h, w) and scenes; with `drifted_copies` also the latents of colour-drifted copies (`toyworld.drift`,
    for the `drift` stage; the clips themselves stay the same). Split over `workers` single-threaded processes
    (each shard has its own world seed)."""
    t0 = time.time()
    per = [clips // workers + (i < clips % workers) for i in range(workers)]
    jobs = [(preset.name, str(work), seed + 2 + 1000 * i, per[i], batch, device, drifted_copies)
            for i in range(workers)]
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            shards = pool.map(_encode_shard, jobs)
    else:
        shards = [_encode_shard(jobs[0])]
    data = {"latents": torch.cat([s[0] for s in shards]), "foreground": torch.cat([s[2] for s in shards]),
            "scenes": [d for s in shards for d in s[3]]}
    if drifted_copies:
        data["drifted"] = torch.cat([s[1] for s in shards])
    torch.save(data, work / "data.pt")
    latents = data["latents"]
    info = {"wall_s": time.time() - t0, "clips": clips, "latent_shape": list(latents.shape),
            "latent_mean": latents.float().mean().item(), "latent_std": latents.float().std().item()}
    (work / "data.json").write_text(json.dumps(info))
    return info


@torch.no_grad()
def _encode_fresh_clips(preset, work: Path, seed: int, clips: int, batch: int, device: str, draw, encode,
                        out_name: str, desc: str) -> dict:
    """`clips` clips drawn from their own world seed by `draw(world) -> (frames, scene dict)`, encoded a batch at a
    time by `encode(vae, x)`: latents, foreground maps and scenes as `make_dataset` stores them, in `out_name`."""
    t0 = time.time()
    vae = load_vae(preset, work, device=device)
    world = world_for(Path(work), seed)
    lat, fg, scenes = [], [], []
    for _ in progress(range(0, clips, batch), (clips + batch - 1) // batch, desc):
        xs = []
        for _ in range(batch):
            frames, scene = draw(world)
            xs.append(to_tensor(frames))
            fg.append(foreground_fraction(frames).half())
            scenes.append(scene)
        lat.append(encode(vae, torch.stack(xs).to(device)).half().cpu())
    data = {"latents": torch.cat(lat)[:clips], "foreground": torch.stack(fg)[:clips], "scenes": scenes[:clips]}
    torch.save(data, work / out_name)
    return {"wall_s": time.time() - t0, "clips": clips, "latent_shape": list(data["latents"].shape)}


def make_chunkwise_dataset(preset, work: Path, seed: int, clips: int, batch: int = 8, device: str = "cpu",
                           mix: ClipMix = ClipMix()) -> dict:
    """Fresh 5-second clips (their own world seed, kinds drawn per `mix`) encoded chunk by chunk
    (`encode_chunkwise`), for the `recode` stage, in `data_chunkwise.pt`."""
    bounds = chunk_bounds(preset)

    def draw(world):
        frames, scene, kind = world.sample_training(bounds, preset.height, mix)
        return frames, scene_to_dict(scene, kind)

    return _encode_fresh_clips(preset, work, seed, clips, batch, device, draw, encode_chunkwise,
                               "data_chunkwise.pt", "data (chunk by chunk)")


def make_first_chunk_dataset(preset, work: Path, seed: int, clips: int, batch: int = 32, device: str = "cpu") -> dict:
    """Fresh clips of one first stream chunk each (`Preset.chunk_video_frames(0)`: 9 frames -> 3 latent frames),
    from their own world seed, for the `first` stage, in `data_first.pt`."""
    n_frames = preset.chunk_video_frames(0)[1]

    def draw(world):
        frames, _, scene = world.sample(n_frames, preset.height, augment_caption=False)
        return frames, scene_to_dict(scene)

    return _encode_fresh_clips(preset, work, seed, clips, batch, device, draw,
                               lambda vae, x: vae.encode(x).latent_dist.mean, "data_first.pt", "data (first chunks)")


# ============================================================================================ stage 3: DiT

@dataclass
class DiTRecipe:
    steps: int = 2400                   # the whole recipe: ~60 min on the 2-core dev machine (toyworld/README.md);
                                        #   3,200 until session 16, cut so the first stage could grow
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    fg_weight: float = 1.5              # latent positions under a shape weigh up to 1 + fg_weight (was 4: the
                                        #   background's pattern then counted least, and was lost; RETRAIN_PLAN.md)
    null_prompt_prob: float = 0.1       # empty prompt: the unconditional branch classifier-free guidance needs
    ctx_noise_prob: float = 0.5         # share of samples whose clean context gets a little noise (robustness)
    ctx_noise_max: float = 0.1
    own_context_prob: float = 0.5       # share of samples whose context is the model's own x0 estimates
    own_sigma: tuple[float, float] = (0.15, 0.4)
    drop_prob: float = 0.5              # share of steps that drop a run of middle chunks (packed/window contexts)
    switch_prob: float = 0.2            # share of steps that cut to another scene mid-clip (prompt switches)
    ema: float = 0.995
    sigma_levels: str = "uniform"        # "uniform": any level in (0, 1); "shifted": uniform warped by
    train_shift: float = 3.0             #   train_shift (more draws at high noise); "sampler": one of the 4
    level_jitter: float = 0.05           #   levels the sampler visits (+- level_jitter)
    drift_prob: float = 0.0              # share of steps whose context is a colour-drifted copy of the clip
    roll_prob: float = 0.0               # share of samples whose context ends in chunks the model *sampled* itself
    roll_chunks: int = 2                 #   (1..roll_chunks of them, 4 guided steps from pure noise)


@dataclass
class RecodeRecipe:
    """The `recode` stage: the teacher-forced DiT fine-tuned on fresh clips encoded chunk by chunk, whose later
    chunks do not carry the encoder's drift. Measured: streams stop drifting (toyworld/README.md).

    Its clips lean on the two situations the `dit` stage sees least: a stream started from a still picture (30%,
    70% of them with the empty prompt) and a subject that leaves and returns (30%). Measured (session 9, same `dit`
    weights, `toyworld.start_image`, packed, 120 s, no context guidance): the picture's colour kept in 57% of
    chunks, against 37% with the `dit` stage's mix (10% / 50% / 10%)."""
    clips: int = 512
    data_seed: int = 123
    steps: int = 640
    lr: float = 3e-4
    warmup: int = 20
    mix: ClipMix = field(default_factory=lambda: ClipMix(still_prob=0.3, still_empty_prompt=0.7, return_prob=0.3))


@dataclass
class FirstChunkRecipe:
    """The `first` stage: the fine-tuned DiT trained on first chunks alone, in bulk.

    The first chunk is the only one whose shape, background and subject count come from the text alone; later
    chunks copy their context, so what chunk 0 gets wrong the whole stream keeps. A first chunk alone attends only
    itself, so its loss needs neither the teacher-forcing clean copy nor an own-prediction pass (`dit_loss`): 48
    tokens per sample, a batch of 32 in ~0.3 s on 2 cores (0.6 s until session 19), ~5x more first chunks per
    second than the `dit` stage sees. `first_share` of the steps are such batches from `clips` fresh 9-frame clips
    (fresh for every pass with `fresh_clips`); the rest are ordinary `recode` steps on its clips and mix.
    Session 10 shipped 480 steps at lr 3e-4 with a share of 0.6 (at 0.8 one prompt switch in 10 took 3 chunks);
    with the `placed` world and the spatial table (session 15, eval/RETRAIN_PLAN.md) the shape and pattern come
    from this stage: all first chunks at lr 1e-3 for 700 steps took the pattern in whole streams from 5% to 48%
    and shape from 15% to 31% with all 20 switches still within 2 chunks, and 1,400 steps (819 s on 2 cores) took
    them further (eval/RETRAIN_PLAN.md, session 16; half clip steps instead cost shape in every later chunk), and a
    second cycle of 1,400 (`passes`, session 17) further again (shape of the first chunk 63 -> 78%). Session 19's
    fourth and fifth passes, each on clips of its own: shape 60 -> 71 -> 77% on a 17-prompt subset."""
    clips: int = 1536
    data_seed: int = 777
    steps: int = 1400
    passes: int = 4               # cosine cycles of `steps`; session 17's second pass: shape 42 -> 52%, squares 10 -> 37%;
                                  #   session 18's third: shape 47 -> 57% on a 17-prompt subset, session 19's fourth
                                  #   and fifth (fresh clips): 60 -> 71 -> 77% (eval/RETRAIN_PLAN.md). 4 since session
                                  #   21: a fresh run's fourth pass meets issue 16's targets (shape 82%) and the
                                  #   recipe fits the 90 minutes (88.2 measured); five did not (93.3, ~97)
    first_share: float = 1.0
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 20
    fresh_clips: bool = True      # each pass on first chunks of its own (data_seed + pass), not the first pass's again
    clip_kinds: str = ""          # the clip steps' clips: a comma list of kinds (CLIP_KINDS), "" for all of them
    clip_loss_from: int = 0       # the clip steps learn chunks from this one on (1: continuations alone)
    frozen: str = ""              # DiT parameters the passes leave alone (`tuned_parameters`), e.g. "attn1" for a
                                  #   pass after the memory stage meant to keep its reading of the mid blocks;
                                  #   session 25: it kept the motion and nearly the shape (79%), not the reading


@dataclass
class DriftRecipe:
    """The `drift` stage: a short fine-tune of the teacher-forced DiT against the drift of long streams.

    `drift_prob` of the steps continue from a colour-drifted copy of the clip (`toyworld.drift`): the context's
    background or subject has slid away from the prompt, the targets are the true clip's next chunks under its
    true caption. `roll_prob` of the samples instead continue from 1..`roll_chunks` chunks the model sampled
    itself with the shipped sampler (Self-Forcing's rollouts with the plain flow-matching loss and ground-truth
    targets); measured not to help here (toyworld/README.md), so off by default."""
    steps: int = 1000
    lr: float = 3e-4
    warmup: int = 20
    drift_prob: float = 0.5
    roll_prob: float = 0.0
    roll_chunks: int = 2


def draw_sigmas(shape: tuple[int, ...], preset, recipe: DiTRecipe, gen: torch.Generator) -> torch.Tensor:
    """Noise levels for training. `uniform` is the recipe. `sampler` trains only at the 4 levels the sampler visits,
    as few-step distillation does. It was tried and measured worse for this model (toyworld/README.md): prompt
    colour in 33% of probe chunks at step 3,000, against 75% for uniform."""
    if recipe.sigma_levels == "uniform":
        return torch.rand(shape, generator=gen)
    if recipe.sigma_levels == "shifted":
        from packcache.sampler import warp_sigma
        return warp_sigma(torch.rand(shape, generator=gen) * 1000.0, recipe.train_shift)
    from packcache.sampler import FlowSampler
    levels = torch.tensor(FlowSampler(preset.sampler).sigmas, dtype=torch.float32)
    pick = levels[torch.randint(len(levels), shape, generator=gen)]
    jitter = (torch.rand(shape, generator=gen) * 2 - 1) * recipe.level_jitter
    return (pick + jitter).clamp(0.02, 1.0)


def teacher_forcing_mask(chunk_ids: list[int], tokens_per_frame: int, chunk_frames: int) -> torch.Tensor:
    """bool (2N, 2N) for the sequence [clean copy ; noisy copy] of the same frames.

    chunk_ids: for each *chunk* of the (possibly subsampled) clip, its order index 0..K-1. Clean chunk a sees clean
    chunks <= a; noisy chunk i sees clean chunks < i and itself; clean never sees noisy.
    """
    k = len(chunk_ids)
    per_token = torch.arange(k).repeat_interleave(chunk_frames * tokens_per_frame)
    n = per_token.numel()
    a = per_token[:, None]
    b = per_token[None, :]
    mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    mask[:n, :n] = b <= a
    mask[n:, :n] = b < a
    mask[n:, n:] = b == a
    return mask


class CaptionSampler:
    """Re-draws a paraphrased caption for a stored scene each time (caption augmentation), and embeds it; with
    `null_prob`, the empty prompt instead (classifier-free guidance's unconditional branch)."""

    def __init__(self, preset, scenes: list[dict], seed: int, null_prob: float = 0.0, mix: ClipMix = ClipMix(),
                 encoder=None, return_bg_color_drop: float = 0.0):
        from packcache.text import CachedTextEncoder, build_text_encoder
        # samplers of one loop share one encoder, and its embeddings of the captions drawn so far
        self.encoder = encoder or CachedTextEncoder(build_text_encoder(preset.text))
        self.scenes = [scene_from_dict(d) for d in scenes]
        self.kinds = [d.get("clip", "normal") for d in scenes]
        self.rng = np.random.default_rng(seed)
        self.null_prob = null_prob
        self.mix = mix
        self.return_bg_color_drop = return_bg_color_drop

    def text_for(self, i: int) -> str:
        """Empty with `null_prob` (and for `mix.still_empty_prompt` of the still-start clips: a picture with no
        prompt); a `return` clip's caption leaves out the colour (it is in the clip's earlier chunks), and with
        `return_bg_color_drop` the background's colour as well (the memory test's prompt names no colour at all)."""
        kind = self.kinds[int(i)]
        if self.rng.random() < self.null_prob or (kind == "still" and self.rng.random() < self.mix.still_empty_prompt):
            return ""
        # (the extra draw only when dropping is on: the other stages keep the random stream they always had)
        plain = kind == "return" and self.return_bg_color_drop > 0 and self.rng.random() < self.return_bg_color_drop
        return caption(self.scenes[int(i)], self.rng if self.rng.random() < 0.8 else None, colors=kind != "return",
                       background_color=not plain)

    def __call__(self, idx) -> tuple[torch.Tensor, list[str]]:
        texts = [self.text_for(i) for i in idx]
        return self.encoder.encode(texts), texts


def build_model(preset, seed: int):
    from packcache.model import CausalWanModel
    torch.manual_seed(seed)
    return CausalWanModel(preset.transformer)


def foreground_weight(fg: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Extra loss weight per latent position from its foreground share: `fg_weight` once a quarter of it is under a
    shape (the DiT stage, and the memory stage's packed view)."""
    return fg_weight * (4.0 * fg).clamp(max=1.0)


def dit_loss(model, latents: torch.Tensor, text: torch.Tensor, preset, recipe: DiTRecipe,
             gen: torch.Generator, keep_chunks: list[int], loss_from_chunk: int = 0,
             fg: torch.Tensor | None = None, null_text: torch.Tensor | None = None,
             teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """Teacher-forcing flow-matching loss on a batch of clips (B, 16, F, h, w), chunks `keep_chunks` only.

    One noise level per chunk (diffusion-forcing style), from `draw_sigmas`.
    Chunks before `loss_from_chunk` are context only (a prompt switch: they come from another scene). `fg`
    (B, F, h, w): foreground share per latent position, weighing the shapes up. `null_text` (1, L, D): the empty
    prompt's embedding, for the guided rollouts of `recipe.roll_prob`. `teacher`: a frozen DiT whose velocity on the
    same inputs is the target instead of the clip's (`anchored`)."""
    T = preset.cache.chunk_frames
    b = latents.shape[0]
    dev = latents.device                # random draws come from `gen` on the CPU, so every device draws the same
    frames = torch.cat([torch.arange(c * T, (c + 1) * T) for c in keep_chunks])
    x0 = latents[:, :, frames.to(dev)].float()
    k = len(keep_chunks)
    f = x0.shape[2]
    sigma = draw_sigmas((b, k), preset, recipe, gen).to(dev)
    sig_f = sigma.repeat_interleave(T, dim=1)                                   # (B, F)
    eps = noise_like(x0, gen)
    xn = (1 - sig_f)[:, None, :, None, None] * x0 + sig_f[:, None, :, None, None] * eps
    pos = torch.arange(f, dtype=torch.float64)
    if k == 1:      # a chunk alone (the `first` stage) attends only itself: a clean copy, its own-prediction pass and
        def alone(m):     # context noise would change nothing the loss sees
            return m.forward_sequence(xn, sig_f * 1000.0, text, pos)
        v, target = alone(model), anchored(teacher, alone)
        return _weighted_flow_loss(v, eps, x0, fg, frames, keep_chunks, loss_from_chunk, recipe, target=target)
    mask = teacher_forcing_mask(list(range(k)), preset.tokens_per_frame, T).to(dev)
    context = x0
    # (the rollout draw only when rollouts are on: the `dit` stage keeps the random stream it always had)
    # (rollouts need a chunk to sample between ground-truth chunk 0 and the chunk learned: first chunks alone have none)
    rolls = recipe.roll_prob > 0 and k >= 3
    roll = torch.rand(b, generator=gen) < recipe.roll_prob if rolls else torch.zeros(b, dtype=torch.bool)
    own = (torch.rand(b, generator=gen) < recipe.own_context_prob) & ~roll
    if own.any():
        context = own_predictions(model, x0, own, text, recipe, gen, pos, mask)
    first_rolled = k
    if roll.any():
        n_gen = int(torch.randint(1, recipe.roll_chunks + 1, (1,), generator=gen))
        first_rolled = max(1, k - 1 - n_gen)
        context = rollout_context(model, context, roll, text, null_text, preset, gen, first_rolled)
    ctx_s = torch.rand(b, generator=gen) * recipe.ctx_noise_max
    ctx_s = torch.where(torch.rand(b, generator=gen) < recipe.ctx_noise_prob, ctx_s, torch.zeros(b)).to(dev)
    eps2 = noise_like(x0, gen)
    xc = (1 - ctx_s)[:, None, None, None, None] * context + ctx_s[:, None, None, None, None] * eps2
    inp = torch.cat([xc, xn], dim=2)
    timestep = torch.cat([ctx_s[:, None].expand(b, f), sig_f], dim=1) * 1000.0
    def paired(m):
        return m.forward_sequence(inp, timestep, text, torch.cat([pos, pos]), mask)[:, :, f:]
    v, target = paired(model), anchored(teacher, paired)
    skip = (roll.to(dev), (first_rolled + 1) * T) if roll.any() else None
    return _weighted_flow_loss(v, eps, x0, fg, frames, keep_chunks, loss_from_chunk, recipe, skip, target)


def anchored(teacher: torch.nn.Module | None, forward) -> torch.Tensor | None:
    """The frozen `teacher`'s velocity (`forward(teacher)`), the target of an anchored step; None without one.
    Why: a stage that teaches the DiT one new thing can hold it to its start's predictions on everything else
    (a distillation anchor) instead of to the clips', which a teacher-forced fine-tune drifts away from
    (session 25: any such continuation cost the shipped DiT's shape, 82% -> 65-77%)."""
    if teacher is None:
        return None
    with torch.no_grad():
        return forward(teacher).float()


def _weighted_flow_loss(v: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, fg: torch.Tensor | None,
                        frames: torch.Tensor, keep_chunks: list[int], loss_from_chunk: int, recipe: DiTRecipe,
                        skip: tuple[torch.Tensor, int] | None = None,
                        target: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity error, positions under shapes weighted up, chunks before `loss_from_chunk` out; `skip` (rows,
    frames): those rows learn nothing in their first frames (rolled-out samples learn only where their context holds
    sampled chunks). `target`: the velocity to match (an anchored step's teacher), the clip's `eps - x0` if None."""
    b, f, dev, T = x0.shape[0], x0.shape[2], x0.device, x0.shape[2] // len(keep_chunks)
    w = torch.ones(b, f, *x0.shape[3:], device=dev)
    if fg is not None:
        w = w + foreground_weight(fg[:, frames.to(fg.device)].float().to(dev), recipe.fg_weight)
    in_loss = torch.tensor([float(c >= loss_from_chunk) for c in keep_chunks], device=dev).repeat_interleave(T)
    w = w * in_loss[None, :, None, None]
    if skip is not None:
        w[skip[0], :skip[1]] = 0.0
    err = (v.float() - ((eps - x0) if target is None else target)).pow(2).mean(dim=1)   # (B, F, h, w)
    return (err * w).sum() / w.sum().clamp_min(1.0)


@torch.no_grad()
def own_predictions(model, x0: torch.Tensor, rows: torch.Tensor, text: torch.Tensor, recipe: DiTRecipe,
                    gen: torch.Generator, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The clean context replaced, for the samples in `rows`, by the model's own x0 estimates from a noise level
    in `own_sigma`: what the 4-step sampler commits (its last step predicts x0 from sigma 0.25 at shift 1, from 0.63
    at shift 5), so the model learns to continue from its own imperfect chunks rather than only from ground truth
    (the drift of long rollouts). One extra forward pass, no backward; a cheap stand-in for Self-Forcing's full
    rollouts."""
    lo, hi = recipe.own_sigma
    dev = x0.device
    rows = rows.to(dev)
    xs = x0[rows]
    eps = noise_like(xs, gen)
    n = xs.shape[0]
    sigma = (lo + (hi - lo) * torch.rand(n, generator=gen)).to(dev)
    s5 = sigma[:, None, None, None, None]
    noisy = (1 - s5) * xs + s5 * eps
    f = xs.shape[2]
    timestep = torch.cat([torch.zeros(n, f, device=dev), sigma[:, None].expand(n, f)], dim=1) * 1000.0
    v = model.forward_sequence(torch.cat([xs, noisy], dim=2), timestep, text[rows], torch.cat([pos, pos]), mask)
    out = x0.clone()
    out[rows] = (noisy - s5 * v[:, :, f:].float()).to(x0.dtype)
    return out


@torch.no_grad()
def rollout_context(model, context: torch.Tensor, rows: torch.Tensor, text: torch.Tensor, null_text: torch.Tensor,
                    preset, gen: torch.Generator, first: int) -> torch.Tensor:
    """The context of the samples in `rows` with its chunks `first` .. k-2 (never chunk 0) replaced by chunks
    the model samples one after another, exactly as a stream does: the preset's sampler (4 Euler steps from pure
    noise, classifier-free guidance against `null_text`), each chunk attending the clean chunks before it, ground
    truth or already sampled. The last chunk's loss then sees a context ending in k-1-first chunks of the model's.

    The unconditional branch sees the context under the empty prompt, as training's empty-prompt samples do (the
    stream's cache holds it under the prompt: a small difference)."""
    from packcache.sampler import FlowSampler
    sampler = FlowSampler(preset.sampler)
    T, tpf = preset.cache.chunk_frames, preset.tokens_per_frame
    dev = context.device
    rows = rows.to(dev)
    ctx = context[rows].clone()
    n, k = ctx.shape[0], ctx.shape[2] // T
    per_chunk = T * tpf
    full = teacher_forcing_mask(list(range(k)), tpf, T)          # [clean 0..k-1 ; noisy 0..k-1]
    texts = torch.cat([text[rows], null_text.to(dev).expand(n, *null_text.shape[1:])]) if sampler.guided \
        else text[rows]
    assert 1 <= first <= k - 2, "chunk 0 stays ground truth and the last chunk is the one to learn"
    for c in range(first, k - 1):
        keep = torch.cat([torch.arange(c * per_chunk), k * per_chunk + torch.arange(c * per_chunk, (c + 1) * per_chunk)])
        mask = full[keep][:, keep].to(dev)                        # clean 0..c-1 block-causal, noisy c sees them
        pos = torch.arange((c + 1) * T, dtype=torch.float64)
        x = noise_like(ctx[:, :, c * T:(c + 1) * T], gen)
        x0 = x
        for step, sigma in enumerate(sampler.sigmas):
            inp = torch.cat([ctx[:, :, :c * T], x], dim=2)
            t = torch.cat([torch.zeros(n, c * T), torch.full((n, T), sigma)], dim=1).to(dev) * 1000.0
            if sampler.guided:
                inp, t = torch.cat([inp, inp]), torch.cat([t, t])
            v = model.forward_sequence(inp, t, texts, pos, mask)[:, :, c * T:]
            v = sampler.guide(v[:n], v[n:]) if sampler.guided else v
            x0 = sampler.x0_from_velocity(x, v, sigma)
            if step + 1 < sampler.steps:
                x = sampler.next_x(x, v, x0, step, lambda x=x: noise_like(x, gen))
        ctx[:, :, c * T:(c + 1) * T] = x0.to(ctx.dtype)
    out = context.clone()
    out[rows] = ctx
    return out


def choose_chunks(rng: np.random.Generator, n_chunks: int, sink: int, drop_prob: float) -> list[int]:
    """All chunks, or (with drop_prob) the sink chunks then a run of >= 2 consecutive later chunks, which may
    start right after the sink or leave a gap: the contexts bounded caches (sink + recent) produce. Shorter
    sequences are also cheaper."""
    if rng.random() >= drop_prob or n_chunks < sink + 3:
        return list(range(n_chunks))
    start = int(rng.integers(sink, n_chunks - 1))
    end = int(rng.integers(start + 2, n_chunks + 1))
    return list(range(sink)) + list(range(start, end))


DIT_FILE = "dit_ema.pt"        # the teacher-forced DiT (stage `dit`)
TUNED_FILE = "dit_tuned.pt"    # fine-tuned (stages `recode`, `drift`); `hr` and `pack` take it when present


def final_dit_file(work: Path) -> Path:
    """The DiT the later stages use: the fine-tuned one when there is one (the `dit` stage deletes it)."""
    tuned = work / TUNED_FILE
    return tuned if tuned.exists() else work / DIT_FILE


def _step(model, opt, params, ema: dict, recipe: DiTRecipe, step: int, loss: torch.Tensor) -> None:
    """One optimiser step and the EMA update (warming up: the average starts short)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        d = min(recipe.ema, (1 + step) / (10 + step))
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}   # kept bit for bit: the average
        for k, v in model.state_dict().items():                                   # of a constant still rounds
            if v.dtype.is_floating_point and k not in frozen:
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)


def clip_loss(model, data: dict, idx: np.ndarray, text: torch.Tensor, preset, recipe: DiTRecipe,
              rng: np.random.Generator, gen: torch.Generator, device: str = "cpu",
              null_text: torch.Tensor | None = None, loss_from_chunk: int = 0,
              teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """The `dit` stage's teacher-forcing loss on clips `idx` of `data` with its augmentations: chunk dropping (the
    packed and window caches' contexts), scene cuts (prompt switches) and, with `data["drifted"]`, drifted contexts.
    Shared by every stage that keeps those behaviours while it trains something else."""
    latents, fg = data["latents"], data["foreground"]
    T = preset.cache.chunk_frames
    n_chunks = latents.shape[2] // T
    keep = choose_chunks(rng, n_chunks, preset.cache.sink_chunks, recipe.drop_prob)
    batch, batch_fg = latents[idx], fg[idx]
    loss_from = 0
    u = rng.random()
    if u < recipe.switch_prob:   # context from scene A, prompt and continuation from scene B
        j = int(rng.choice(keep[1:]))
        other = latents[rng.integers(0, latents.shape[0], size=len(idx))]
        batch = torch.cat([other[:, :, :j * T], batch[:, :, j * T:]], dim=2)
        loss_from = j
    elif u < recipe.switch_prob + recipe.drift_prob:   # context drifted off the prompt, continuation true
        j = int(rng.choice(keep[1:]))
        batch = torch.cat([data["drifted"][idx][:, :, :j * T], batch[:, :, j * T:]], dim=2)
        loss_from = j
    return dit_loss(model, batch.to(device), text.to(device), preset, recipe, gen, keep,
                    max(loss_from, loss_from_chunk), batch_fg.to(device), null_text, teacher)


def first_chunk_loss(model, first: dict, idx: np.ndarray, text: torch.Tensor, preset, recipe: DiTRecipe,
                     gen: torch.Generator, device: str = "cpu",
                     teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """The loss on first chunks alone (`make_first_chunk_dataset` clips `idx`): no context, the text is all."""
    return dit_loss(model, first["latents"][idx].to(device), text.to(device), preset, recipe, gen, [0], 0,
                    first["foreground"][idx].to(device), teacher=teacher)


def tuned_parameters(model: torch.nn.Module, only: str = "", frozen: str = "") -> list[torch.nn.Parameter]:
    """The DiT parameters a stage trains: those whose names hold a fragment of the comma list `only` (empty: all),
    less those that hold one of `frozen`; the others get no gradient. Why: a stage that should change one thing
    (the memory stage's reading, the `first` pass's shape binding) can leave the weights of the other alone."""
    def fragments(text: str) -> list[str]:
        return [p.strip() for p in text.split(",") if p.strip()]
    wanted, kept = fragments(only), fragments(frozen)
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_((not wanted or any(f in name for f in wanted)) and not any(f in name for f in kept))
        if p.requires_grad:
            chosen.append(p)
    if not chosen:
        raise SystemExit(f"training only {only!r} less {frozen!r} matches no DiT parameter")
    return chosen


def train_dit(preset, work: Path, seed: int, recipe: DiTRecipe, data: dict | None = None,
              device: str = "cpu", init: Path | None = None, out_name: str = DIT_FILE, name: str = "dit",
              warmup: int = 100, mix: ClipMix = ClipMix(), first: dict | None = None, first_share: float = 0.0,
              first_batch: int = 32, clip_loss_from: int = 0, frozen: str = "") -> dict:
    """Teacher forcing from scratch (stage `dit`) or, with `init` and the recipe's drift and rollout shares, the
    fine-tune against drift (stage `drift`): one loop, EMA weights saved as `out_name`, curve and report under
    `name`. With `first` (a `make_first_chunk_dataset`), `first_share` of the steps train a batch of
    `first_batch` first chunks alone instead (stage `first`). `frozen`: parameters left as they are
    (`tuned_parameters`)."""
    data = data or torch.load(work / "data.pt")
    n = data["latents"].shape[0]
    model = build_model(preset, seed)
    if init is not None:
        model.load_state_dict(torch.load(init))
    model = model.to(device).train()
    params = tuned_parameters(model, frozen=frozen)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    captions = CaptionSampler(preset, data["scenes"], seed + 3, recipe.null_prompt_prob, mix)
    first_captions = (CaptionSampler(preset, first["scenes"], seed + 6, recipe.null_prompt_prob,
                                     encoder=captions.encoder) if first else None)
    null_text = captions.encoder.encode([""]).to(device) if recipe.roll_prob > 0 else None
    gen = torch.Generator().manual_seed(seed + 4)
    rng = np.random.default_rng(seed + 5)
    hist: list[float] = []
    first_hist: list[float] = []

    def curves() -> dict:
        named = {"flow-matching loss (weighted)" + (", clips" if first_hist else ""): hist}
        return {**named, "first chunks alone": first_hist} if first_hist else named

    t0 = time.time()
    for step in progress(range(recipe.steps), recipe.steps, name):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, recipe.steps, recipe.lr, warmup=warmup)
        if first_captions is not None and rng.random() < first_share:   # (no draw without: same stream as before)
            idx = rng.integers(0, len(first["scenes"]), size=first_batch)
            text, _ = first_captions(idx)
            loss = first_chunk_loss(model, first, idx, text, preset, recipe, gen, device)
            _step(model, opt, params, ema, recipe, step, loss)
            first_hist.append(loss.item())
        else:
            idx = rng.integers(0, n, size=recipe.batch)
            text, _ = captions(idx)
            loss = clip_loss(model, data, idx, text, preset, recipe, rng, gen, device, null_text, clip_loss_from)
            _step(model, opt, params, ema, recipe, step, loss)
            hist.append(loss.item())
        if step % 100 == 0:
            logger.info("%s step %d loss %.4f (%.0fs)", name, step, float(np.mean(hist[-100:] or first_hist[-100:])),
                        time.time() - t0)
            save_curve(work / f"loss_{name}.png", curves(), f"causal DiT ({name})")
        if step % 500 == 499:
            torch.save({k: v.cpu() for k, v in ema.items()}, work / out_name)
    wall = time.time() - t0
    torch.save({k: v.cpu() for k, v in ema.items()}, work / out_name)
    save_curve(work / f"loss_{name}.png", curves(), f"causal DiT ({name})")
    reported = hist or first_hist           # a stage of first chunks alone (first_share 1) has no clip steps
    info = {"wall_s": wall, "steps": len(hist) + len(first_hist), "first_loss": float(np.mean(reported[:100])),
            "final_loss": float(np.mean(reported[-100:]))}
    if first_hist:
        info.update(first_chunk_steps=len(first_hist), first_chunk_first_loss=float(np.mean(first_hist[:100])),
                    first_chunk_final_loss=float(np.mean(first_hist[-100:])))
    (work / f"{name}.json").write_text(json.dumps(info))
    return info


def make_recode_clips(preset, work: Path, seed: int, tune: RecodeRecipe, device: str = "cpu") -> dict:
    """The `recode` stage's clips (`data_chunkwise.pt`) from its own seed: one place, so a stage that makes them
    afresh (`memory` on a folder started from a bundle) gets the very clips the recode stage trained on."""
    return make_chunkwise_dataset(preset, work, seed + tune.data_seed, tune.clips, device=device, mix=tune.mix)


def train_recode(preset, work: Path, seed: int, recipe: DiTRecipe, tune: RecodeRecipe, device: str = "cpu") -> dict:
    """Stage `recode`: encode `tune.clips` fresh clips chunk by chunk, then fine-tune the `dit` stage's weights on
    them with the DiT stage's loss and augmentations."""
    from dataclasses import replace
    data_info = make_recode_clips(preset, work, seed, tune, device)
    logger.info("chunk-by-chunk data done in %.0fs", data_info["wall_s"])
    r = replace(recipe, steps=tune.steps, lr=tune.lr, drift_prob=0.0, roll_prob=0.0)
    info = train_dit(preset, work, seed + 50, r, data=torch.load(work / "data_chunkwise.pt"), device=device,
                     init=work / DIT_FILE, out_name=TUNED_FILE, name="recode", warmup=tune.warmup, mix=tune.mix)
    return {**info, "data": data_info}


def clips_of_kinds(data: dict, kinds: list[str]) -> dict:
    """The clips of a dataset (`make_chunkwise_dataset`) whose kind is one of `kinds`."""
    from .world import CLIP_KINDS
    unknown = set(kinds) - set(CLIP_KINDS)
    if unknown:
        raise SystemExit(f"unknown clip kinds {sorted(unknown)}; kinds: {', '.join(CLIP_KINDS)}")
    keep = [i for i, d in enumerate(data["scenes"]) if d.get("clip", "normal") in kinds]
    return {"latents": data["latents"][keep], "foreground": data["foreground"][keep],
            "scenes": [data["scenes"][i] for i in keep]}


def train_first(preset, work: Path, seed: int, recipe: DiTRecipe, tune: FirstChunkRecipe,
                device: str = "cpu") -> dict:
    """Stage `first`: fresh first-chunk clips, then the current DiT (after `recode`) fine-tuned on them
    (`tune.first_share` of the steps) and on the `recode` stage's clips and mix (the rest)."""
    from dataclasses import replace
    if not (work / "data_chunkwise.pt").exists():
        raise SystemExit("the first stage continues from the recode stage: run it first (--stages recode,first,...)")
    r = replace(recipe, steps=tune.steps, lr=tune.lr, drift_prob=0.0, roll_prob=0.0)
    clips = torch.load(work / "data_chunkwise.pt")                                  # read-only
    if tune.clip_kinds:
        clips = clips_of_kinds(clips, tune.clip_kinds.split(","))
    passes, data_infos = [], []
    for k in range(tune.passes):        # each pass a fresh cosine cycle from the previous one's weights
        if k == 0 or tune.fresh_clips:  # and, with fresh_clips, on clips of its own (the same draws otherwise)
            data_infos.append(make_first_chunk_dataset(preset, work, seed + tune.data_seed + k, tune.clips,
                                                       device=device))
            logger.info("first-chunk data of pass %d done in %.0fs", k + 1, data_infos[-1]["wall_s"])
            first = torch.load(work / "data_first.pt")
        info = train_dit(preset, work, seed + 60, r, data=clips, device=device, init=final_dit_file(work),
                         out_name=TUNED_FILE, name="first", warmup=tune.warmup, mix=RecodeRecipe().mix, first=first,
                         first_share=tune.first_share, first_batch=tune.batch, clip_loss_from=tune.clip_loss_from,
                         frozen=tune.frozen)
        passes.append({key: info[key] for key in ("wall_s", "first_loss", "final_loss") if key in info})
        logger.info("first pass %d of %d: loss %.4f -> %.4f", k + 1, tune.passes, info["first_loss"],
                    info["final_loss"])
    data_info = {"wall_s": sum(d["wall_s"] for d in data_infos), "clips": sum(d["clips"] for d in data_infos),
                 "latent_shape": data_infos[-1]["latent_shape"], "sets": len(data_infos)}
    return {**info, "wall_s": sum(p_["wall_s"] for p_ in passes), "passes": passes, "data": data_info}


def train_drift(preset, work: Path, seed: int, recipe: DiTRecipe, tune: DriftRecipe, device: str = "cpu") -> dict:
    """Stage `drift`: the current DiT (after `recode` when it ran) fine-tuned per `DriftRecipe`, same data and
    augmentations, fresh seeds."""
    from dataclasses import replace
    data = torch.load(work / "data.pt")
    if tune.drift_prob > 0 and "drifted" not in data:
        raise SystemExit("the drift stage needs the drifted copies: run the data stage with it "
                         "(--stages data,drift,...)")
    r = replace(recipe, steps=tune.steps, lr=tune.lr, drift_prob=tune.drift_prob, roll_prob=tune.roll_prob,
                roll_chunks=tune.roll_chunks)
    return train_dit(preset, work, seed + 50, r, data=data, device=device, init=final_dit_file(work),
                     out_name=TUNED_FILE, name="drift", warmup=tune.warmup)


# ========================================================================================== pack and save

def pack(preset, work: Path, out: Path, extra_info: dict) -> None:
    from safetensors.torch import save_file
    state = {}
    for k, v in torch.load(final_dit_file(work)).items():
        state[f"transformer.{k[len('transformer.'):]}" if k.startswith("transformer.") else f"transformer.{k}"] = v
    for k, v in torch.load(work / "vae.pt").items():
        state[f"vae.{k}"] = v
    if (work / "hr.pt").exists():
        for k, v in torch.load(work / "hr.pt").items():
            state[f"compressor.{k}"] = v
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"preset": "toy", "format": "packcache-bundle-1"})
    out.with_suffix(".json").write_text(json.dumps(extra_info, indent=2))
    if out.resolve() == DEFAULT_OUT.resolve():   # the shipped weights' curves are kept in the repository
        for png in work.glob("loss_*.png"):
            shutil.copy(png, ROOT / "toyworld" / "curves" / png.name)
    logger.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)


# ===================================================================================================== main

STAGES = ("vae", "vae_tune", "vae_stream", "vae_blotch", "data", "dit", "recode", "first", "drift", "hr", "memory",
          "pack")
# `drift` and `memory` measured, not shipped (toyworld/README.md). The VAE stages are not in the default either: the
# recipe takes the VAE from the shipped bundle (`--vae-from`, tuned since session 17, its decoder since session 18 and
# 20) and spends its 90 CPU minutes on the DiT; `--stages vae,vae_tune,vae_stream,vae_blotch,...` retrains it
# (toyworld/eval/RETRAIN_PLAN.md).
DEFAULT_STAGES = ("data", "dit", "recode", "first", "hr", "pack")
# each VAE tuning stage and the key its report goes under in the VAE's own report (`vae_from_bundle`)
VAE_TUNING_KEYS = (("vae_tune", "tuned"), ("vae_stream", "stream_decoder"), ("vae_blotch", "blotch_decoder"))


def vae_from_bundle(bundle: Path, work: Path) -> dict:
    """The `vae.` weights of a packed bundle as the work folder's vae.pt (what the `vae` stage would write), and
    that bundle's report of how its VAE was trained."""
    from safetensors.torch import load_file
    state = {k[len("vae."):]: v for k, v in load_file(str(bundle)).items() if k.startswith("vae.")}
    if not state:
        raise SystemExit(f"{bundle} has no vae.* weights; train one with --stages vae,...")
    torch.save(state, work / "vae.pt")
    sidecar = bundle.with_suffix(".json")
    report = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    trained = {**report.get("vae", {}), **{key: report[stage] for stage, key in VAE_TUNING_KEYS if stage in report}}
    info = {**trained, "from": str(bundle.resolve().relative_to(ROOT) if bundle.resolve().is_relative_to(ROOT)
                                   else bundle)}
    (work / "vae.json").write_text(json.dumps(info))
    return info


BUNDLE_STAGES = ("data", "dit", "recode", "first", "hr")     # the stages whose results a bundle carries


def work_from_bundle(bundle: Path, work: Path) -> dict:
    """A work folder that continues a packed bundle: its DiT as dit_tuned.pt, its HR branch as hr.pt, its VAE as
    vae.pt, and its report of the stages that made them, so that a later stage (`memory`) runs on the shipped model
    without the 90 minutes of stages before it. What the bundle does not carry (the recode stage's clips) the stage
    that needs them makes afresh from the same seeds."""
    from safetensors.torch import load_file
    state = load_file(str(bundle))
    dit = {k: v for k, v in state.items() if k.startswith("transformer.")}     # the DiT's own keys, as `pack` takes
    hr = {k[len("compressor."):]: v for k, v in state.items() if k.startswith("compressor.hr.")}
    if not dit or not hr:
        raise SystemExit(f"{bundle} lacks transformer.* or compressor.hr.* weights: not a packed toy bundle")
    torch.save(dit, work / TUNED_FILE)
    torch.save(hr, work / "hr.pt")
    vae_from_bundle(bundle, work)
    sidecar = bundle.with_suffix(".json")
    report = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    for stage in BUNDLE_STAGES:
        if stage in report:
            (work / f"{stage}.json").write_text(json.dumps(report[stage]))
    command = report.get("command", [])
    info = {"bundle": str(bundle), "command": command if isinstance(command, list) else [command]}
    (work / "from_bundle.json").write_text(json.dumps(info))
    return info


def vae_retune_warnings(stages: list[str], summary: dict) -> list[str]:
    """One line per VAE tuning stage asked for on a VAE that has had it already (taken from a bundle that records
    it, or run earlier in this work folder): running it again tunes further, which is rarely what was meant."""
    out = []
    for stage, key in VAE_TUNING_KEYS:
        if stage in stages and "vae" not in stages and (key in summary.get("vae", {}) or stage in summary):
            out.append(f"{stage}: the work folder's VAE has had this stage already (from "
                       f"{summary.get('vae', {}).get('from', 'an earlier run')}); running it again tunes it further "
                       f"(--stages vae,{stage},... starts from a fresh VAE)")
    return out


def _parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def recipe_with(base, steps: int | None, settings: list[str], ap: argparse.ArgumentParser,
                option: str = "--memory-set"):
    """A recipe dataclass `base` with `steps` (None: its own) and each FIELD=VALUE of `option` applied, typed as the
    field's default; a setting that names no field or does not parse is one usage error."""
    from dataclasses import fields, replace
    known = {f.name: type(getattr(base, f.name)) for f in fields(base)}
    changes = {} if steps is None else {"steps": steps}
    for item in settings:
        name, _, value = item.partition("=")
        if name not in known or not value:
            ap.error(f"{option} {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(known)}")
        try:
            changes[name] = _parse_bool(value) if known[name] is bool else known[name](value)
        except ValueError:
            ap.error(f"{option} {item!r}: {value!r} is not a {known[name].__name__}")
    return replace(base, **changes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="safetensors file to write")
    ap.add_argument("--work", type=Path, default=None, help="working folder for stage outputs (default: next to --out)")
    ap.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                    help=f"comma list of stages to run, from {STAGES} (default: all but drift)")
    ap.add_argument("--vae-from", type=Path, default=DEFAULT_OUT,
                    help="without the vae stage, take the VAE from this bundle when the work folder has none "
                         "(default: the shipped weights)")
    ap.add_argument("--init-from", type=Path, default=None, metavar="BUNDLE",
                    help="start the work folder from a packed bundle (its DiT, HR branch and VAE), e.g. "
                         "--init-from packcache/weights/toy.safetensors --stages memory,pack")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", choices=tuple(WORLD_STYLES), default=None,
                    help="the world the clips come from (toyworld.world.WorldStyle; default: the work folder's, "
                         "else placed)")
    ap.add_argument("--spatial-embedding", action=argparse.BooleanOptionalAction, default=None,
                    help="give the DiT a learned table of absolute token positions (default: the work folder's, "
                         "else yes)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2, or $TOYWORLD_THREADS)")
    ap.add_argument("--device", default=None, help="torch device to train on (default: cuda when there is one, else cpu)")
    ap.add_argument("--vae-steps", type=int, default=VAERecipe.steps)
    ap.add_argument("--clips", type=int, default=1024, help="5-second clips encoded for DiT training")
    ap.add_argument("--dit-steps", type=int, default=DiTRecipe.steps)
    ap.add_argument("--drift-steps", type=int, default=DriftRecipe.steps)
    ap.add_argument("--drift-prob", type=float, default=DriftRecipe.drift_prob,
                    help="share of the drift stage's steps that continue from a colour-drifted context")
    ap.add_argument("--roll-prob", type=float, default=DriftRecipe.roll_prob,
                    help="share of the drift stage's samples whose context ends in the model's own sampled chunks")
    ap.add_argument("--roll-chunks", type=int, default=DriftRecipe.roll_chunks,
                    help="the drift stage's rollouts sample 1..this many chunks before the last one")
    ap.add_argument("--drift-lr", type=float, default=DriftRecipe.lr)
    ap.add_argument("--hr-steps", type=int, default=300,
                    help="HR compressor steps (its packed-view loss is flat from the start: 0.46 -> 0.48 over 500)")
    ap.add_argument("--memory-steps", type=int, default=None,
                    help="steps of the memory stage (default: MemoryRecipe.steps, toyworld/train_memory.py)")
    ap.add_argument("--memory-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any other MemoryRecipe field of the memory stage, e.g. --memory-set first_share=0.2 "
                         "(repeatable)")
    ap.add_argument("--first-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a FirstChunkRecipe field of the first stage, e.g. --first-set first_share=0.6 (repeatable)")
    ap.add_argument("--fg-weight", type=float, default=DiTRecipe.fg_weight,
                    help="extra loss weight of latent positions under a shape in the DiT stages (see DiTRecipe)")
    ap.add_argument("--sigma-levels", choices=("uniform", "shifted", "sampler"), default=DiTRecipe.sigma_levels,
                    help="noise levels the DiT and HR stages train at (see DiTRecipe)")
    ap.add_argument("--own-sigma", type=float, nargs=2, default=DiTRecipe.own_sigma, metavar=("LO", "HI"),
                    help="noise range of the own-prediction contexts (the sampler's last level lies inside)")
    args = ap.parse_args(argv)
    from .train_memory import MemoryRecipe
    memory_tune = recipe_with(MemoryRecipe(), args.memory_steps, args.memory_set, ap)   # bad settings: before any work
    memory_tune.anchored_kinds()
    first_tune = recipe_with(FirstChunkRecipe(), None, args.first_set, ap, option="--first-set")
    if args.init_from is not None and not args.init_from.exists():      # refused before any work
        raise SystemExit(f"--init-from: no such bundle {args.init_from}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    logger.info("training on %s", device)
    work = args.work or args.out.parent / "toy_train"
    work.mkdir(parents=True, exist_ok=True)
    setup = Setup.of(work)
    setup = replace(setup, world=args.world or setup.world,
                    spatial_embedding=setup.spatial_embedding if args.spatial_embedding is None
                    else args.spatial_embedding)
    setup.save(work)
    preset = toy_preset(setup)
    logger.info("world %s, spatial embedding %s", setup.world, preset.transformer.spatial_embedding)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
    if args.init_from is not None:
        work_from_bundle(args.init_from, work)
        logger.info("work folder started from %s", args.init_from)
    # stages run in earlier invocations left their reports in the work folder: the summary starts from those
    summary = {st: {k: v for k, v in json.loads((work / f"{st}.json").read_text()).items() if k != "history"}
               for st in STAGES if (work / f"{st}.json").exists()}
    summary_path = work / "summary.json"
    recipe = DiTRecipe(steps=args.dit_steps, sigma_levels=args.sigma_levels, own_sigma=tuple(args.own_sigma),
                       fg_weight=args.fg_weight)
    t_all = time.time()
    if "vae" in stages:
        summary["vae"] = train_vae(preset, work, args.seed, VAERecipe(steps=args.vae_steps), device=device)
        logger.info("vae done in %.0fs: l1 %.4f", summary["vae"]["wall_s"], summary["vae"]["final_l1"])
    elif not (work / "vae.pt").exists() and {"vae_tune", "vae_stream", "vae_blotch", "data", "recode", "first",
                                             "pack"} & set(stages):
        summary["vae"] = vae_from_bundle(args.vae_from, work)
        logger.info("vae taken from %s", summary["vae"]["from"])
    for line in vae_retune_warnings(stages, summary):
        logger.warning(line)
    if "vae_tune" in stages:
        summary["vae_tune"] = tune_vae(preset, work, args.seed, VAETuneRecipe(), world_for(work, args.seed + 7),
                                       device=device)
        logger.info("vae_tune done in %.0fs: chroma %.4f", summary["vae_tune"]["wall_s"],
                    summary["vae_tune"]["final_chroma"])
    if "vae_stream" in stages:
        summary["vae_stream"] = tune_stream_decoder(preset, work, args.seed, StreamDecoderRecipe(),
                                                    world_for(work, args.seed + 8), device=device)
        logger.info("vae_stream done in %.0fs: chroma %.4f", summary["vae_stream"]["wall_s"],
                    summary["vae_stream"]["final_chroma"])
    if "vae_blotch" in stages:
        summary["vae_blotch"] = tune_stream_decoder(preset, work, args.seed, BLOTCH_DECODER,
                                                    world_for(work, args.seed + 10), device=device, name="vae_blotch")
        logger.info("vae_blotch done in %.0fs: chroma %.4f", summary["vae_blotch"]["wall_s"],
                    summary["vae_blotch"]["final_chroma"])
    if "data" in stages:
        summary["data"] = make_dataset(preset, work, args.seed, args.clips, device=device,
                                       drifted_copies="drift" in stages)
        logger.info("data done in %.0fs", summary["data"]["wall_s"])
    if "dit" in stages:
        summary["dit"] = train_dit(preset, work, args.seed, recipe, device=device)
        logger.info("dit done in %.0fs: loss %.4f", summary["dit"]["wall_s"], summary["dit"]["final_loss"])
        (work / TUNED_FILE).unlink(missing_ok=True)      # made from the previous DiT
        (work / "data_chunkwise.pt").unlink(missing_ok=True)
    if "recode" in stages:
        summary["recode"] = train_recode(preset, work, args.seed, recipe, RecodeRecipe(), device=device)
        logger.info("recode done in %.0fs: loss %.4f", summary["recode"]["wall_s"], summary["recode"]["final_loss"])
    if "first" in stages:
        summary["first"] = train_first(preset, work, args.seed, recipe, first_tune, device=device)
        logger.info("first done in %.0fs: loss %.4f", summary["first"]["wall_s"], summary["first"]["final_loss"])
    if "drift" in stages:
        tune = DriftRecipe(steps=args.drift_steps, lr=args.drift_lr, drift_prob=args.drift_prob,
                           roll_prob=args.roll_prob, roll_chunks=args.roll_chunks)
        summary["drift"] = train_drift(preset, work, args.seed, recipe, tune, device=device)
        logger.info("drift done in %.0fs: loss %.4f", summary["drift"]["wall_s"], summary["drift"]["final_loss"])
    if "hr" in stages:
        from .train_hr import train_hr
        info = train_hr(preset, work, args.seed, steps=args.hr_steps, recipe=recipe, device=device)
        summary["hr"] = {k: v for k, v in info.items() if k != "history"}
    if "memory" in stages:
        from .train_memory import train_memory
        summary["memory"] = train_memory(preset, work, args.seed, recipe, memory_tune, device=device)
        logger.info("memory done in %.0fs: packed-view loss %.4f", summary["memory"]["wall_s"],
                    summary["memory"]["final_loss"])
    summary_path.write_text(json.dumps(summary, indent=2))
    if "pack" in stages:
        command = "python -m toyworld.train " + " ".join(argv if argv is not None else sys.argv[1:])
        before = work / "from_bundle.json"      # a work folder continued from a bundle: the commands that made it
        summary["command"] = json.loads(before.read_text())["command"] + [command] if before.exists() else command
        summary["setup"] = setup.__dict__
        summary["device"] = str(device)
        summary["this_run_wall_s"] = time.time() - t_all
        pack(preset, work, args.out, summary)


if __name__ == "__main__":
    main()
