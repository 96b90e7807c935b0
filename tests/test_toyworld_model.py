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
    from toyworld.train import DiTRecipe, build_model, choose_chunks, dit_loss, to_tensor, toy_preset
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
