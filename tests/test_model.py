"""Equivalence contracts of the causal model (DESIGN.md §5)."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from packcache.cache import CacheGeometry, build_cache
from packcache.compress import block_grid
from packcache.model import CausalWanModel, block_causal_mask
from packcache.presets import get_preset

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**TINY.transformer.diffusers_kwargs()).eval()
    ours = CausalWanModel(TINY.transformer).eval()
    missing, unexpected = ours.transformer.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref, ours


@torch.no_grad()
def test_one_chunk_without_cache_equals_diffusers(models):
    ref, ours = models
    x = torch.randn(2, 16, 3, 8, 8)
    t = torch.tensor([900.0, 250.0])
    text = torch.randn(2, 16, TINY.transformer.text_dim)
    expected = ref(x, t, text).sample
    got = ours.forward_chunk(x, t, ours.embed_text(text))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    seq = ours.forward_sequence(x, t[:, None].expand(2, 3), text)
    torch.testing.assert_close(seq, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_model_stays_usable_as_plain_diffusers(models):
    """Our processors fall back to diffusers' for plain calls: the wrapped transformer is still the reference."""
    ref, ours = models
    x, t, text = torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 16, TINY.transformer.text_dim)
    torch.testing.assert_close(ours.transformer(x, t, text).sample, ref(x, t, text).sample)


@pytest.mark.parametrize("timestep", [0.0, 500.0])
@torch.no_grad()
def test_chunk_by_chunk_full_cache_equals_block_causal_pass(models, timestep):
    _, ours = models
    chunks, tf = 4, TINY.cache.chunk_frames
    x = torch.randn(1, 16, chunks * tf, 8, 8)
    text = torch.randn(1, 16, TINY.transformer.text_dim)
    prompt = ours.embed_text(text)
    grid = ours.token_grid(tf, 8, 8)
    mask = block_causal_mask(chunks * tf, grid[1] * grid[2], tf)
    reference = ours.forward_sequence(x, torch.full((1, chunks * tf), timestep), prompt, attn_mask=mask)

    geo = CacheGeometry(ours.num_layers, ours.heads, ours.head_dim, tf, grid, block_grid(*grid))
    cache = build_cache("full", geo, TINY.cache, ours.rope)
    t = torch.tensor([timestep])
    for i in range(chunks):
        xi = x[:, :, i * tf:(i + 1) * tf]
        anchor = cache.begin_chunk()
        assert anchor == i * tf
        out = ours.forward_chunk(xi, t, prompt, cache.reader(), anchor)
        torch.testing.assert_close(out, reference[:, :, i * tf:(i + 1) * tf], rtol=1e-4, atol=1e-4)
        ours.forward_chunk(xi, t, prompt, cache.committer(), anchor, head=False)
        cache.end_chunk(xi)


def test_block_causal_mask_shape_and_pattern():
    m = block_causal_mask(num_frames=6, tokens_per_frame=2, chunk_frames=3)
    assert m.shape == (12, 12)
    assert m[:6, :6].all() and not m[:6, 6:].any() and m[6:, :].all()


def test_full_size_model_builds_on_meta():
    with torch.device("meta"):
        model = CausalWanModel(get_preset("wan2.1-t2v-1.3b").transformer)
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800
    assert model.rope.t_dim == 44 and model.rope.h_dim == 42 and model.rope.w_dim == 42
