"""The shipped toy world model: loads offline, follows colour prompts, switches on a new prompt, and trains."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from toyworld import metrics as M

WEIGHTS = Path(__file__).resolve().parent.parent / "packcache" / "weights" / "toy.safetensors"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason="toy weights not built (python -m toyworld.train)")


@pytest.fixture(scope="module")
def gen():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from packcache import Generator
    return Generator.from_preset("toy", device="cpu")


@needs_weights
def test_shipped_weights_fit_the_budget():
    assert WEIGHTS.stat().st_size <= 20 * 1024 * 1024


@needs_weights
def test_shipped_weights_load_and_stream(gen):
    """Loads offline with every key matched (strict) and streams 64x64 frames: 9 then 12 per chunk."""
    s = gen.open("a red circle bouncing on a striped blue background", seed=0)
    a, b = s.next_chunk(), s.next_chunk()
    s.close()
    assert a.shape == (9, 64, 64, 3) and b.shape == (12, 64, 64, 3) and a.dtype == np.uint8


@needs_weights
def test_red_prompt_gives_a_red_clip(gen):
    s = gen.open("a red circle bouncing on a striped blue background", seed=0)
    frames = np.concatenate([s.next_chunk() for _ in range(3)])
    s.close()
    assert frames.shape[1:] == (64, 64, 3)
    assert M.dominant_color(frames) == "red"


@needs_weights
def test_prompt_switch_changes_the_dominant_color(gen):
    """Same seed, same first chunks: with a cut to a red prompt the stream turns red; without it, it stays green."""
    green = "a green square bouncing on a plain gray background"

    def stream(switch: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        s = gen.open(green, seed=1)
        before = np.concatenate([s.next_chunk() for _ in range(2)])
        if switch:
            s.set_prompt("a red square bouncing on a plain gray background", transition="cut")
        after = [s.next_chunk() for _ in range(3)]
        s.close()
        return before, after

    before, after = stream(switch=True)
    _, unswitched = stream(switch=False)
    assert M.dominant_color(before) == "green"
    assert M.dominant_color(np.concatenate(after[1:])) == "red"
    assert M.dominant_color(np.concatenate(unswitched[1:])) == "green"


def test_a_few_training_steps_reduce_the_loss():
    """The DiT stage on a fixed toy batch (untrained VAE-free latents stand-in: rendered clips pooled to 8x8)."""
    from toyworld.train import (
        DiTRecipe,
        build_model,
        choose_chunks,
        dit_loss,
        to_tensor,
        toy_preset,
    )
    from toyworld.world import World
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # on a busy 2-core machine one thread is several times faster
    p = toy_preset()
    world = World(0)
    clips = [world.sample(84, 64, augment_caption=False)[0] for _ in range(2)]
    # a cheap, deterministic stand-in for VAE latents: 4x time / 8x space pooling, 16 channels
    x = torch.stack([to_tensor(c) for c in clips])                                  # (2, 3, 84, 64, 64)
    lat = torch.nn.functional.avg_pool3d(x, (4, 8, 8))                             # (2, 3, 21, 8, 8)
    lat = torch.cat([lat] * 5 + [lat[:, :1]], dim=1)                                # (2, 16, 21, 8, 8)
    text = torch.randn(2, 8, p.text.dim)
    model = build_model(p, 0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    recipe = DiTRecipe(ctx_noise_prob=0.0, own_context_prob=0.5)
    keep = choose_chunks(np.random.default_rng(0), 7, p.cache.sink_chunks, 0.0)[:4]

    def loss_at(seed):
        return dit_loss(model, lat, text, p, recipe, torch.Generator().manual_seed(seed), keep)

    with torch.no_grad():
        before = loss_at(123).item()
    for step in range(8):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_at(123).item()
    torch.set_num_threads(threads)
    assert after < 0.9 * before


def test_anchored_steps_learn_the_start_dits_velocity_not_the_clips():
    """`train.anchored` (`MemoryRecipe.anchor`): a step with a frozen teacher targets the teacher's velocity on the
    same inputs. A teacher equal to the student gives zero loss on clips, first chunks alone and packed views (the
    clip's target does not), and a teacher that differs pulls the student towards it."""
    import copy
    from dataclasses import replace

    from packcache.compress import MidCompressor
    from toyworld.train import DiTRecipe, build_model, dit_loss, toy_preset
    from toyworld.train_hr import packed_view_loss
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = toy_preset()
    g = torch.Generator().manual_seed(0)
    model = build_model(p, 0).eval()
    same = copy.deepcopy(model).requires_grad_(False)
    other = build_model(p, 1).eval().requires_grad_(False)
    x0 = torch.randn(2, 16, 21, 8, 8, generator=g)
    text = torch.randn(2, 4, p.text.dim, generator=g)
    recipe = DiTRecipe(own_context_prob=0.5)
    comp = MidCompressor(replace(p.compressor, mode="hr"), model.dim, model.patch_embedding)
    lr_tok = torch.randn(2, 7, 2, model.dim, generator=g)

    def losses(teacher):
        clip = dit_loss(model, x0, text, p, recipe, torch.Generator().manual_seed(3), [0, 1, 2], teacher=teacher)
        alone = dit_loss(model, x0, text, p, recipe, torch.Generator().manual_seed(3), [0], teacher=teacher)
        view = packed_view_loss(p, model, comp, x0, lr_tok, text, torch.Generator().manual_seed(3), current=6,
                                mids=[3, 4], teacher=teacher)
        return torch.stack([clip, alone, view])

    with torch.no_grad():
        truth, itself, far = losses(None), losses(same), losses(other)
    assert torch.all(itself < 1e-10), itself
    assert torch.all(truth > 0.1) and torch.all(far > 1e-4), (truth, far)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(6):
        opt.zero_grad()
        losses(other).sum().backward()
        opt.step()
    with torch.no_grad():
        closer = losses(other)
    torch.set_num_threads(threads)
    assert closer.sum() < 0.8 * far.sum(), (far, closer)


def test_a_lone_chunk_is_learned_without_its_clean_copy():
    """The `first` stage's shortcut: a chunk alone attends only itself, so its noisy copy's velocity is the same with
    or without the teacher-forcing clean copy (whatever that copy holds) and `dit_loss` drops the copy (half the
    tokens, no own-prediction pass). It must stay the same computation."""
    from toyworld.train import DiTRecipe, build_model, dit_loss, teacher_forcing_mask, toy_preset
    p = toy_preset()
    torch.manual_seed(0)
    model = build_model(p, 0).eval()
    T = p.cache.chunk_frames
    x0 = torch.randn(2, 16, T, 8, 8)
    noisy = torch.randn(2, 16, T, 8, 8)
    text = torch.randn(2, 8, p.text.dim)
    pos = torch.arange(T, dtype=torch.float64)
    sig = torch.tensor([[0.3] * T, [0.8] * T])
    mask = teacher_forcing_mask([0], p.tokens_per_frame, T)
    with torch.no_grad():
        alone = model.forward_sequence(noisy, sig * 1000.0, text, pos)
        for clean in (x0, torch.zeros_like(x0)):
            ts = torch.cat([torch.zeros(2, T), sig], dim=1) * 1000.0
            paired = model.forward_sequence(torch.cat([clean, noisy], 2), ts, text, torch.cat([pos, pos]), mask)
            torch.testing.assert_close(paired[:, :, T:], alone, rtol=1e-4, atol=1e-5)
        # and the loss itself: a chunk alone gives the flow-matching error of that one pass
        recipe = DiTRecipe(own_context_prob=1.0, ctx_noise_prob=1.0)
        loss = dit_loss(model, x0, text, p, recipe, torch.Generator().manual_seed(5), [0])
        gen = torch.Generator().manual_seed(5)
        from toyworld.train import draw_sigmas, noise_like
        sigma = draw_sigmas((2, 1), p, recipe, gen).repeat_interleave(T, dim=1)
        eps = noise_like(x0, gen)
        xn = (1 - sigma)[:, None, :, None, None] * x0 + sigma[:, None, :, None, None] * eps
        v = model.forward_sequence(xn, sigma * 1000.0, text, pos)
    assert torch.isclose(loss, (v - (eps - x0)).pow(2).mean(), rtol=1e-4)


def test_a_few_vae_steps_reduce_the_reconstruction_loss():
    """The VAE stage's loss (foreground-weighted MSE through the Wan2.2-layout VAE) on a fixed batch of toy frames."""
    from toyworld.train import toy_preset
    from toyworld.train_vae import VAERecipe, build_vae, clip_batch, vae_loss
    from toyworld.world import World
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    p = toy_preset()
    vae = build_vae(p).train()
    x = clip_batch(World(3), 4, 5, 64)                                             # 2 latent frames
    recipe = VAERecipe(latent_noise=0.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    with torch.no_grad():
        before = vae_loss(vae, x, recipe)[0].item()
    for _ in range(12):
        loss, _ = vae_loss(vae, x, recipe)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = vae_loss(vae, x, recipe)[0].item()
    torch.set_num_threads(threads)
    assert after < 0.7 * before


def test_vae_stage_runs_its_steps_and_writes_its_report(tmp_path):
    """Stage `vae` through the loop it shares with `vae_tune` (`vae_steps`): every step logged into the history,
    the weights, the curve and the report written, the latents folded to unit scale."""
    import json
    import math
    from toyworld.train import toy_preset
    from toyworld.train_vae import VAERecipe, train_vae
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    info = train_vae(toy_preset(), tmp_path, 0, VAERecipe(steps=2))
    torch.set_num_threads(threads)
    assert info["steps"] == 2 and math.isfinite(info["final_l1"]) and info["final_l1"] > 0
    assert (tmp_path / "vae.pt").exists() and (tmp_path / "loss_vae.png").exists()
    assert json.loads((tmp_path / "vae.json").read_text())["steps"] == 2


def test_vae_tune_weighs_the_ring_around_a_subject_and_its_colour_error():
    """The `vae_tune` stage's loss: the ring is background pixels next to the subject (none inside it, none far from
    it); the chroma term is zero for an error of pure brightness and positive for a colour error."""
    import numpy as np
    from toyworld.common import to_tensor
    from toyworld.train_vae import subject_rims
    from toyworld.world import render, single_shape_scene
    from scipy import ndimage
    x = to_tensor(render(single_shape_scene("red", shape="square", background="solid", bg_color="gray"), 0, 1))[None]
    fg, ring = subject_rims(x, 2)
    f, r = fg[0, 0, 0].numpy() > 0, ring[0, 0, 0].numpy() > 0
    assert f.sum() > 20 and r.sum() > 0 and not (f & r).any()
    near = ndimage.binary_dilation(f, structure=np.ones((5, 5), bool))
    assert (r == (near & ~f)).all()
    chroma = lambda a: a - a.mean(1, keepdim=True)
    torch.testing.assert_close(chroma(x + 0.1), chroma(x))
    tint = x.clone()
    tint[:, 1] += 0.1
    assert (chroma(tint) - chroma(x)).abs().max() > 0.05


def run_vae_stage_on_shipped_vae(tmp_path, stage, recipe) -> tuple[Path, bytes, dict]:
    """A VAE stage (`tune_vae`, `tune_stream_decoder`) on the shipped bundle's VAE in a fresh work folder, one
    thread: (work folder, vae.pt before, the stage's report)."""
    from toyworld.train import DEFAULT_OUT, toy_preset, vae_from_bundle
    from toyworld.world import World
    if not DEFAULT_OUT.exists():
        pytest.skip("no shipped weights")
    work = tmp_path / "w"
    work.mkdir()
    vae_from_bundle(DEFAULT_OUT, work)
    before = (work / "vae.pt").read_bytes()
    info = with_one_thread(stage, toy_preset(), work, 0, recipe, World(1))
    return work, before, info


def test_vae_tune_stage_rewrites_the_vae_and_keeps_the_untuned_one(tmp_path):
    """Stage `vae_tune` on the shipped VAE, 2 steps: vae.pt changes, the untuned copy is kept byte for byte, the report
    says what ran, and the folded latents stay unit-scale."""
    import json
    from toyworld.train_vae import VAETuneRecipe, tune_vae
    work, before, info = run_vae_stage_on_shipped_vae(tmp_path, tune_vae, VAETuneRecipe(steps=2))
    assert (work / "vae_untuned.pt").read_bytes() == before
    old, new = torch.load(work / "vae_untuned.pt"), torch.load(work / "vae.pt")
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert json.loads((work / "vae_tune.json").read_text())["steps"] == info["steps"] == 2
    assert all(abs(m) < 0.5 for m in info["latent_stats_before_fold"]["mean"])
    assert all(0.5 < s < 2.0 for s in info["latent_stats_before_fold"]["std"])


def test_vae_stream_stage_tunes_the_decoder_alone(tmp_path):
    """Stage `vae_stream` on the shipped VAE, 2 steps of 2 stream-length clips: the decoder changes, the encoder and
    quant conv (so the DiT's latents) stay bit for bit, the previous copy is kept, and the report says what ran."""
    import json
    from toyworld.train_vae import StreamDecoderRecipe, tune_stream_decoder
    work, before, info = run_vae_stage_on_shipped_vae(
        tmp_path, tune_stream_decoder, StreamDecoderRecipe(steps=2, clip_batch=2, clip_frames=21))
    assert (work / "vae_before_stream.pt").read_bytes() == before
    old, new = torch.load(work / "vae_before_stream.pt"), torch.load(work / "vae.pt")
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert json.loads((work / "vae_stream.json").read_text())["steps"] == info["steps"] == 2


def test_vae_blotch_stage_tunes_the_decoder_alone_under_blotches(tmp_path):
    """Stage `vae_blotch` (BLOTCH_DECODER's settings, 2 steps of 2 short clips): as `vae_stream`, the decoder alone
    changes, the previous copy is kept under the stage's own name and the report records the blotch settings."""
    import json
    from dataclasses import replace
    from toyworld.train_vae import BLOTCH_DECODER, tune_stream_decoder
    recipe = replace(BLOTCH_DECODER, steps=2, clip_batch=2, clip_frames=21)
    work, before, info = run_vae_stage_on_shipped_vae(
        tmp_path, lambda *a: tune_stream_decoder(*a, name="vae_blotch"), recipe)
    assert (work / "vae_before_blotch.pt").read_bytes() == before and not (work / "vae_before_stream.pt").exists()
    old, new = torch.load(work / "vae_before_blotch.pt"), torch.load(work / "vae.pt")
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    report = json.loads((work / "vae_blotch.json").read_text())
    assert report["steps"] == 2 and report["recipe"]["blotch"] == BLOTCH_DECODER.blotch > 0


def test_blotches_are_unit_spread_blurred_and_held_over_each_chunk():
    """`blotches`: one draw per chunk of 3 latent frames (a chunk is denoised at once), spread 1 per sample and
    chunk, and blurred: neighbouring latent pixels agree far more than white noise's do."""
    from toyworld.train_vae import blotches
    torch.manual_seed(0)
    n = blotches(torch.Size((2, 16, 7, 8, 8)), blur=1.0)
    assert n.shape == (2, 16, 7, 8, 8)
    assert torch.equal(n[:, :, 0], n[:, :, 2]) and torch.equal(n[:, :, 3], n[:, :, 5])
    assert not torch.equal(n[:, :, 2], n[:, :, 3])
    assert torch.allclose(n[:, :, ::3].std(dim=(1, 3, 4)), torch.ones(2, 3), atol=1e-4)
    neighbour = lambda x: float(torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1])
    assert neighbour(n) > 0.6 > 0.2 > abs(neighbour(blotches(torch.Size((2, 16, 3, 8, 8)), blur=0.0)))


def test_training_noise_levels_follow_the_recipe():
    """`sampler` levels sit within the jitter of the 4 levels the sampler visits, each of them drawn; `uniform`
    levels spread over (0, 1)."""
    from packcache.sampler import FlowSampler
    from toyworld.train import DiTRecipe, draw_sigmas, toy_preset
    p = toy_preset()
    levels = torch.tensor(FlowSampler(p.sampler).sigmas)
    recipe = DiTRecipe(sigma_levels="sampler")
    s = draw_sigmas((4000,), p, recipe, torch.Generator().manual_seed(0))
    nearest = (s[:, None] - levels[None]).abs().min(dim=1)
    assert nearest.values.max() <= recipe.level_jitter + 1e-6
    assert set(nearest.indices.tolist()) == set(range(len(levels)))
    u = draw_sigmas((4000,), p, DiTRecipe(sigma_levels="uniform"), torch.Generator().manual_seed(0))
    assert (u[:, None] - levels[None]).abs().min(dim=1).values.max() > 0.1
    assert 0.0 <= u.min() and u.max() <= 1.0


def test_shifted_noise_levels_lean_to_high_noise():
    """`shifted` draws are uniform levels warped by the training shift: still spread over (0, 1), with the share
    above a level s rising from 1 - s (uniform) to what the warp predicts."""
    from toyworld.train import DiTRecipe, draw_sigmas, toy_preset
    p = toy_preset()
    recipe = DiTRecipe(sigma_levels="shifted", train_shift=3.0)
    s = draw_sigmas((20000,), p, recipe, torch.Generator().manual_seed(0))
    assert 0.0 <= s.min() and s.max() <= 1.0 and s.min() < 0.01
    # sigma > 0.625  <=>  t > 0.625 / (3 - 2 * 0.625) = 0.357 for shift 3
    assert abs((s > 0.625).float().mean().item() - (1 - 0.625 / 1.75)) < 0.02
    u = draw_sigmas((20000,), p, DiTRecipe(sigma_levels="uniform"), torch.Generator().manual_seed(0))
    assert (u > 0.625).float().mean().item() < 0.4


@needs_weights
def test_evaluation_reports_prompt_following_by_chunk_index(gen):
    """`toyworld.evaluate.prompt_drift`: one accuracy per chunk index and cache kind, and their mean."""
    from toyworld.evaluate import prompt_drift
    rows = prompt_drift(gen, ["a red circle bouncing on a striped blue background",
                              "a green square orbiting on a plain gray background"], chunks=3)
    assert [r["cache"] for r in rows] == ["packed", "window"]
    for r in rows:
        assert len(r["by_chunk"]) == 3 and all(v in (0.0, 0.5, 1.0) for v in r["by_chunk"])
        assert r["all"] == pytest.approx(sum(r["by_chunk"]) / 3)
        assert r["by_chunk"][0] == 1.0    # both subjects take their prompt's colour in the first chunk


@needs_weights
def test_scene_sweep_reads_each_spec_and_restores_the_sampler(gen, capsys):
    """`toyworld.sampler_sweep --scene`: one row per guidance:shift:rescale spec with the scene readers' shares
    (chunk 0 and the last chunk apart), the preset's own spec marked, and the generator's sampler as it was."""
    from toyworld.sampler_sweep import SCENE_COLUMNS, grammar_prompts, main, scene_variants
    shipped = gen.sampler
    cfg = shipped.config
    specs = [(cfg.guidance_scale, cfg.shift, cfg.guidance_rescale), (1.0, 5.0, 0.0)]
    rows = scene_variants(gen, grammar_prompts(2), 2, specs)
    assert gen.sampler is shipped
    assert [r["shipped"] for r in rows] == ["yes", ""]
    for r in rows:
        assert set(k for k, _, _ in SCENE_COLUMNS) <= set(r)
        for k in ("one_subject", "shape", "shape_first", "shape_last", "pattern", "bg_color", "color"):
            assert 0.0 <= r[k] <= 1.0
        assert r["shape"] == pytest.approx((r["shape_first"] + r["shape_last"]) / 2)   # two chunks
        assert r["color"] > 0.0 and r["s_per_chunk"] > 0.0
    with pytest.raises(SystemExit):
        main(["--scene", "--specs", "3"])


@needs_weights
def test_vae_ceiling_counts_chunks_by_index(gen):
    """`toyworld.evaluate.vae_ceiling`: one row per chunk index over clips of every colour; the shipped VAE keeps
    most chunks' colour (an untrained one keeps none: its decoded frames have no bright foreground at all)."""
    from toyworld.evaluate import vae_ceiling
    rows = vae_ceiling(gen, clips_per_color=1, chunks=3)
    assert [r["chunk"] for r in rows] == [0, 1, 2]
    assert all(0 < r["clips"] <= 8 and 0 <= r["kept"] <= r["clips"] for r in rows)
    assert sum(r["kept"] for r in rows) >= 0.75 * sum(r["clips"] for r in rows)


@needs_weights
def test_vae_scene_ceiling_reads_every_pattern_and_shape(gen):
    """`toyworld.evaluate.vae_scene_ceiling`: one row per background pattern and per shape, each over the chunks
    whose rendered truth reads right; the shipped VAE keeps the textured patterns (stripes, checkers, gradients),
    so the ceiling is a measurement, not a constant."""
    from toyworld.evaluate import vae_scene_ceiling
    from toyworld.world import BACKGROUNDS, SHAPES
    c = vae_scene_ceiling(gen, clips_per_cell=1, chunks=2)
    assert [r["chunk"] for r in c["by_chunk"]] == [0, 1]
    assert c["by_chunk"][1]["shape_right"] >= 2 / 3     # a later chunk, decoded from the carried state, keeps shapes
    assert [r["pattern"] for r in c["by_pattern"]] == list(BACKGROUNDS)
    assert [r["shape"] for r in c["by_shape"]] == list(SHAPES)
    assert all(r["chunks"] == 6 for r in c["by_pattern"]) and all(r["chunks"] == 8 for r in c["by_shape"])
    rows = {r["pattern"]: r for r in c["by_pattern"]}
    assert min(rows[k]["pattern_right"] for k in ("stripes", "checker", "gradient")) >= 2 / 3
    # the reader is calibrated on these round trips: a plain background keeps only a texture fainter than any pattern
    from toyworld.metrics import PATTERN_TEXTURE_STD
    assert rows["solid"]["pattern_right"] >= 2 / 3
    assert rows["solid"]["spread_median"] <= rows["solid"]["spread_max"] < PATTERN_TEXTURE_STD
    assert min(rows[k]["spread_median"] for k in ("stripes", "checker", "gradient")) > PATTERN_TEXTURE_STD
    assert 0.0 < c["one_subject"] <= 1.0 and 0.0 <= c["shape"] <= 1.0


def test_rollout_context_samples_only_the_chosen_chunks_causally():
    """The rollout contexts (`drift` stage, `--roll-prob`): for the chosen samples, chunks first..k-2 are sampled by the model one after
    another (guided Euler steps from noise); chunk 0, the chunks before `first`, the last chunk and the other
    samples stay ground truth. Sampling is causal: a sampled chunk ignores the ground truth at and after it, and
    the next one continues from the sampled chunk, not from the ground truth it replaced."""
    from toyworld.train import build_model, rollout_context, toy_preset
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = toy_preset()
    T = p.cache.chunk_frames
    torch.manual_seed(0)
    ctx = torch.randn(3, 16, 5 * T, p.latent_height, p.latent_width)
    text, null = torch.randn(3, 8, p.text.dim), torch.randn(1, 8, p.text.dim)
    model = build_model(p, 0).eval()
    rows = torch.tensor([True, False, True])

    def roll(c):
        return rollout_context(model, c, rows, text, null, p, torch.Generator().manual_seed(1), first=2)

    out = roll(ctx)
    torch.testing.assert_close(out, roll(ctx))
    assert torch.equal(out[1], ctx[1])
    assert torch.equal(out[rows][:, :, :2 * T], ctx[rows][:, :, :2 * T])
    assert torch.equal(out[rows][:, :, 4 * T:], ctx[rows][:, :, 4 * T:])
    for c in (2, 3):
        assert not torch.allclose(out[rows][:, :, c * T:(c + 1) * T], ctx[rows][:, :, c * T:(c + 1) * T])
    changed = ctx.clone()
    changed[:, :, 2 * T:] += 1.0                       # the ground truth the sampled chunks replace, and after
    expected = torch.where(rows[:, None, None, None, None], out, changed)
    torch.testing.assert_close(roll(changed)[:, :, 2 * T:4 * T], expected[:, :, 2 * T:4 * T])
    with pytest.raises(AssertionError):
        rollout_context(model, ctx, rows, text, null, p, torch.Generator(), first=0)
    torch.set_num_threads(threads)


def test_rollouts_skip_sequences_with_no_chunk_to_sample():
    """With rollouts on, a first chunk alone (the `first` stage's batches) or a two-chunk run has nothing between
    ground-truth chunk 0 and the learned chunk to sample: the loss is the plain one (it used to fail on the missing
    empty-prompt embedding), and a longer run does sample."""
    from dataclasses import replace as dc_replace

    from toyworld.train import DiTRecipe, build_model, dit_loss, toy_preset
    p = toy_preset()
    torch.manual_seed(0)
    lat = torch.randn(2, 16, 4 * p.cache.chunk_frames, p.latent_height, p.latent_width)
    text, null = torch.randn(2, 8, p.text.dim), torch.randn(1, 8, p.text.dim)
    model = build_model(p, 0)
    plain, rolled = DiTRecipe(), dc_replace(DiTRecipe(), roll_prob=1.0)

    def losses(keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return (dit_loss(model, lat, text, p, plain, torch.Generator().manual_seed(3), keep),
                dit_loss(model, lat, text, p, rolled, torch.Generator().manual_seed(3), keep, null_text=null))

    for keep in ([0], [0, 1]):
        a, b = with_one_thread(losses, keep)
        assert torch.isfinite(b) and torch.equal(a, b)
    a, b = with_one_thread(losses, [0, 1, 2, 3])
    assert torch.isfinite(b) and not torch.equal(a, b)


def test_drift_stage_fine_tunes_the_dit_and_later_stages_take_it(tmp_path):
    """`--stages drift`: starts from the `dit` stage's weights, continues from drifted contexts, writes its own file,
    which `hr` and `pack` then use; without drifted copies in the data it stops with one clear message."""
    from toyworld.train import (
        DIT_FILE,
        DiTRecipe,
        DriftRecipe,
        build_model,
        final_dit_file,
        scene_to_dict,
        toy_preset,
        train_drift,
    )
    from toyworld.world import World
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = toy_preset()
    world = World(0)
    scenes = [scene_to_dict(world.sample(1, 64)[2]) for _ in range(4)]
    g = torch.Generator().manual_seed(0)
    data = {"latents": torch.randn(4, 16, 21, 8, 8, generator=g).half(), "foreground": torch.zeros(4, 21, 8, 8),
            "scenes": scenes}
    torch.save(build_model(p, 0).state_dict(), tmp_path / DIT_FILE)
    torch.save(data, tmp_path / "data.pt")
    tune = DriftRecipe(steps=3, drift_prob=1.0)
    with pytest.raises(SystemExit, match="drifted copies"):
        train_drift(p, tmp_path, 0, DiTRecipe(batch=2), tune)
    data["drifted"] = torch.randn(4, 16, 21, 8, 8, generator=g).half()
    torch.save(data, tmp_path / "data.pt")
    assert final_dit_file(tmp_path) == tmp_path / DIT_FILE
    info = train_drift(p, tmp_path, 0, DiTRecipe(batch=2), tune)
    torch.set_num_threads(threads)
    assert info["steps"] == 3 and np.isfinite(info["final_loss"])
    assert_stage_tuned_the_dit(tmp_path)


def test_chunkwise_encoding_restarts_the_encoder_at_every_chunk():
    """`encode_chunkwise` (the `recode` stage's data): 81 frames -> 21 latents as one encode gives, but each chunk
    of 3 latents depends only on its own frames and the one before them, so the encoder's state cannot drift
    along the clip."""
    from toyworld.train import encode_chunkwise, toy_preset
    from toyworld.train_vae import build_vae
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = build_vae(toy_preset()).eval()
    x = torch.rand(1, 3, 81, 64, 64) * 2 - 1
    with torch.no_grad():
        z = encode_chunkwise(vae, x)
        assert z.shape == (1, 16, 21, 8, 8)
        torch.testing.assert_close(z[:, :, :3], vae.encode(x[:, :, :9]).latent_dist.mean)
        y = x.clone()
        y[:, :, :44] = 0.0                       # everything before chunk 4's frames (44..56) and the one before
        z2 = encode_chunkwise(vae, y)
    torch.set_num_threads(threads)
    torch.testing.assert_close(z2[:, :, 12:], z[:, :, 12:])
    assert not torch.allclose(z2[:, :, 9:12], z[:, :, 9:12])


def test_recipe_takes_the_vae_from_a_bundle_when_it_does_not_train_one(tmp_path):
    """Without the `vae` stage the recipe starts from a bundle's VAE: exactly its `vae.` tensors, and the report of
    how that VAE was trained, with where it came from; a bundle without one is refused with a clear message."""
    import json
    from safetensors.torch import save_file
    from toyworld.train import vae_from_bundle
    bundle = tmp_path / "b.safetensors"
    save_file({"vae.conv.weight": torch.arange(6.0).reshape(2, 3), "transformer.x": torch.zeros(2)}, str(bundle))
    bundle.with_suffix(".json").write_text(json.dumps({"vae": {"steps": 7}, "vae_tune": {"steps": 3},
                                                       "vae_stream": {"steps": 4}, "vae_blotch": {"steps": 5}}))
    work = tmp_path / "w"
    work.mkdir()
    info = vae_from_bundle(bundle, work)
    state = torch.load(work / "vae.pt")
    assert list(state) == ["conv.weight"] and torch.equal(state["conv.weight"], torch.arange(6.0).reshape(2, 3))
    assert info["steps"] == 7 and info["tuned"] == {"steps": 3} and info["stream_decoder"] == {"steps": 4}
    assert info["blotch_decoder"] == {"steps": 5}
    assert info["from"].endswith("b.safetensors")
    assert json.loads((work / "vae.json").read_text()) == info
    save_file({"transformer.x": torch.zeros(2)}, str(tmp_path / "novae.safetensors"))
    with pytest.raises(SystemExit, match="no vae"):
        vae_from_bundle(tmp_path / "novae.safetensors", work)


def test_a_work_folder_started_from_a_bundle_packs_back_into_that_bundle(tmp_path):
    """`--init-from BUNDLE` puts the bundle's DiT, HR branch and VAE where the stages after them look (so the
    `memory` stage continues the shipped model); packed again, the bundle comes back tensor for tensor, and its
    report keeps the commands that made it with this one added. A file that is not a toy bundle, or none, is
    refused in one line."""
    import json
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from packcache.compress import MidCompressor
    from toyworld.train import DEFAULT_OUT, TUNED_FILE, Setup, build_model, main, toy_preset
    work, out = tmp_path / "w", tmp_path / "out.safetensors"
    with_one_thread(main, ["--init-from", str(DEFAULT_OUT), "--work", str(work), "--out", str(out),
                           "--stages", "pack", "--threads", "1"])
    preset = toy_preset(Setup.of(work))
    model = build_model(preset, 0)
    model.load_state_dict(torch.load(work / TUNED_FILE))          # strict: the keys the later stages load
    hr = MidCompressor(replace(preset.compressor, mode="hr"), model.dim, model.patch_embedding).hr
    hr.load_state_dict({k[len("hr."):]: v for k, v in torch.load(work / "hr.pt").items()})
    shipped, packed = load_file(str(DEFAULT_OUT)), load_file(str(out))
    assert sorted(packed) == sorted(shipped)
    assert all(torch.equal(packed[k], shipped[k]) for k in shipped)
    before = json.loads(DEFAULT_OUT.with_suffix(".json").read_text())
    report = json.loads(out.with_suffix(".json").read_text())
    commands = before["command"] if isinstance(before["command"], list) else [before["command"]]
    assert report["command"][:-1] == commands and "--init-from" in report["command"][-1]
    assert report["dit"] == before["dit"] and report["hr"] == before["hr"]
    save_file({"vae.conv.weight": torch.zeros(2)}, str(tmp_path / "vae_only.safetensors"))
    for bad in (tmp_path / "vae_only.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(SystemExit, match="bundle"):
            main(["--init-from", str(bad), "--work", str(tmp_path / "w2"), "--stages", "pack"])
    assert not (tmp_path / "w2" / "vae.pt").exists()            # nothing taken from a file that is not a bundle


def test_vae_tuning_stages_warn_when_the_vae_has_had_them():
    """`--stages vae_tune` / `vae_stream` on a VAE that already had them (the bundle's report says so, or this work
    folder ran them) is named in a warning; with the `vae` stage (a fresh VAE) or on an untuned one it is not."""
    from toyworld.train import vae_retune_warnings
    bundle = {"vae": {"steps": 7, "tuned": {}, "stream_decoder": {}, "from": "packcache/weights/toy.safetensors"}}
    lines = vae_retune_warnings(["vae_tune", "vae_stream", "pack"], bundle)
    assert [line.split(":")[0] for line in lines] == ["vae_tune", "vae_stream"]
    assert "toy.safetensors" in lines[0]
    assert vae_retune_warnings(["vae", "vae_tune", "vae_stream"], bundle) == []
    assert vae_retune_warnings(["vae_stream"], {"vae": {"steps": 7}}) == []
    assert len(vae_retune_warnings(["vae_stream"], {"vae": {"steps": 7}, "vae_stream": {"steps": 400}})) == 1


def test_recode_stage_draws_its_clips_from_its_own_mix(tmp_path):
    """The `recode` stage's fresh clips follow RecodeRecipe.mix (more still starts and returns than the `dit`
    stage's data): every clip's stored kind is one the mix can draw, and a mix of only still starts gives only
    still clips whose first chunk is one held frame."""
    from toyworld.train import DEFAULT_OUT, RecodeRecipe, make_chunkwise_dataset, toy_preset, vae_from_bundle
    from toyworld.world import ClipMix
    default = RecodeRecipe().mix
    assert default.still_prob > ClipMix().still_prob and default.return_prob > ClipMix().return_prob
    work = tmp_path / "w"
    work.mkdir()
    vae_from_bundle(DEFAULT_OUT, work)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kinds, z = {}, {}
    try:
        for name, mix in (("still", ClipMix(still_prob=1.0)), ("normal", ClipMix(still_prob=0.0, return_prob=0.0))):
            make_chunkwise_dataset(toy_preset(), work, seed=3, clips=4, batch=4, mix=mix)
            data = torch.load(work / "data_chunkwise.pt")
            kinds[name] = [d["clip"] for d in data["scenes"]]
            z[name] = data["latents"].float()
    finally:
        torch.set_num_threads(threads)
    assert kinds == {"still": ["still"] * 4, "normal": ["normal"] * 4}
    assert z["still"].shape[:3] == (4, 16, 21)
    # chunk 0 of a still clip is one frame held: its latent frames change less than a moving clip's
    change = {k: (v[:, :, 1] - v[:, :, 2]).abs().mean().item() for k, v in z.items()}
    assert change["still"] < 0.8 * change["normal"], change


def dit_work_folder(path: Path):
    """A work folder as after the `dit` stage: the shipped VAE and a freshly initialised DiT. Returns the preset."""
    from toyworld.train import DEFAULT_OUT, DIT_FILE, build_model, toy_preset, vae_from_bundle
    p = toy_preset()
    vae_from_bundle(DEFAULT_OUT, path)
    torch.save(build_model(p, 0).state_dict(), path / DIT_FILE)
    return p


def save_recode_clips(path: Path) -> None:
    """Four random 7-chunk clips where the `recode` stage leaves its chunk-by-chunk data."""
    from toyworld.train import scene_to_dict
    from toyworld.world import World
    world = World(0)
    g = torch.Generator().manual_seed(0)
    torch.save({"latents": torch.randn(4, 16, 21, 8, 8, generator=g).half(), "foreground": torch.zeros(4, 21, 8, 8),
                "scenes": [scene_to_dict(world.sample(1, 64)[2]) for _ in range(4)]}, path / "data_chunkwise.pt")


def with_one_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def assert_stage_tuned_the_dit(path: Path) -> None:
    """The later stages take the tuned file, and it differs from the `dit` stage's weights."""
    from toyworld.train import DIT_FILE, TUNED_FILE, final_dit_file
    assert final_dit_file(path) == path / TUNED_FILE
    before, after = torch.load(path / DIT_FILE), torch.load(path / TUNED_FILE)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].dtype.is_floating_point)


def test_first_stage_trains_first_chunks_alone_and_recode_clips(tmp_path):
    """`--stages first`: fresh 9-frame clips (one first stream chunk: 3 latent frames each), then the current DiT
    fine-tuned on batches of them and on the `recode` stage's clips, in `passes` cycles (each on clips of its own),
    into the tuned file `hr` and `pack` take;
    without the recode stage's clips it stops with one clear message."""
    from toyworld.train import DiTRecipe, FirstChunkRecipe, train_first
    p = dit_work_folder(tmp_path)
    tune = FirstChunkRecipe(clips=4, steps=6, first_share=0.5, batch=2, passes=2)
    with pytest.raises(SystemExit, match="recode"):
        train_first(p, tmp_path, 0, DiTRecipe(batch=2), tune)
    save_recode_clips(tmp_path)
    info = with_one_thread(train_first, p, tmp_path, 0, DiTRecipe(batch=2), tune)
    first = torch.load(tmp_path / "data_first.pt")
    assert first["latents"].shape == (4, 16, p.cache.chunk_frames, 8, 8)
    assert first["foreground"].shape == (4, 3, 8, 8) and len(first["scenes"]) == 4
    assert info["steps"] == 6 and 0 < info["first_chunk_steps"] < 6, info
    assert len(info["passes"]) == tune.passes == 2 and info["wall_s"] == sum(q["wall_s"] for q in info["passes"])
    assert info["data"]["sets"] == 2 and info["data"]["clips"] == 8        # each pass drew first chunks of its own
    assert np.isfinite(info["first_chunk_final_loss"]) and np.isfinite(info["final_loss"])
    assert_stage_tuned_the_dit(tmp_path)
    # a pass with the self-attention frozen (`frozen`): it moves, the self-attention stays as it was
    from dataclasses import replace

    from toyworld.train import TUNED_FILE
    before = torch.load(tmp_path / TUNED_FILE)
    with_one_thread(train_first, p, tmp_path, 0, DiTRecipe(batch=2), replace(tune, passes=1, frozen="attn1"))
    after = torch.load(tmp_path / TUNED_FILE)
    assert all(torch.equal(after[k], before[k]) for k in before if ".attn1." in k)
    assert any(not torch.equal(after[k], before[k]) for k in before if ".attn1." not in k)


@pytest.mark.parametrize("shown", [2, 4])
def test_memory_stage_views_put_the_subject_in_the_mid_blocks_only(shown):
    """The memory stage's loss chunk is where the subject returns (or the one after), never in the recent window
    while it was away; its mid chunks lie between the sink and the recent window, and mostly one holds the subject
    (among up to `mid_shown` blocks, the others empty ones when there are enough)."""
    from dataclasses import replace

    from toyworld.train_memory import MemoryRecipe, memory_step_view
    from toyworld.world import visible_chunks
    rng = np.random.default_rng(0)
    tune = replace(MemoryRecipe(), mid_shown=shown)
    with_subject = empty_too = 0
    for _ in range(400):
        seen, gap = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        vis = visible_chunks(tune.chunks, 2, seen, gap)
        current, mids = memory_step_view(rng, 2, 1, seen, gap, tune.chunks, tune)
        assert vis[current] and current in (2 + seen + gap, 3 + seen + gap)
        assert 1 <= len(mids) <= shown and all(2 <= m < current - 1 for m in mids) and mids == sorted(set(mids))
        assert len(mids) == min(shown, current - 3)          # as many as there are, up to mid_shown
        if current == 2 + seen + gap:
            assert not vis[current - 1]        # the recent chunk is empty: the colour is only in the mid blocks
        with_subject += any(vis[m] for m in mids)
        empty_too += any(not vis[m] for m in mids)
    assert with_subject / 400 >= tune.subject_mid_prob - 0.05
    assert empty_too / 400 > 0.5               # the subject's block is ranked against empty ones


def test_selection_loss_lifts_the_subjects_blocks_above_the_empty_ones():
    """The memory stage's hinge on the cache's affinities: zero once every subject block leads every empty one by
    the margin in every layer and batch row; otherwise its gradient raises the subject's and lowers the empty ones';
    no pair, no loss."""
    from toyworld.train_memory import selection_loss
    aff = torch.tensor([[[0.0, 1.0], [0.3, 0.0]], [[0.2, 0.9], [0.0, 0.0]]], requires_grad=True)   # (2, 2, 2)
    loss = selection_loss(aff, [True, False], margin=0.5)
    loss.backward()
    # gaps (subject - empty) per layer and row: -0.3, 1.0 | 0.2, 0.9 -> hinges 0.8, 0, 0.3, 0
    assert loss.item() == pytest.approx((0.8 + 0.3) / 4)
    assert aff.grad[0, 0, 0] < 0 < aff.grad[0, 1, 0] and aff.grad[1, 0, 0] < 0 < aff.grad[1, 1, 0]
    assert aff.grad[:, :, 1].abs().sum() == 0          # rows already apart by the margin are left alone
    assert selection_loss(aff, [True, True], 0.5) is None and selection_loss(aff, [False, False], 0.5) is None


def test_reading_loss_raises_the_attention_on_the_subjects_block_up_to_its_floor():
    """The memory stage's hinge on the current chunk's attention share: log(floor) - log(share) for each subject
    block below the floor (its gradient raises the share), nothing for those above it or for empty blocks; no
    subject block shown, no loss."""
    from toyworld.train_memory import reading_loss
    shares = torch.tensor([[[0.001, 0.3], [0.2, 0.001]], [[0.01, 0.01], [0.05, 0.5]]], requires_grad=True)  # (2,2,2)
    loss = reading_loss(shares, [True, False], floor=0.05)
    loss.backward()
    # subject shares per layer and row: 0.001, 0.2 | 0.01, 0.05 -> log(0.05/0.001), 0, log(0.05/0.01), 0
    assert loss.item() == pytest.approx((np.log(50) + np.log(5)) / 4)
    assert shares.grad[0, 0, 0] < shares.grad[1, 0, 0] < 0          # the smaller the share, the stronger the push
    assert shares.grad[0, 1, 0] == 0 and shares.grad[1, 1, 0] == 0   # at or above the floor: left alone
    assert shares.grad[..., 1].abs().sum() == 0                      # empty blocks are not pushed either way
    assert reading_loss(shares, [False, False], 0.05) is None


def test_memory_stage_ordinary_views_cover_every_chunk_with_a_mid_block():
    """Packed-view steps on ordinary clips: any chunk that has a mid chunk before its recent window, with up to
    `mid_shown` distinct mid chunks between the sink and the recent window."""
    from toyworld.train_memory import MemoryRecipe, ordinary_step_view
    rng = np.random.default_rng(1)
    tune = MemoryRecipe()
    currents = set()
    for _ in range(300):
        current, mids = ordinary_step_view(rng, 2, 1, 7, tune)
        currents.add(current)
        assert mids == sorted(set(mids)) and 1 <= len(mids) <= tune.mid_shown
        assert all(2 <= m < current - 1 for m in mids)
    assert currents == {4, 5, 6}


def test_memory_stage_fine_tunes_the_dit_on_the_packed_view(tmp_path):
    """`--stages memory`: leave-and-return clips encoded chunk by chunk with their LR tokens, then the current DiT
    fine-tuned through the packed view (and recode clips) into the tuned file `pack` takes; without the hr and
    recode stages' outputs it stops with one clear message."""
    from dataclasses import replace

    from packcache.compress import MidCompressor
    from packcache.model import CausalWanModel
    from toyworld.train import DiTRecipe
    from toyworld.train_memory import MemoryRecipe, train_memory
    p = dit_work_folder(tmp_path)
    tune = MemoryRecipe(clips=8, chunks=7, steps=8, batch=2, recode_share=0.25, ordinary_share=0.25, ordinary_clips=3,
                        first_share=0.25, first_batch=4, select_weight=1.0, read_weight=1.0)
    with pytest.raises(SystemExit, match="recode and hr"):
        train_memory(p, tmp_path, 0, DiTRecipe(batch=2), tune)
    save_recode_clips(tmp_path)
    model = CausalWanModel(p.transformer)
    hr = MidCompressor(replace(p.compressor, mode="hr"), model.dim, model.patch_embedding).hr
    torch.save({f"hr.{k}": v for k, v in hr.state_dict().items()}, tmp_path / "hr.pt")
    from toyworld.train import TUNED_FILE, final_dit_file
    start = torch.load(final_dit_file(tmp_path))
    info = with_one_thread(train_memory, p, tmp_path, 0, DiTRecipe(batch=2), tune)
    data = torch.load(tmp_path / "data_memory.pt")
    assert data["latents"].shape == (8, 16, 7 * p.cache.chunk_frames, 8, 8)
    assert data["lr_tokens"].shape[:2] == (8, 7) and len(data["shape"]) == len(data["scenes"]) == 8
    assert info["steps"] == 8 and np.isfinite(info["final_loss"]), info
    assert info["selection_final_loss"] is None or np.isfinite(info["selection_final_loss"])
    assert info["reading_final_loss"] is None or np.isfinite(info["reading_final_loss"])
    assert_stage_tuned_the_dit(tmp_path)
    assert torch.load(tmp_path / "data_memory_ordinary.pt")["tokens"].shape[:2] == (3, 7)   # the recode clips' LR tokens
    # the stage tuned the DiT's patch embedding, which the LR tokens depend on: a run from it encodes afresh
    tuned = with_one_thread(train_memory, p, tmp_path, 0, DiTRecipe(batch=2), replace(tune, steps=2))
    assert not tuned["data"].get("reused")
    # run again from the same DiT with other training settings: the clips are reused, not encoded again (the first
    # of these two runs re-encodes them under the start weights, which the run above replaced)
    torch.save(start, tmp_path / TUNED_FILE)
    with_one_thread(train_memory, p, tmp_path, 0, DiTRecipe(batch=2), replace(tune, steps=2))
    torch.save(start, tmp_path / TUNED_FILE)
    again = with_one_thread(train_memory, p, tmp_path, 0, DiTRecipe(batch=2),
                            replace(tune, steps=2, lr=1e-4, tune_only="attn1"))
    assert again["data"].get("reused") and again["steps"] == 2
    # tune_only: the self-attention moved, every other weight is the start's
    after = torch.load(tmp_path / TUNED_FILE)
    assert all(torch.equal(after[k], start[k]) for k in start if ".attn1." not in k)
    assert any(not torch.equal(after[k], start[k]) for k in start if ".attn1." in k)
    # anchored step kinds (targets from the start DiT) train too; an unknown kind is refused before any work
    torch.save(start, tmp_path / TUNED_FILE)
    held = with_one_thread(train_memory, p, tmp_path, 0, DiTRecipe(batch=2),
                           replace(tune, steps=4, anchor="recode, first,ordinary"))
    assert held["data"].get("reused") and np.isfinite(held["final_loss"])
    assert held["recipe"]["anchor"] == "recode, first,ordinary"
    with pytest.raises(SystemExit, match="anchorable step kinds: recode, first, ordinary"):
        train_memory(p, tmp_path, 0, DiTRecipe(batch=2), replace(tune, anchor="recode,memory"))


def test_stages_train_only_the_parameters_they_name():
    """`tuned_parameters` (`MemoryRecipe.tune_only`, `FirstChunkRecipe.frozen`) freezes every DiT parameter whose
    name has none of the `only` fragments or one of the `frozen` ones; a choice that matches nothing is one clear
    error, not a stage that trains nothing."""
    from toyworld.train import build_model, toy_preset, tuned_parameters
    model = build_model(toy_preset(), 0)
    chosen = tuned_parameters(model, "attn1.to_q, attn1.to_k")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(chosen) == len(names) == 2 * 2 * toy_preset().transformer.num_layers    # weight, bias per block
    assert all(".attn1.to_q." in n or ".attn1.to_k." in n for n in names)
    assert len(tuned_parameters(model, "")) == len(list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    kept = tuned_parameters(model, frozen="attn1")
    assert 0 < len(kept) < len(list(model.parameters()))
    assert all(p.requires_grad == (".attn1." not in n) for n, p in model.named_parameters())
    with pytest.raises(SystemExit, match="matches no DiT parameter"):
        tuned_parameters(model, "no_such_layer")
    with pytest.raises(SystemExit, match="matches no DiT parameter"):
        tuned_parameters(model, "attn1", frozen="attn1")


def test_memory_stage_settings_from_the_command_line(capsys, tmp_path):
    """`--memory-set FIELD=VALUE` sets any MemoryRecipe field, typed as its default; an unknown field or a value
    that does not parse is one usage error naming the fields, before any stage runs."""
    import argparse

    from toyworld.train import main, recipe_with
    from toyworld.train_memory import MemoryRecipe
    tune = recipe_with(MemoryRecipe(), 2400, ["first_share=0.2", "recode_share=0.2", "mid_shown=3"],
                         argparse.ArgumentParser())
    assert (tune.steps, tune.first_share, tune.recode_share, tune.mid_shown) == (2400, 0.2, 0.2, 3)
    assert isinstance(tune.mid_shown, int) and tune.clips == MemoryRecipe().clips
    for bad in ("nope=1", "first_share", "mid_shown=two"):
        with pytest.raises(SystemExit) as e:
            main(["--stages", "memory", "--memory-set", bad, "--work", str(tmp_path / "work")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--memory-set" in err and "Traceback" not in err
        assert not (tmp_path / "work").exists()               # refused before any work


def test_first_stage_settings_parse_booleans_and_clip_kinds():
    """A bool field reads true/false (not Python's truth of a non-empty string); clip kinds are checked."""
    import argparse

    from toyworld.train import FirstChunkRecipe, clips_of_kinds, recipe_with
    ap = argparse.ArgumentParser()
    assert recipe_with(FirstChunkRecipe(), None, ["fresh_clips=false"], ap, "--first-set").fresh_clips is False
    assert recipe_with(FirstChunkRecipe(), None, ["fresh_clips=1"], ap, "--first-set").fresh_clips is True
    with pytest.raises(SystemExit):
        recipe_with(FirstChunkRecipe(), None, ["fresh_clips=maybe"], ap, "--first-set")
    data = {"latents": torch.arange(3.0), "foreground": torch.arange(3.0),
            "scenes": [{"clip": "normal"}, {"clip": "still"}, {"clip": "return"}]}
    kept = clips_of_kinds(data, ["normal", "return"])
    assert kept["latents"].tolist() == [0.0, 2.0] and [d["clip"] for d in kept["scenes"]] == ["normal", "return"]
    with pytest.raises(SystemExit, match="unknown clip kinds"):
        clips_of_kinds(data, ["sideways"])
