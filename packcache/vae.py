"""Wan VAE wrapper: latent normalisation, encode, and chunk-by-chunk streaming decode.

The diffusers `AutoencoderKLWan` keeps its causal-conv feature cache on the module (`_feat_map`) and clears it on
every `decode` call, so it can neither continue a video across calls nor serve two sessions at once. Here every
`StreamingDecoder` owns its cache list and drives the diffusers decoder modules itself, frame by frame exactly as
`AutoencoderKLWan._decode` does; the VAE module is only read, so many decoders (threads, sessions) can share it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, patchify, unpatchify
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .exact import batch_invariant_convs
from .errors import PresetError
from .presets import VAEConfig

logger = logging.getLogger(__name__)

__all__ = ["StreamingDecoder", "VideoVAE", "decode_unclamped", "frames_to_uint8"]

_STACKABLE = object()   # batch_key's marker for a cache entry that is a tensor (its shape follows)


def _count_causal_convs(module: torch.nn.Module) -> int:
    """Length of the feature-cache list a Wan encoder/decoder pass indexes into (one slot per causal conv)."""
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class VideoVAE:
    """A shared, read-only Wan VAE plus the preset's latent normalisation.

    Latents everywhere else in the engine are *normalized*: z_norm = (z - latents_mean) / latents_std.
    Inputs are cast to the VAE's device/dtype; outputs are float32 (the VAE is usually kept in float32, as
    diffusers' Wan pipelines do, even when the transformer runs in bf16).
    """

    def __init__(self, vae: AutoencoderKLWan, config: VAEConfig) -> None:
        if vae.config.z_dim != config.z_dim:
            raise PresetError(f"VAE has z_dim={vae.config.z_dim} but the preset says z_dim={config.z_dim}")
        self.vae = vae.eval().requires_grad_(False)
        self.config = config
        self._patch = vae.config.patch_size or 1   # Wan2.2 layout: 2x2 pixel patches in, patches out
        self._spatial = self._patch * 2 ** (len(vae.config.dim_mult) - 1)
        self._temporal = 2 ** sum(bool(t) for t in vae.config.temperal_downsample)
        if (self._spatial, self._temporal) != (config.spatial_stride, config.temporal_stride):
            raise PresetError(
                f"VAE strides (spatial {self._spatial}, temporal {self._temporal}) differ from the preset's "
                f"(spatial {config.spatial_stride}, temporal {config.temporal_stride})"
            )
        if len(config.latents_mean) != config.z_dim or len(config.latents_std) != config.z_dim:
            raise PresetError(f"latents_mean/latents_std must have z_dim={config.z_dim} entries")
        self.z_dim = config.z_dim
        self._enc_convs = _count_causal_convs(vae.encoder)
        self._dec_convs = _count_causal_convs(vae.decoder)
        # float32 stats on CPU; moved per call (tiny) so the VAE can be moved between devices freely.
        self._mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def build(
        cls, config: VAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> VideoVAE:
        """Random-init VAE, identical for a given seed and config (global RNG untouched): for tests and benches."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(**config.diffusers_kwargs())
        vae = vae.to(device=device)
        if dtype != torch.float32:  # diffusers warns on any dtype cast, so cast only when asked to
            vae = vae.to(dtype=dtype)
        return cls(vae, config)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def spatial_stride(self) -> int:
        return self._spatial

    @property
    def temporal_stride(self) -> int:
        return self._temporal

    def num_frames(self, latent_frames: int, first: bool = True) -> int:
        """Pixel frames decoded from `latent_frames` latents: 1 + 4(T-1) at the start of a video, 4T after."""
        if first:
            return 1 + self._temporal * (latent_frames - 1) if latent_frames > 0 else 0
        return self._temporal * latent_frames

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mean.to(like.device), self._std.to(like.device)

    def normalize(self, raw_latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the normalized latents the DiT works in (float32)."""
        mean, std = self._stats(raw_latents)
        return (raw_latents.float() - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> raw VAE latents (float32)."""
        mean, std = self._stats(latents)
        return latents.float() * std + mean

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B,3,F,H,W) pixels in [-1,1] -> normalized latent means (B,16,1+(F-1)//4,H/8,W/8), float32.

        Same frame grouping as `AutoencoderKLWan._encode` (first frame alone, then groups of 4) but with a local
        feature cache, so concurrent encodes on one shared module are safe.
        """
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames of shape (B,3,F,H,W), got {tuple(frames.shape)}")
        _, _, f, h, w = frames.shape
        s, t = self._spatial, self._temporal
        if (f - 1) % t or h % s or w % s:
            raise ValueError(f"frames must have F = 1 + {t}k and H, W divisible by {s}; got F={f}, H={h}, W={w}")
        x = frames.to(device=self.device, dtype=self.dtype)
        if self._patch > 1:
            x = patchify(x, patch_size=self._patch)
        cache: list[Any] = [None] * self._enc_convs
        outs = []
        with batch_invariant_convs(self.device):   # a batch of clips encodes each as alone (packcache/exact.py)
            for i in range(1 + (f - 1) // t):
                sl = x[:, :, :1] if i == 0 else x[:, :, 1 + t * (i - 1) : 1 + t * i]
                outs.append(self.vae.encoder(sl, feat_cache=cache, feat_idx=[0]))
            moments = self.vae.quant_conv(torch.cat(outs, dim=2))
        return self.normalize(DiagonalGaussianDistribution(moments).mode())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One-shot decode of a whole video of normalized latents (a fresh streaming decoder, closed after)."""
        dec = self.stream_decoder()
        try:
            return dec.decode(latents)
        finally:
            dec.close()

    def stream_decoder(self) -> StreamingDecoder:
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes a video chunk by chunk, carrying the VAE's causal conv cache across chunks.

    Owns its feature cache, so the result of decoding chunks in sequence equals one-shot `AutoencoderKLWan.decode`
    of the concatenated latents, and several decoders can run over one shared VAE (also from different threads).
    One decoder must not be used by two threads at once.
    """

    def __init__(self, vae: VideoVAE) -> None:
        self._vae = vae
        self._cache: list[Any] | None = None
        self._first = True
        self._closed = False
        self.reset()

    def reset(self) -> None:
        """Start a new video: the next chunk is decoded as the first (1 + 4(T-1) frames)."""
        if self._closed:
            raise RuntimeError("StreamingDecoder is closed")
        self._cache = [None] * self._vae._dec_convs
        self._first = True

    def close(self) -> None:
        """Drop the cached feature tensors (they can reach hundreds of MB at 832x480)."""
        self._cache = None
        self._closed = True

    @property
    def started(self) -> bool:
        """True once a chunk has been decoded since construction/reset."""
        return not self._first

    def cache_bytes(self) -> int:
        """Bytes held by this decoder's feature cache (for memory accounting)."""
        if not self._cache:
            return 0
        return sum(c.numel() * c.element_size() for c in self._cache if isinstance(c, torch.Tensor))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B,16,T,h,w) -> pixels (B,3,F,8h,8w) in [-1,1], float32 (patches reassembled).

        F = 1 + 4(T-1) for the first chunk of a video, F = 4T for every later chunk.
        """
        if self._closed or self._cache is None:
            raise RuntimeError("StreamingDecoder is closed")
        v = self._vae
        if latents.ndim != 5 or latents.shape[1] != v.z_dim:
            raise ValueError(f"expected latents of shape (B,{v.z_dim},T,h,w), got {tuple(latents.shape)}")
        if latents.shape[2] == 0:
            b, _, _, h, w = latents.shape
            return torch.zeros(b, 3, 0, h * v.spatial_stride, w * v.spatial_stride, device=v.device)
        z = v.denormalize(latents).to(device=v.device, dtype=v.dtype)
        with batch_invariant_convs(v.device):     # the same kernels as `decode_batched`: batching stays exact
            out = decode_unclamped(v.vae, z, self._cache, first=self._first)
        self._first = False
        return torch.clamp(out, -1.0, 1.0).float()

    # ---- several streams in one pass (packcache/batch.py) ---------------------------------------------------------
    def batch_key(self, latents: torch.Tensor) -> tuple | None:
        """Decoders whose keys are equal can decode their next chunks together (`decode_batched`): the same VAE, the
        same `first`, latents of one shape, and per conv the same cache entry (None, the marker "Rep", or a tensor
        of one shape, batch aside). None: this one decodes alone (closed, or an empty chunk)."""
        if self._closed or self._cache is None or latents.ndim != 5 or latents.shape[2] == 0:
            return None
        b = latents.shape[0]
        entries = []
        for c in self._cache:
            if isinstance(c, torch.Tensor):
                if c.shape[0] != b:
                    return None
                entries.append((_STACKABLE, tuple(c.shape[1:]), c.dtype, c.device))
            else:
                entries.append(c)
        return (id(self._vae), self._first, tuple(latents.shape[1:]), latents.dtype, tuple(entries))

    @classmethod
    @torch.no_grad()
    def decode_batched(cls, decoders: list[StreamingDecoder], latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each decoder's next chunk, all in one pass of the decoder: latents and conv caches stacked along the
        batch, pixels and caches split back. Equals each `decoder.decode(latents)` alone: bit for bit on the CPU
        (packcache/exact.py), to kernel rounding on CUDA. The decoders must share one `batch_key`; their state
        changes only when the whole pass succeeded."""
        if len(decoders) != len(latents) or not decoders:
            raise ValueError("decode_batched needs one latents tensor per decoder")
        keys = {d.batch_key(x) for d, x in zip(decoders, latents)}
        if None in keys or len(keys) != 1 or len({id(d) for d in decoders}) != len(decoders):
            raise ValueError("decode_batched needs distinct decoders of one batch_key")
        if len(decoders) == 1:
            return [decoders[0].decode(latents[0])]
        v = decoders[0]._vae
        sizes = [x.shape[0] for x in latents]
        z = v.denormalize(torch.cat(latents)).to(device=v.device, dtype=v.dtype)
        caches = [d._cache for d in decoders]
        stacked = [torch.cat(col) if isinstance(col[0], torch.Tensor) else col[0] for col in zip(*caches)]
        with batch_invariant_convs(v.device):
            out = decode_unclamped(v.vae, z, stacked, first=decoders[0]._first)
        out = torch.clamp(out, -1.0, 1.0).float()
        # each stream owns its cache again (a clone, not a view that would keep the stacked tensor alive)
        split = [c.split(sizes) if isinstance(c, torch.Tensor) else [c] * len(sizes) for c in stacked]
        for i, d in enumerate(decoders):
            d._cache = [parts[i].clone() if isinstance(parts[i], torch.Tensor) else parts[i] for parts in split]
            d._first = False
        return list(out.split(sizes))

    # ---- snapshots (packcache/snapshot.py) ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The causal conv cache (per conv: None, the marker "Rep", or the last frames' features) and `first`."""
        if self._closed or self._cache is None:
            raise RuntimeError("StreamingDecoder is closed")
        return {"first": self._first, "cache": list(self._cache)}

    def load_state_dict(self, state: dict) -> None:
        from .errors import SnapshotError
        if "cache" not in state:
            raise SnapshotError("the snapshot's decoder state is not a Wan VAE stream's: it was taken with another "
                                "decoder (restore it on a server with the same --decoder)")
        cache = state["cache"]
        if len(cache) != self._vae._dec_convs:
            raise SnapshotError(f"snapshot decoder state has {len(cache)} conv caches; this VAE has "
                                f"{self._vae._dec_convs}")
        v = self._vae
        self._cache = [c.to(v.device) if isinstance(c, torch.Tensor) else c for c in cache]
        self._first = bool(state["first"])


def encode_by_chunks(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, chunk_frames: int,
                     temporal_stride: int, first: bool = True) -> list[torch.Tensor]:
    """Pixels (B, 3, F, H, W) -> latents, one (B, C, chunk_frames, h, w) tensor per stream chunk, each chunk encoded
    afresh as a stream has it: with `first`, chunk 0 from its 1 + s(T-1) frames, as a video's start; every later
    chunk from the frame before it plus its own sT frames, keeping the last T latents. Without `first`, frame 0 is
    that leading frame. The one place this rule lives: start pictures (`packcache.start`) and the toy model's
    training clips (`toyworld.train`) both encode through it, so the DiT is trained on the latents it is given.
    `encode` maps pixels to latents (a `VideoVAE.encode`, or a raw `AutoencoderKLWan`'s posterior mean)."""
    s, t = temporal_stride, chunk_frames
    a = 1 + s * (t - 1) if first else 1
    out = [encode(pixels[:, :, :a])] if first else []
    while a < pixels.shape[2]:
        out.append(encode(pixels[:, :, a - 1:a + s * t])[:, :, 1:])
        a += s * t
    return out


def decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor, cache: list[Any] | None = None,
                     first: bool = True) -> torch.Tensor:
    """Raw latents (B,z,T,h,w) -> pixels (B,3,F,H,W), frame by frame through the causal decoder as
    `AutoencoderKLWan._decode` does, carrying `cache` (a fresh one if None) and reassembling patches, but without
    the final clamp. Gradients flow unless the caller turns them off: VAE training uses it (a clamped pixel has no
    gradient), and so does `StreamingDecoder`, which clamps."""
    if cache is None:
        cache = [None] * _count_causal_convs(vae.decoder)
    x = vae.post_quant_conv(z)  # 1x1x1 conv: needs no temporal cache
    outs = [vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=first and i == 0)
            for i in range(x.shape[2])]
    out = torch.cat(outs, dim=2)
    patch = vae.config.patch_size
    return unpatchify(out, patch_size=patch) if patch else out


def frames_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B,3,F,H,W) in [-1,1] -> uint8 (B,F,H,W,3), clamped and rounded: what video encoders and browsers take."""
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (B,3,F,H,W), got {tuple(pixels.shape)}")
    x = ((pixels.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous().cpu().numpy()
