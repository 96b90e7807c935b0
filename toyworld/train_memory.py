"""Stage `memory` of `toyworld.train`: the DiT taught to read the packed cache's mid partition (issue 13).

Every other stage trains the DiT on full-resolution contexts, so the compressed mid blocks were inert: on the
memory test (`toyworld.memory`) every cache variant recalled the subject's colour at chance. This stage trains on
the view the packed cache builds at inference, [sink ; two compressed mid blocks ; recent] -> current (one
`packcache.layout` layout, as the `hr` stage), with leave-and-return clips shaped like the memory test: empty sink
chunks, the subject in view for 1-3 chunks, away for 1-3, then back, captioned without its colour. The loss is on
the chunk where it returns (or the one after), so the colour is only in the mid blocks; one of the two mid blocks
shown holds the subject (`subject_mid_prob` of the steps; otherwise any two), so the keys the current chunk's
queries learn to prefer are the subject's, which are what top-k selection ranks by (`packcache.selection`).

`recode_share` of the steps are ordinary `recode` steps (teacher forcing on that stage's clips and mix), so
the rest of the model's behaviour is kept. The HR compressor stays frozen (the `hr` stage's weights).

Measured (session 12, toyworld/README.md "The `memory` stage, measured"): with a few hundred clips and steps the
DiT does not learn to read the mid blocks (recall at chance even with the selection forced onto the subject's);
with 768 clips and 1,600 steps it does (top-k 0.50 against FIFO 0.17 and the window 0.12) but stops binding colour
words (prompt following 93% -> 47%) when none of the packed-view captions name the colour; naming it in 10% of them
(the defaults) kept 93% with top-k 0.29 against 0.12 and 0.08, and lost subject consistency over 20 s (0.85 ->
0.63). Session 13 (same README, "what limits it"): `first_share` 0.2 keeps prompt following (94%) and subject
consistency (0.75 vs 0.77) at 2,400 steps, and the model then recalls 0.38 with the subject's blocks forced into
the selection, but top-k picks them in 30% of its selections (chance 60%) and recalls 0.15; those are the defaults
now. Not in the default recipe: the selection is the limit now, and the recipe lacks the ~35 minutes.

Session 22 (same README, "session 22"): `selection_loss` (a hinge on the affinity the cache ranks by, `select_weight`)
fixed the selection: on the session-21 DiT top-k picks the subject's blocks in 98% of its selections (53% without,
60% at random), at the same subject consistency and prompt following. The recall stayed at chance, forced
selection included: this DiT, trained 2,400 steps on these clips, barely reads the blocks (return-chunk loss 0.7662
with the subject's block against 0.7699 with empty ones).

Session 23 (same README, "session 23"): the current chunk gave the subject's block 0.1-1.5% of its attention, so the
flow loss's gradient towards reading it was too weak. `reading_loss` (a hinge on that share, `read_weight`,
`read_floor`) raises it to the floor; with it the same stage recalls 0.77 through top-k (FIFO 0.06, window 0.02)
but loses a start picture with no prompt (0.47 over 120 s); with `ordinary_share` 0.2 (the default since) it keeps
it (0.99) and recalls 0.29 (FIFO and window 0.10).

Session 24 (same README, "session 24"): on the shipped bundle (`--init-from`) the defaults reproduce that (0.27 vs
FIFO 0.15) but the scene measures lose the shape from the second chunk on (82% -> 67%), also with twice the
recode steps or half the learning rate. Session 25: any teacher-forced continuation of the shipped DiT costs it,
memory steps or not (65-77%).

Session 26 (same README, "session 26"): the recode, first-chunk and ordinary packed-view steps take the frozen start
DiT's velocity as their target instead of the clip's (`anchor`, a distillation anchor), and the memory steps are
60% of the steps (`recode_share` 0.1, `first_share` 0.1, `ordinary_share` 0.2; the defaults since). The shipped
bundle is that stage run on session 21's: shape 83% (82% before), top-k recall 0.75 against FIFO 0.06 and the
window 0.10 over 20 s.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("toyworld.train")


ANCHORABLE = ("recode", "first", "ordinary")     # the step kinds that teach nothing new (not the memory steps)


@dataclass
class MemoryRecipe:
    clips: int = 768                # leave-and-return clips of `chunks` chunks, encoded chunk by chunk
    chunks: int = 10                # sink 2 + seen <= 3 + gap <= 3 + back >= 2
    data_seed: int = 901
    steps: int = 2400               # session 13's pilot F: with first_share 0.2 and recode_share 0.2, prompt
                                    # following 94% and subject consistency kept; the session-12 defaults (1,600
                                    # steps, 30% recode, no first-chunk steps) lost a stream's subject (0.63)
    batch: int = 8
    lr: float = 5e-4
    warmup: int = 20
    recode_share: float = 0.1       # ordinary recode steps among them (the rest of the behaviour kept; 0.2 until
                                    # session 26, whose anchored steps hold it with fewer)
    subject_mid_prob: float = 1.0   # steps whose two mid blocks include one that holds the subject
    next_chunk_prob: float = 0.25   # steps whose loss is on the chunk after the return (the subject in recent too)
    # the packed-view steps' noise levels and foreground weight: what only memory can tell is decided at high noise
    # (at sigma near 1 the noisy chunk shows no colour) and lies under the subject. With the DiT stage's uniform
    # levels and weight 1.5 the loss did not depend on the mid blocks at all after 600 steps (session 12).
    train_shift: float = 5.0
    fg_weight: float = 4.0
    bg_color_drop: float = 0.5      # captions without the background's colour either (the memory test's prompts)
    color_named: float = 0.1        # captions that do name the subject's colour: with none, prompt following
                                    # fell from 93% to 47%; with 0.3 (and 40% recode steps) the recall was gone
                                    # (session 12); 0.1 kept 93% and recall 0.29
    ordinary_share: float = 0.2     # packed-view steps on the recode stage's ordinary clips (streams that keep
                                    # their subject), so that reading the mid blocks is learnt for them too; session
                                    # 23: with the reading loss, 0.2 keeps a start picture over 120 s (0.99, 0.47
                                    # at 0) at recall 0.29 (0.77 at 0; FIFO and window 0.10)
    ordinary_clips: int = 192       # of the recode clips, those given LR tokens for the ordinary packed-view steps
    mid_shown: int = 2              # mid blocks in a packed-view step (inference attends to top-k of them)
    first_share: float = 0.1        # steps on a batch of first chunks alone (the `first` stage's clips): the only
                                    # chunk whose colour comes from the text alone, so colour words stay bound (0.2
                                    # until session 26)
    first_batch: int = 32
    select_weight: float = 1.0      # weight of the selection loss on the packed-view steps (`selection_loss`);
                                    # session 22: top-k picks the subject's blocks in 98% of selections (53% at 0)
    select_margin: float = 0.1      # how far (in per-token logits) the subject's block should outscore an empty one;
                                    # the session-21 DiT's gaps are ~0.03 (0.19-0.33 after the stage)
    read_weight: float = 1.0        # weight of the reading loss on the packed-view steps (`reading_loss`); session
                                    # 23: recall through top-k 0.06 -> 0.77 (floor 0.15) and 0.54 (floor 0.05)
    read_floor: float = 0.15        # the share of the current chunk's attention the subject's block should get in
                                    # every layer (the session-21 DiT gave it 0.1-1.5%)
    tune_only: str = ""             # comma-separated name fragments of the DiT parameters the stage trains (say
                                    # "attn1": the self-attention, where reading the mid blocks happens); empty: all.
                                    # Session 24: tuning all of them moved every weight group by 15-27% and cost the
                                    # shape from the second chunk on (82% -> 67%); session 25: "attn1" alone cost it
                                    # too (63%) and its top-k recalled no more than FIFO (0.12 / 0.12, 20 s)
    anchor: str = "recode,first,ordinary"   # comma list of the step kinds (ANCHORABLE) whose target is the start
                                    # DiT's own velocity on the same inputs (`train.anchored`) instead of the
                                    # clip's: the behaviour the stage should keep, held by distillation rather than
                                    # re-learnt. Session 26: with all three anchored and 60% memory steps the
                                    # shipped DiT keeps its shape (82% -> 83%) and top-k recalls 0.75 (FIFO 0.06,
                                    # window 0.10, 20 s); unanchored ("") it lost the shape (67%, session 24)

    def anchored_kinds(self) -> set[str]:
        """The step kinds of `anchor`; an unknown one is a clear error, not a silently ordinary stage."""
        kinds = {k.strip() for k in self.anchor.split(",") if k.strip()}
        if kinds - set(ANCHORABLE):
            raise SystemExit(f"memory stage: anchor {self.anchor!r} names {sorted(kinds - set(ANCHORABLE))}; "
                             f"anchorable step kinds: {', '.join(ANCHORABLE)}")
        return kinds

    def data_key(self, seed: int, weights: str) -> dict:
        """What decides the memory clips and their LR tokens (`weights`: `lr_token_weights`): a `data_memory.pt`
        made with the same key is reused."""
        return {"clips": self.clips, "chunks": self.chunks, "seed": seed, "weights": weights}


def lr_token_weights(model, vae) -> str:
    """Fingerprint of what LR-branch tokens depend on besides the clips: the VAE (decode, re-encode) and the DiT's
    patch and spatial embeddings, which every DiT stage trains. Stored LR tokens are reused only under the same
    fingerprint."""
    import hashlib
    h = hashlib.sha1()
    for module in (model.transformer.patch_embedding, vae.vae):
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    table = getattr(model.transformer, "spatial_embedding", None)
    if table is not None:
        h.update(table.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def make_memory_dataset(preset, work: Path, seed: int, tune: MemoryRecipe, model, compressor, vae,
                        device: str = "cpu") -> dict:
    """`tune.clips` leave-and-return clips (`toyworld.world.leave_and_return`, lead = the sink), encoded chunk by
    chunk, their LR-branch tokens, scenes and (seen, gap) per clip, in `data_memory.pt`."""
    from packcache.compress import block_grid

    from .common import progress, to_tensor
    from .train import Setup, chunk_bounds, encode_chunkwise, foreground_fraction, scene_to_dict
    from .train_hr import lr_tokens_for
    from .world import WORLD_STYLES, fit_return, leave_and_return, sample_scene

    t0 = time.time()
    bounds = chunk_bounds(preset, preset.chunk_video_frames(tune.chunks - 1)[1])
    sink = preset.cache.sink_chunks
    rng = np.random.default_rng(seed)
    style = WORLD_STYLES[Setup.of(work).world]
    lat, fg, scenes, shape = [], [], [], []
    grid = block_grid(*model.token_grid(preset.cache.chunk_frames, preset.latent_height, preset.latent_width))
    with torch.no_grad():
        for _ in progress(range(0, tune.clips, 8), (tune.clips + 7) // 8, "data (memory clips)"):
            xs = []
            for _ in range(8):
                scene = sample_scene(rng, max_shapes=1, single_shape_prob=1.0, style=style)
                start = int(rng.integers(0, 100_000))
                seen, gap = fit_return(tune.chunks, sink, int(rng.integers(1, 4)), int(rng.integers(1, 4)))
                frames = leave_and_return(scene, start, bounds, preset.height, sink, seen, gap)
                xs.append(to_tensor(frames))
                fg.append(foreground_fraction(frames).half())
                scenes.append(scene_to_dict(scene, "return"))
                shape.append((seen, gap))
            lat.append(encode_chunkwise(vae.vae, torch.stack(xs).to(device)).half().cpu())
        latents = torch.cat(lat)[:tune.clips]
        # LR tokens from the VAE's decode, as inference sees them: from the rendered frames they differ by 29%
        # (relative norm, 16 clips), so the decode stays although it is most of this stage's data time
        lr_tok = lr_tokens_for(preset, model, vae, compressor, latents.float().to(device), grid).half().cpu()
    data = {"latents": latents, "lr_tokens": lr_tok, "foreground": torch.stack(fg)[:tune.clips],
            "scenes": scenes[:tune.clips], "shape": shape[:tune.clips],
            "key": tune.data_key(seed, lr_token_weights(model, vae))}
    torch.save(data, work / "data_memory.pt")
    return {"wall_s": time.time() - t0, "clips": tune.clips, "chunks": tune.chunks}


def memory_step_view(rng: np.random.Generator, sink: int, recent: int, seen: int, gap: int, chunks: int,
                     tune: MemoryRecipe) -> tuple[int, list[int]]:
    """(current chunk, the `tune.mid_shown` mid chunks it sees) for a clip with the subject in [sink, sink+seen)
    and back from sink+seen+gap on. With more mid blocks than one holding the subject, the rest are the empty
    chunks top-k selection has to rank below it."""
    back = sink + seen + gap
    current = back + 1 if rng.random() < tune.next_chunk_prob and back + 1 < chunks else back
    candidates = list(range(sink, current - recent))
    subject = [c for c in candidates if c < sink + seen]
    n = min(tune.mid_shown, len(candidates))
    if len(candidates) >= 2 and rng.random() < tune.subject_mid_prob:
        a = int(rng.choice(subject))
        rest = rng.choice([c for c in candidates if c != a], size=n - 1, replace=False)
        return current, sorted([a, *(int(c) for c in rest)])
    return current, sorted(int(c) for c in rng.choice(candidates, size=n, replace=False))


def selection_loss(affinity: torch.Tensor, holds_subject: list[bool], margin: float) -> torch.Tensor | None:
    """Hinge on what top-k ranks by: every mid block holding the subject should outscore every empty one by
    `margin` in each layer's affinity (`affinity` (layers, M, B) from `train_hr.MidAffinity`, the cache's own score,
    tests/test_layout.py). None when the view shows no such pair.

    Why: reading the mid blocks is learnt by the flow loss, but the recent and current queries of the memory test
    are empty background and noise, and they rank the empty blocks first (session 13: top-k picks the subject's
    blocks in 30% of selections against 60% at random, and recalls 0.15 where the subject's blocks forced in
    recall 0.38). The selection stays the paper's; this teaches the model's queries and keys to make it work."""
    sub = [i for i, h in enumerate(holds_subject) if h]
    empty = [i for i, h in enumerate(holds_subject) if not h]
    if not sub or not empty:
        return None
    gap = affinity[:, sub][:, :, None] - affinity[:, empty][:, None, :]            # (layers, S, E, B)
    return torch.relu(margin - gap).mean()


def reading_loss(shares: torch.Tensor, holds_subject: list[bool], floor: float) -> torch.Tensor | None:
    """Hinge on the log of the share of the current chunk's attention on each mid block that holds the subject
    (`shares` (layers, B, M) from `train_hr.MidAttention`), up to `floor` in every layer. None when no block shown
    holds it.

    Why: the flow loss rewards reading the subject's block only through that share, and its gradient is proportional
    to it; at 0.04-0.1% (session 23, layers 1-3) the DiT did not learn to read in 2,400 steps, so forced selection
    recalled at chance. The log keeps the push strong where the share is smallest; the hinge stops it at `floor`."""
    sub = [i for i, h in enumerate(holds_subject) if h]
    if not sub:
        return None
    return torch.relu(np.log(floor) - shares[..., sub].clamp_min(1e-12).log()).mean()


def ordinary_step_view(rng: np.random.Generator, sink: int, recent: int, chunks: int,
                       tune: MemoryRecipe) -> tuple[int, list[int]]:
    """(current chunk, mid chunks) of a packed-view step on an ordinary clip: any chunk with at least one mid chunk
    before its recent window, up to `tune.mid_shown` of those drawn at random (as top-k would pick among them)."""
    current = int(rng.integers(sink + recent + 1, chunks))
    candidates = list(range(sink, current - recent))
    n = min(tune.mid_shown, len(candidates))
    return current, sorted(int(c) for c in rng.choice(candidates, size=n, replace=False))


def ordinary_lr_tokens(preset, work: Path, model, compressor, vae, rec: dict, clips: int, device: str) -> torch.Tensor:
    """LR-branch tokens of the first `clips` recode clips, kept in `data_memory_ordinary.pt` (reused for the same
    clips and weights: the decode is most of their cost)."""
    from packcache.compress import block_grid

    from .train_hr import lr_tokens_for
    path = work / "data_memory_ordinary.pt"
    key = {"clips": clips, "latents_sum": float(rec["latents"][:clips].float().sum()),
           "weights": lr_token_weights(model, vae)}
    if path.exists():
        kept = torch.load(path)
        if kept["key"] == key:
            return kept["tokens"]
    grid = block_grid(*model.token_grid(preset.cache.chunk_frames, preset.latent_height, preset.latent_width))
    tok = lr_tokens_for(preset, model, vae, compressor, rec["latents"][:clips].float().to(device), grid).half().cpu()
    torch.save({"tokens": tok, "key": key}, path)
    return tok


def train_memory(preset, work: Path, seed: int, recipe, tune: MemoryRecipe, device: str = "cpu") -> dict:
    """`recipe`: the DiT stage's `DiTRecipe` (noise levels, augmentations of the recode steps)."""
    from packcache.compress import MidCompressor
    from packcache.vae import VideoVAE

    from .common import cosine_lr, progress, save_curve
    from .train import (TUNED_FILE, CaptionSampler, FirstChunkRecipe, RecodeRecipe, _step, build_model,
                        clip_loss, final_dit_file, first_chunk_loss, make_first_chunk_dataset,
                        make_recode_clips, tuned_parameters)
    from .train_hr import packed_view_loss
    from .train_vae import load_vae
    anchors = tune.anchored_kinds()
    if not (work / "hr.pt").exists():
        raise SystemExit("the memory stage continues from the recode and hr stages: run them first "
                         "(--stages recode,first,hr,memory,...) or start from a bundle (--init-from)")
    if not (work / "data_chunkwise.pt").exists():     # a work folder started from a bundle: the recode clips afresh
        make_recode_clips(preset, work, seed, RecodeRecipe(), device)
    model = build_model(preset, seed)
    model.load_state_dict(torch.load(final_dit_file(work)))
    model = model.to(device)
    vae = VideoVAE(load_vae(preset, work, device=device), preset.vae)
    comp = MidCompressor(replace(preset.compressor, mode="hr+lr"), model.dim, model.patch_embedding, vae)
    comp.hr.load_state_dict({k[len("hr."):]: v for k, v in torch.load(work / "hr.pt").items()})
    comp = comp.to(device).eval().requires_grad_(False)
    model.eval()
    # the start DiT, frozen: the target of the anchored step kinds
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if anchors else None
    held = {kind: teacher if kind in anchors else None for kind in ANCHORABLE}
    path = work / "data_memory.pt"
    old = torch.load(path) if path.exists() else {}
    if old.get("key") == tune.data_key(seed + tune.data_seed, lr_token_weights(model, vae)):
        data, data_info = old, {"wall_s": 0.0, "clips": tune.clips, "chunks": tune.chunks, "reused": True}
        logger.info("memory clips reused from %s", path)
    else:
        data_info = make_memory_dataset(preset, work, seed + tune.data_seed, tune, model, comp, vae, device)
        logger.info("memory clips done in %.0fs", data_info["wall_s"])
        data = torch.load(path)
    del old
    rec = torch.load(work / "data_chunkwise.pt")
    n_ord = min(tune.ordinary_clips, rec["latents"].shape[0]) if tune.ordinary_share > 0 else 0
    if n_ord:
        t_ord = time.time()
        ord_tok = ordinary_lr_tokens(preset, work, model, comp, vae, rec, n_ord, device)
        data_info["ordinary_lr_s"] = time.time() - t_ord
    first = None
    if tune.first_share > 0:
        if not (work / "data_first.pt").exists():       # the `first` stage's clips, made afresh when it left none
            fc = FirstChunkRecipe()
            data_info["first"] = make_first_chunk_dataset(preset, work, seed + fc.data_seed, fc.clips, device=device)
        first = torch.load(work / "data_first.pt")

    view_recipe = replace(recipe, sigma_levels="shifted", train_shift=tune.train_shift, fg_weight=tune.fg_weight)
    model.train()
    params = tuned_parameters(model, only=tune.tune_only)
    opt = torch.optim.AdamW(params, lr=tune.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    captions = CaptionSampler(preset, data["scenes"], seed + 71, recipe.null_prompt_prob,
                              return_bg_color_drop=tune.bg_color_drop)
    named = CaptionSampler(preset, [dict(s, clip="normal") for s in data["scenes"]], seed + 75,
                           recipe.null_prompt_prob, encoder=captions.encoder)
    rec_captions = CaptionSampler(preset, rec["scenes"], seed + 72, recipe.null_prompt_prob, RecodeRecipe().mix,
                                  encoder=captions.encoder)
    first_captions = (CaptionSampler(preset, first["scenes"], seed + 76, recipe.null_prompt_prob,
                                     encoder=captions.encoder) if first else None)
    clip_recipe = replace(recipe, drift_prob=0.0, roll_prob=0.0)     # as the `recode` stage trains
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(data["shape"]):
        by_shape.setdefault(tuple(s), []).append(i)
    shapes = sorted(by_shape)
    gen = torch.Generator().manual_seed(seed + 73)
    rng = np.random.default_rng(seed + 74)
    c = preset.cache
    n_rec_chunks = rec["latents"].shape[2] // c.chunk_frames
    hist: list[float] = []
    rec_hist: list[float] = []
    ord_hist: list[float] = []
    first_hist: list[float] = []
    select_hist: list[float] = []
    read_hist: list[float] = []
    T = c.chunk_frames
    t0 = time.time()
    for step in progress(range(tune.steps), tune.steps, "memory"):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, tune.steps, tune.lr, warmup=tune.warmup)
        u = rng.random()
        if u < tune.recode_share:            # the `recode` stage's steps: chunk dropping, scene cuts
            idx = rng.integers(0, rec["latents"].shape[0], size=tune.batch)
            text, _ = rec_captions(idx)
            loss = clip_loss(model, rec, idx, text, preset, clip_recipe, rng, gen, device, teacher=held["recode"])
            rec_hist.append(loss.item())
        elif u < tune.recode_share + tune.first_share:
            idx = rng.integers(0, len(first["scenes"]), size=tune.first_batch)
            text, _ = first_captions(idx)
            loss = first_chunk_loss(model, first, idx, text, preset, recipe, gen, device, teacher=held["first"])
            first_hist.append(loss.item())
        elif u < tune.recode_share + tune.first_share + tune.ordinary_share:
            idx = rng.integers(0, n_ord, size=tune.batch)
            current, mids = ordinary_step_view(rng, c.sink_chunks, c.recent_chunks, n_rec_chunks, tune)
            text, _ = rec_captions(idx)
            loss = packed_view_loss(preset, model, comp, rec["latents"][idx].float().to(device),
                                    ord_tok[idx].float().to(device), text.to(device), gen, current, mids,
                                    view_recipe, fg=rec["foreground"][idx][:, current * T:(current + 1) * T],
                                    teacher=held["ordinary"])
            ord_hist.append(loss.item())
        else:
            seen, gap = shapes[int(rng.integers(len(shapes)))]
            idx = rng.choice(by_shape[(seen, gap)], size=tune.batch)
            current, mids = memory_step_view(rng, c.sink_chunks, c.recent_chunks, seen, gap, tune.chunks, tune)
            text = captions.encoder.encode([named.text_for(i) if rng.random() < tune.color_named
                                            else captions.text_for(i) for i in idx])
            affinity: list[torch.Tensor] = []
            shares: list[torch.Tensor] = []
            loss = packed_view_loss(preset, model, comp, data["latents"][idx].float().to(device),
                                    data["lr_tokens"][idx].float().to(device), text.to(device), gen, current, mids,
                                    view_recipe, fg=data["foreground"][idx][:, current * T:(current + 1) * T],
                                    affinity_out=affinity if tune.select_weight > 0 else None,
                                    attention_out=shares if tune.read_weight > 0 else None)
            hist.append(loss.item())
            holds = [m < c.sink_chunks + seen for m in mids]
            sel = selection_loss(affinity[0], holds, tune.select_margin) if affinity else None
            if sel is not None:
                select_hist.append(sel.item())
                loss = loss + tune.select_weight * sel
            read = reading_loss(shares[0], holds, tune.read_floor) if shares else None
            if read is not None:
                read_hist.append(read.item())
                loss = loss + tune.read_weight * read
        _step(model, opt, params, ema, recipe, step, loss)
        if step % 50 == 0:
            logger.info("memory step %d packed-view loss %.4f, ordinary packed-view %.4f, recode %.4f, first chunks "
                        "%.4f, selection %.4f, reading %.4f (%.0fs)", step,
                        *(float(np.mean(h[-50:] or [np.nan]))
                          for h in (hist, ord_hist, rec_hist, first_hist, select_hist, read_hist)),
                        time.time() - t0)
    torch.save({k: v.cpu() for k, v in ema.items()}, work / TUNED_FILE)
    save_curve(work / "loss_memory.png", {"packed view, return chunk": hist, "packed view, ordinary clips": ord_hist,
                                          "recode clips": rec_hist, "first chunks alone": first_hist,
                                          "selection hinge": select_hist, "reading hinge": read_hist},
               "causal DiT (memory)")
    info = {"wall_s": time.time() - t0 + data_info["wall_s"], "train_s": time.time() - t0, "steps": tune.steps,
            "first_loss": float(np.mean(hist[:50])), "final_loss": float(np.mean(hist[-50:])),
            "recode_final_loss": float(np.mean(rec_hist[-50:])) if rec_hist else None,
            "ordinary_final_loss": float(np.mean(ord_hist[-50:])) if ord_hist else None,
            "first_chunk_final_loss": float(np.mean(first_hist[-50:])) if first_hist else None,
            "selection_first_loss": float(np.mean(select_hist[:50])) if select_hist else None,
            "selection_final_loss": float(np.mean(select_hist[-50:])) if select_hist else None,
            "reading_first_loss": float(np.mean(read_hist[:50])) if read_hist else None,
            "reading_final_loss": float(np.mean(read_hist[-50:])) if read_hist else None, "data": data_info,
            "recipe": asdict(tune)}
    (work / "memory.json").write_text(json.dumps(info))
    return info
