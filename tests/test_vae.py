"""VideoVAE: streaming decode equals one-shot decode (DESIGN §5), isolation between decoders, shapes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from packcache.errors import PresetError
from packcache.presets import VAEConfig, get_preset
from packcache.vae import VideoVAE, frames_to_uint8

CFG = get_preset("tiny").vae
H = W = 4  # latent grid (32x32 pixels): the tiny preset's VAE, a smaller frame to keep the suite fast
CHUNK = 3  # latent frames per chunk, as the tiny preset's cache uses


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    return VideoVAE.build(CFG, seed=0)


def _latents(t: int, seed: int, b: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, t, H, W, generator=g)


def _reference(vae: VideoVAE, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' own one-shot decode (clears and rebuilds its module cache internally)."""
    with torch.no_grad():
        return vae.vae.decode(vae.denormalize(latents)).sample


def _stream(vae: VideoVAE, latents: torch.Tensor) -> torch.Tensor:
    dec = vae.stream_decoder()
    out = torch.cat([dec.decode(latents[:, :, i : i + CHUNK]) for i in range(0, latents.shape[2], CHUNK)], dim=2)
    dec.close()
    return out


@pytest.fixture(scope="module")
def pair(vae: VideoVAE) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two 2-chunk videos and their solo streaming decodes."""
    zs = [_latents(2 * CHUNK, seed=3), _latents(2 * CHUNK, seed=4)]
    return zs, [_stream(vae, z) for z in zs]


def test_streaming_decode_equals_one_shot(vae: VideoVAE) -> None:
    z = _latents(3 * CHUNK, seed=1, b=2)
    ref = _reference(vae, z)
    assert ref.shape == (2, 3, 33, 32, 32)
    # the comparison must be meaningful: most pixels are not clamped and frames differ over time
    assert (ref.abs() < 0.999).float().mean() > 0.5
    assert (ref[:, :, -1] - ref[:, :, 1]).abs().max() > 1e-2

    dec = vae.stream_decoder()
    chunks = [dec.decode(z[:, :, i : i + CHUNK]) for i in range(0, 3 * CHUNK, CHUNK)]
    assert [c.shape[2] for c in chunks] == [9, 12, 12]
    assert all(c.dtype == torch.float32 and c.shape[-2:] == (32, 32) for c in chunks)
    torch.testing.assert_close(torch.cat(chunks, dim=2), ref, atol=1e-5, rtol=0)
    assert dec.cache_bytes() > 0
    dec.close()
    assert dec.cache_bytes() == 0
    with pytest.raises(RuntimeError):
        dec.decode(z[:, :, :CHUNK])


def test_carried_cache_matters(vae: VideoVAE, pair) -> None:
    """A later chunk decoded without its history differs: guards against a cache that does nothing."""
    (z, _), (streamed, _) = pair
    fresh = _stream(vae, z[:, :, CHUNK:])
    assert fresh.shape[2] == 9
    assert (streamed[:, :, -9:] - fresh).abs().max() > 1e-3


def test_interleaved_decoders_are_independent(vae: VideoVAE, pair) -> None:
    zs, solo = pair
    da, db = vae.stream_decoder(), vae.stream_decoder()
    out_a, out_b = [], []
    for i in (0, CHUNK):
        out_a.append(da.decode(zs[0][:, :, i : i + CHUNK]))
        _reference(vae, zs[1][:, :, :1])  # the module's own decode in between must not disturb our caches
        out_b.append(db.decode(zs[1][:, :, i : i + CHUNK]))
    torch.testing.assert_close(torch.cat(out_a, 2), solo[0], atol=0, rtol=0)
    torch.testing.assert_close(torch.cat(out_b, 2), solo[1], atol=0, rtol=0)
    assert (solo[0] - solo[1]).abs().max() > 1e-2


def test_decoders_in_threads(vae: VideoVAE, pair) -> None:
    zs, solo = pair
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = _stream(vae, zs[i])
        except Exception as e:  # noqa: BLE001 - surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        torch.testing.assert_close(results[i], solo[i], atol=1e-6, rtol=0)


def test_reset_starts_a_new_video(vae: VideoVAE) -> None:
    z = _latents(CHUNK, seed=5)
    dec = vae.stream_decoder()
    first = dec.decode(z)
    dec.decode(z)
    dec.reset()
    again = dec.decode(z)
    assert first.shape[2] == 9
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_encode_shape_and_mode(vae: VideoVAE) -> None:
    g = torch.Generator().manual_seed(6)
    frames = torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1
    lat = vae.encode(frames)
    assert lat.shape == (2, 16, 3, 4, 4) and lat.dtype == torch.float32
    with torch.no_grad():
        raw = vae.vae.encode(frames).latent_dist.mode()
    torch.testing.assert_close(lat, vae.normalize(raw), atol=1e-5, rtol=0)
    assert vae.encode(frames[:, :, :1]).shape == (2, 16, 1, 4, 4)
    with pytest.raises(ValueError):
        vae.encode(frames[:, :, :4])


def test_normalize_roundtrip_and_values(vae: VideoVAE) -> None:
    raw = torch.zeros(1, 16, 1, 1, 1)
    norm = vae.normalize(raw)
    mean, std = torch.tensor(CFG.latents_mean), torch.tensor(CFG.latents_std)
    torch.testing.assert_close(norm.flatten(), -mean / std)
    z = _latents(2, seed=7)
    torch.testing.assert_close(vae.normalize(vae.denormalize(z)), z, atol=1e-6, rtol=0)


def test_strides_and_build_determinism() -> None:
    a, b = VideoVAE.build(CFG, seed=0), VideoVAE.build(CFG, seed=0)
    c = VideoVAE.build(CFG, seed=1)
    assert (a.spatial_stride, a.temporal_stride) == (8, 4)
    assert a.num_frames(3) == 9 and a.num_frames(3, first=False) == 12
    sa, sc = a.vae.state_dict(), c.vae.state_dict()
    assert all(torch.equal(v, b.vae.state_dict()[k]) for k, v in sa.items())
    assert any(not torch.equal(v, sc[k]) for k, v in sa.items())
    # a preset whose declared strides disagree with the architecture is refused with one clear error
    with pytest.raises(PresetError, match="strides"):
        VideoVAE(a.vae, VAEConfig(**{**CFG.__dict__, "spatial_stride": 16}))


def test_frames_to_uint8() -> None:
    px = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 6, 1, 1).expand(1, 3, 6, 1, 2)
    out = frames_to_uint8(px)
    assert out.shape == (1, 6, 1, 2, 3) and out.dtype == np.uint8
    assert out[0, :, 0, 0, 0].tolist() == [0, 0, 128, 191, 255, 255]


# Wan2.2's layout (2x2 pixel patches, residual shortcut blocks), as the toy preset uses it, at a tiny width.
PATCHED = VAEConfig(base_dim=8, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, True),
                    is_residual=True, patch_size=2)


def test_patchified_residual_vae_streams_and_encodes_like_diffusers() -> None:
    v = VideoVAE.build(PATCHED, seed=0)
    assert (v.spatial_stride, v.temporal_stride) == (8, 4) and v.vae.config.in_channels == 12
    z = _latents(3 * CHUNK, seed=11)
    ref = _reference(v, z)
    assert ref.shape == (1, 3, 33, 32, 32) and (ref[:, :, -1] - ref[:, :, 1]).abs().max() > 1e-2
    streamed = _stream(v, z)
    torch.testing.assert_close(streamed, ref, atol=1e-5, rtol=0)
    frames = ref[:, :, :9]
    with torch.no_grad():
        raw = v.vae.encode(frames).latent_dist.mode()
    lat = v.encode(frames)
    assert lat.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(lat, v.normalize(raw), atol=1e-5, rtol=0)


def test_preset_chunk_video_frames_match_the_streaming_decoder(vae: VideoVAE) -> None:
    """`Preset.chunk_video_frames` (the one chunk-to-frames rule the training clips, the memory test and the HR
    stage use) names exactly the frames the streaming decoder emits for each chunk, and the chunks tile the video."""
    preset = get_preset("tiny")
    z = _latents(3 * CHUNK, seed=5)
    dec = vae.stream_decoder()
    sizes = [dec.decode(z[:, :, i : i + CHUNK]).shape[2] for i in range(0, 3 * CHUNK, CHUNK)]
    dec.close()
    bounds = [preset.chunk_video_frames(i) for i in range(3)]
    assert [b - a for a, b in bounds] == sizes == [9, 12, 12]
    assert bounds[0][0] == 0 and all(bounds[i][1] == bounds[i + 1][0] for i in range(2))
    for name in ("toy", "wan2.1-t2v-1.3b"):
        assert get_preset(name).chunk_video_frames(4) == (9 + 3 * 12, 9 + 4 * 12)
    with pytest.raises(ValueError):
        preset.chunk_video_frames(-1)
