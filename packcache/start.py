"""Context from pictures: a start image (or clip) and mid-stream image cues, as the cache's first chunks.

A stream that starts from a picture begins with the picture *as context*: the frames are fitted to the preset's
size, encoded by the model's own VAE in stream chunks, and committed through the session's normal commit phase
(`GenerationSession._commit`), so with the packed and window caches they land in the sink and stay there at full
resolution for the whole endless stream. Nothing here touches the cache; this module only prepares latents.

Rules (stated once, tested in tests/test_start.py):

* **Input**: uint8 (H, W, 3) for one picture or (T, H, W, 3) for a clip, T >= 1, RGB.
* **Fit**: scale to cover the preset's H x W (aspect ratio kept, bilinear with antialiasing), then crop the centre.
* **Chunking** (Wan's causal VAE turns 1 + 4k pixel frames into 1 + k latents; a chunk is `chunk_frames` latents):
  at the start of a video the first chunk takes 1 + 4(T-1) pixel frames (9 for T = 3) and every later chunk 4T
  (12). A clip is padded *at the front* with copies of its first frame up to the next whole number of chunks, so
  its last frame is the last frame of context: the stream continues from where the clip ends, and its first frame
  is still what the sink holds. A single picture is therefore a still first chunk (9 copies).
* **Encoding** is chunk by chunk (`packcache.vae.encode_by_chunks`, which the toy model's training clips also go
  through): chunk 0 from its own frames, every later chunk afresh from the previous frame plus its own frames,
  keeping its last T latents. A mid-stream cue (the stream already has context) is encoded like a later chunk: the picture's first
  frame stands in as the "previous frame".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import StartFramesError
from .vae import encode_by_chunks

MAX_START_CHUNKS = 20   # 20 chunks of 3 latents = 237 frames (~15 s at 16 FPS): a clip, not a film


def check_frames(frames: object, what: str = "start frames") -> np.ndarray:
    """Validate a picture or clip; returns it as (T, H, W, 3) uint8 (a view when possible)."""
    if not isinstance(frames, np.ndarray):
        raise StartFramesError(f"{what} must be a numpy uint8 array (T, H, W, 3), not {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise StartFramesError(f"{what} must be uint8 RGB, not {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4:
        raise StartFramesError(f"{what} must have shape (H, W, 3) or (T, H, W, 3), got {tuple(frames.shape)}")
    t, h, w, c = frames.shape
    if c != 3:
        raise StartFramesError(f"{what} must have 3 channels (RGB), got {c} in shape {tuple(frames.shape)}")
    if t == 0:
        raise StartFramesError(f"{what} has no frames")
    if h == 0 or w == 0:
        raise StartFramesError(f"{what} are zero-sized ({w}x{h})")
    return frames


def fit_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale to cover height x width (aspect kept), crop the centre: uint8 (T, height, width, 3)."""
    frames = check_frames(frames)
    _, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return np.ascontiguousarray(frames)
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def context_chunks(num_frames: int, chunk_frames: int, temporal_stride: int, first: bool) -> int:
    """Chunks a clip of `num_frames` becomes (see the module's chunking rule)."""
    s, t = temporal_stride, chunk_frames
    head = 1 + s * (t - 1) if first else s * t     # pixel frames of the first chunk
    return 1 + max(0, math.ceil((num_frames - head) / (s * t)))


def pad_front(frames: np.ndarray, chunks: int, chunk_frames: int, temporal_stride: int, first: bool) -> np.ndarray:
    """The clip padded at the front with its first frame to exactly `chunks` chunks of pixel frames; a mid-stream
    cue gets one more leading copy (the 'previous frame' its first chunk is encoded from)."""
    s, t = temporal_stride, chunk_frames
    need = (1 + s * (t * chunks - 1)) if first else (1 + s * t * chunks)
    extra = need - len(frames)
    assert extra >= 0, (need, len(frames))
    return np.concatenate([np.repeat(frames[:1], extra, axis=0), frames]) if extra else frames


@torch.no_grad()
def encode_context(vae, frames: np.ndarray, chunk_frames: int, first: bool) -> list[torch.Tensor]:
    """Fitted uint8 frames (T, H, W, 3) -> normalized latents, one (1, C, chunk_frames, h, w) tensor per chunk.

    `first`: the stream has no context yet (its decoder starts fresh), so chunk 0 is encoded as a video's first.
    """
    s, t = vae.temporal_stride, chunk_frames
    n = context_chunks(len(frames), t, s, first)
    if n > MAX_START_CHUNKS:
        raise StartFramesError(f"a start clip may have at most {MAX_START_CHUNKS} chunks "
                               f"({1 + s * (t * MAX_START_CHUNKS - 1)} frames); got {len(frames)} frames")
    clip = pad_front(frames, n, t, s, first)
    x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1.0)   # (1, 3, F, H, W) in [-1, 1]
    out = encode_by_chunks(vae.encode, x, t, s, first)      # without `first`, frame 0 is the leading copy
    assert len(out) == n and all(c.shape[2] == t for c in out), [c.shape for c in out]
    return out
