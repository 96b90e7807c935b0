"""A TAEHV-architecture streaming decoder for Wan latents: the fast alternative to the full Wan VAE decode.

TAEHV (madebyollin/taehv, MIT) is a tiny video autoencoder distilled from a full one. This is our own
implementation of its decoder, written to load the published checkpoints' key layout (`taew2_1.pth`, and the
same-architecture `lighttaew2_1`), which users download themselves: one `nn.Sequential` under `decoder.`,

    0 Clamp  1 conv(z, 256)  2 ReLU
    3-5 MemBlock(256)   6 Upsample x2  7 TGrow(256, 1)  8 conv(256, 128, no bias)
    9-11 MemBlock(128)  12 Upsample x2 13 TGrow(128, 2) 14 conv(128, 64, no bias)
    15-17 MemBlock(64)  18 Upsample x2 19 TGrow(64, 2)  20 conv(64, 64, no bias)
    21 ReLU  22 conv(64, 3 * patch^2)

(3x3 convs, padding 1). A MemBlock sees its own input and its input one time step earlier (zeros before the
first); a TGrow(n, s) is a 1x1 conv n -> n*s whose output channels are s consecutive time steps. The widths, the
latent channels and each TGrow's stride are read from the checkpoint, so random test checkpoints can be small.
Output: pixels in [0, 1] for each of 4 frames per latent frame, of which the first 3 of a video are dropped, so a
stream of 3-latent-frame chunks gives 9 then 12 frames, exactly as the Wan VAE's causal decode does.

Inputs are the normalized latents the DiT works in (TAEHV applies no latent scale or shift of its own).
Streaming state: each MemBlock's last input frame. Decoding a chunk runs every time step of the chunk in parallel
through each layer, so the per-chunk cost is a handful of convolutions at each resolution (~7 ms for a 12-frame
832x480 chunk on an H100, as published for FlashDreams).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import WeightsError
from .exact import batch_invariant_convs

log = logging.getLogger(__name__)

__all__ = ["TAEHVDecoder", "TAEHVModel", "TAEHVStream", "load_taehv", "taehv_state_dict"]


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the incoming latents to (-3, 3)."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block over [x_t ; x_{t-1}] (its input now and one step earlier)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in * 2, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """Temporal upsampling by `stride`: a 1x1 conv whose output channel groups are consecutive time steps."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B*T, C, H, W) -> (B*T*stride, C, H, W)
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * self.stride, c, h, w)


class TAEHVModel(nn.Module):
    """The decoder stack, in the published key layout (`decoder.<index>.…`)."""

    def __init__(self, latent_channels: int = 16, widths: tuple[int, int, int, int] = (256, 128, 64, 64),
                 time_strides: tuple[int, int, int] = (1, 2, 2), patch_size: int = 1):
        super().__init__()
        n = widths
        self.latent_channels = latent_channels
        self.patch_size = patch_size
        self.time_strides = tuple(time_strides)
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, n[0]), nn.ReLU()]
        for stage in range(3):
            c = n[stage]
            layers += [MemBlock(c, c), MemBlock(c, c), MemBlock(c, c), nn.Upsample(scale_factor=2),
                       TGrow(c, time_strides[stage]), _conv(c, n[stage + 1], bias=False)]
        layers += [nn.ReLU(), _conv(n[3], 3 * patch_size ** 2)]
        self.decoder = nn.Sequential(*layers)

    @property
    def time_upscale(self) -> int:
        out = 1
        for s in self.time_strides:
            out *= s
        return out

    @property
    def space_upscale(self) -> int:
        return 8 * self.patch_size

    def memblock_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.decoder) if isinstance(m, MemBlock)]

    def run(self, x: torch.Tensor, memory: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One chunk through the stack, every time step at once.

        x (B, T, C, h, w); memory: per MemBlock (in order) its input at the step before this chunk, (B, C, H, W)
        (zeros at the start of a video). Returns pixels (B, T*upscale, 3, 8h, 8w) in [0, 1], unclamped, and the
        new memory. Pure tensor code with fixed shapes per chunk size: what torch.compile wants."""
        b = x.shape[0]
        h = x.flatten(0, 1)
        new_memory = []
        m = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                bt, c, hh, ww = h.shape
                seq = h.reshape(b, bt // b, c, hh, ww)
                past = torch.cat([memory[m][:, None], seq[:, :-1]], 1).flatten(0, 1)
                new_memory.append(seq[:, -1])
                h = layer(h, past)
                m += 1
            else:
                h = layer(h)
        if self.patch_size > 1:
            h = F.pixel_shuffle(h, self.patch_size)
        return h.reshape(b, -1, *h.shape[1:]), new_memory


def taehv_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a TAEHV checkpoint (.pth or .safetensors); only the `decoder.` keys are kept."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"TAEHV decoder weights not found: {path} (download taew2_1.pth yourself; see README)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear error
        raise WeightsError(f"cannot read TAEHV weights {path.name}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path.name}: not a state dict")
    state = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("decoder.")}
    if not state:
        raise WeightsError(f"{path.name}: no 'decoder.' keys: not a TAEHV checkpoint")
    return state


def _shape(state: dict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"TAEHV checkpoint lacks {key!r} (expected the taew2_1 layout)")
    return tuple(state[key].shape)


def model_from_state_dict(state: dict[str, torch.Tensor], time_upscale: int | None = None) -> TAEHVModel:
    """Build the decoder the checkpoint describes (widths, latent channels, temporal strides) and load it.

    With `time_upscale` given, TGrow layers stored wider than needed keep their last time step's channels, from
    the first stage on (TAEHV checkpoints may store a stride-2 TGrow where the Wan layout uses stride 1)."""
    state = dict(state)
    z = _shape(state, "decoder.1.weight")[1]
    widths = (_shape(state, "decoder.1.weight")[0], _shape(state, "decoder.8.weight")[0],
              _shape(state, "decoder.14.weight")[0], _shape(state, "decoder.20.weight")[0])
    strides = tuple(_shape(state, f"decoder.{i}.conv.weight")[0] // _shape(state, f"decoder.{i}.conv.weight")[1]
                    for i in (7, 13, 19))
    if time_upscale is not None:
        fixed, excess = list(strides), strides[0] * strides[1] * strides[2] // max(1, time_upscale)
        for stage, i in enumerate((7, 13, 19)):
            while excess > 1 and fixed[stage] > 1 and fixed[stage] % 2 == 0:
                fixed[stage] //= 2
                excess //= 2
            key = f"decoder.{i}.conv.weight"
            keep = fixed[stage] * state[key].shape[1]
            state[key] = state[key][-keep:]
        strides = tuple(fixed)
    out = _shape(state, "decoder.22.weight")[0]
    patch = int(round((out / 3) ** 0.5))
    if 3 * patch * patch != out:
        raise WeightsError(f"TAEHV checkpoint's last conv has {out} outputs, not 3 x patch^2")
    model = TAEHVModel(z, widths, strides, patch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"TAEHV checkpoint does not match the layout: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    return model


class TAEHVDecoder:
    """A shared, read-only TAEHV model: opens per-session streams (`stream_decoder`), like `VideoVAE`."""

    def __init__(self, model: TAEHVModel, z_dim: int, temporal_stride: int, spatial_stride: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if model.latent_channels != z_dim:
            raise WeightsError(f"TAEHV decoder takes {model.latent_channels} latent channels, the model makes {z_dim}")
        if model.time_upscale != temporal_stride or model.space_upscale != spatial_stride:
            raise WeightsError(f"TAEHV decoder upscales time x{model.time_upscale} and space x{model.space_upscale}; "
                               f"the VAE's strides are {temporal_stride} and {spatial_stride}")
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.z_dim = z_dim
        self.temporal_stride = temporal_stride
        self.spatial_stride = spatial_stride
        self.run = self.model.run          # replaced by a compiled version by packcache.compile

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def stream_decoder(self) -> "TAEHVStream":
        return TAEHVStream(self)


class TAEHVStream:
    """Decodes one video chunk by chunk; same contract as `vae.StreamingDecoder` (pixels in [-1, 1], float32)."""

    def __init__(self, decoder: TAEHVDecoder):
        self._dec = decoder
        self._memory: list[torch.Tensor] | None = None
        self._first = True
        self._closed = False

    def reset(self) -> None:
        if self._closed:
            raise RuntimeError("TAEHVStream is closed")
        self._memory, self._first = None, True

    def close(self) -> None:
        self._memory, self._closed = None, True

    @property
    def started(self) -> bool:
        return not self._first

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._memory or [])

    def _zero_memory(self, b: int, h: int, w: int) -> list[torch.Tensor]:
        model, out = self._dec.model, []
        for i in model.memblock_indices():
            c = model.decoder[i].conv[0].in_channels // 2
            scale = 2 ** sum(1 for j in range(i) if isinstance(model.decoder[j], nn.Upsample))
            out.append(torch.zeros(b, c, h * scale, w * scale, device=self._dec.device, dtype=self._dec.dtype))
        return out

    def _check(self, latents: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("TAEHVStream is closed")
        z = self._dec.z_dim
        if latents.ndim != 5 or latents.shape[1] != z:
            raise ValueError(f"expected latents of shape (B,{z},T,h,w), got {tuple(latents.shape)}")

    def _pixels(self, pixels: torch.Tensor, first: bool) -> torch.Tensor:
        """The run's (B, T*4, 3, H, W) in ~[0, 1] -> (B, 3, F, H, W) in [-1, 1], startup frames dropped."""
        if first:
            pixels = pixels[:, self._dec.temporal_stride - 1:]               # 4 - 1 startup frames dropped
        return (pixels.float().clamp(0, 1) * 2 - 1).transpose(1, 2).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, z, T, h, w) -> pixels (B, 3, F, 8h, 8w) in [-1, 1], float32;
        F = 1 + 4(T-1) for a video's first chunk, 4T after."""
        self._check(latents)
        d = self._dec
        b, _, t, h, w = latents.shape
        if self._memory is None:
            self._memory = self._zero_memory(b, h, w)
        x = latents.to(device=d.device, dtype=d.dtype).transpose(1, 2)      # (B, T, z, h, w)
        with batch_invariant_convs(d.device):                                # as batched: the same frames
            pixels, self._memory = d.run(x, self._memory)                    # (B, T*4, 3, H, W) in ~[0, 1]
        first, self._first = self._first, False
        return self._pixels(pixels, first)

    # ---- snapshots (packcache/snapshot.py): a restarted or moved session keeps its TAEHV stream ---------------
    def state_dict(self) -> dict:
        """The MemBlock memories (each block's input at the chunk's last time step; None before the first chunk)
        and `first`, marked as a TAEHV stream's."""
        if self._closed:
            raise RuntimeError("TAEHVStream is closed")
        return {"kind": "taehv", "first": self._first, "memory": None if self._memory is None else list(self._memory)}

    def load_state_dict(self, state: dict) -> None:
        from .errors import SnapshotError
        if state.get("kind") != "taehv":
            raise SnapshotError("the snapshot's decoder state is not a TAEHV stream's: it was taken with another "
                                "decoder (restore it on a server with the same --decoder)")
        memory, d = state["memory"], self._dec
        blocks = len(d.model.memblock_indices())
        if memory is not None and len(memory) != blocks:
            raise SnapshotError(f"snapshot decoder state has {len(memory)} TAEHV memories; this decoder has {blocks}")
        self._memory = None if memory is None else [m.to(device=d.device, dtype=d.dtype) for m in memory]
        self._first = bool(state["first"])

    # ---- batching across sessions (packcache/batch.py), as `vae.StreamingDecoder` does ------------------------
    def batch_key(self, latents: torch.Tensor) -> tuple | None:
        """Streams whose keys are equal decode their next chunks in one pass (`decode_batched`): the same model,
        the same `first`, latents of one shape. None: this one decodes alone (closed, or an empty chunk)."""
        if self._closed or latents.ndim != 5 or latents.shape[2] == 0:
            return None
        return (id(self._dec), self._first, tuple(latents.shape[1:]), latents.dtype)

    @classmethod
    @torch.no_grad()
    def decode_batched(cls, streams: list["TAEHVStream"], latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each stream's next chunk in one pass of the model: latents and MemBlock memories stacked along the
        batch, pixels and memories split back. Equals each `stream.decode(latents)` alone (bit for bit on the
        CPU inside `batch_invariant_convs`). The streams must share one `batch_key`; their state changes only when
        the whole pass succeeded."""
        if len(streams) != len(latents) or not streams:
            raise ValueError("decode_batched needs one latents tensor per stream")
        keys = {st.batch_key(x) for st, x in zip(streams, latents)}
        if None in keys or len(keys) != 1 or len({id(st) for st in streams}) != len(streams):
            raise ValueError("decode_batched needs distinct streams of one batch_key")
        for st, x in zip(streams, latents):
            st._check(x)
        d, first = streams[0]._dec, streams[0]._first
        sizes = [x.shape[0] for x in latents]
        memories = [st._memory if st._memory is not None else st._zero_memory(x.shape[0], *x.shape[3:])
                    for st, x in zip(streams, latents)]
        stacked = [torch.cat(col) for col in zip(*memories)]
        x = torch.cat(latents).to(device=d.device, dtype=d.dtype).transpose(1, 2)
        with batch_invariant_convs(d.device):
            pixels, new_memory = d.run(x, stacked)
        split = [m.split(sizes) for m in new_memory]
        for i, st in enumerate(streams):
            st._memory = [parts[i].clone() for parts in split]    # its own tensors, not views of the batch
            st._first = False
        return list(streams[0]._pixels(pixels, first).split(sizes))


def load_taehv(path: str | Path, z_dim: int, temporal_stride: int, spatial_stride: int,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TAEHVDecoder:
    """A TAEHV decoder from a user-downloaded checkpoint (taew2_1.pth, lighttaew2_1.safetensors, …)."""
    model = model_from_state_dict(taehv_state_dict(path), time_upscale=temporal_stride)
    dec = TAEHVDecoder(model, z_dim, temporal_stride, spatial_stride, device, dtype)
    log.info("TAEHV decoder from %s: widths %s, time x%d, %.1f M parameters, %s", Path(path).name,
             [model.decoder[i].conv[0].out_channels for i in model.memblock_indices()[::3]], model.time_upscale,
             sum(p.numel() for p in model.parameters()) / 1e6, dec.device)
    return dec
