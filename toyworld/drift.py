"""Drifted copies of toy clips: what a stream's own chunks look like when it slides off its prompt.

Long toy streams fail in a few ways (toyworld/README.md): a muted background gains saturation and brightness until
it reads as a bright colour of its own, the subject's hue slides to a neighbour, or the subject fades into the
background and never comes back. Each chunk is the next one's context, so a small slip grows. `drift_colors` renders that failure onto a ground-truth clip, growing linearly from
nothing at frame 0 to full strength at the last frame; the `drift` training stage gives the model such a clip's
first chunks as context and the *undrifted* clip's later chunks as the target, under the undrifted caption. The
motion stays continuous, only the colours disagree with the prompt, and the model learns to pull them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import SAT_MIN, VAL_MIN, rgb_to_hsv


@dataclass(frozen=True)
class DriftRange:
    """How far a drifted clip ends up by its last frame (each drawn uniformly in its range)."""
    background_saturation_gain: tuple[float, float] = (1.3, 2.5)
    background_value_gain: tuple[float, float] = (1.0, 2.2)
    background_hue_shift: float = 30.0          # degrees, either way
    subject_hue_shift: tuple[float, float] = (12.0, 40.0)
    subject_fade: tuple[float, float] = (0.7, 1.0)   # share of the subject blended into the background


def hsv_to_rgb_uint8(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb
    rgb = hsv_to_rgb(np.stack([(h % 360.0) / 360.0, np.clip(s, 0, 1), np.clip(v, 0, 1)], axis=-1))
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def drift_colors(frames: np.ndarray, rng: np.random.Generator, background: np.ndarray | None = None,
                 ranges: DriftRange = DriftRange()) -> np.ndarray:
    """uint8 (F, H, W, 3) -> the same clip with its background, its subjects, or both drifting in colour, or (given
    the clip's `background` alone, (H, W, 3)) its subjects fading into it; linearly from frame 0 (unchanged) to the
    last frame."""
    ramp = np.linspace(0.0, 1.0, len(frames), dtype=np.float32)[:, None, None]
    part = int(rng.integers(3 if background is None else 4))   # 0 background, 1 subjects, 2 both, 3 fade
    if part == 3:
        x = frames.astype(np.float32)
        bg = np.asarray(background, np.float32)[None]
        covered = (np.abs(x - bg).sum(-1) > 6.0).astype(np.float32)          # shape pixels, edges included
        a = (covered * rng.uniform(*ranges.subject_fade) * ramp)[..., None]
        return np.clip(x * (1 - a) + bg * a + 0.5, 0, 255).astype(np.uint8)
    h, s, v = rgb_to_hsv(frames)
    fg = (s > SAT_MIN) & (v > VAL_MIN)
    if part in (0, 2):
        sat = rng.uniform(*ranges.background_saturation_gain)
        val = rng.uniform(*ranges.background_value_gain)
        hue = rng.uniform(-ranges.background_hue_shift, ranges.background_hue_shift)
        bg = ~fg
        s = np.where(bg, s * (1 + (sat - 1) * ramp), s)
        v = np.where(bg, v * (1 + (val - 1) * ramp), v)
        h = np.where(bg, h + hue * ramp, h)
    if part in (1, 2):
        hue = rng.uniform(*ranges.subject_hue_shift) * rng.choice([-1.0, 1.0])
        h = np.where(fg, h + hue * ramp, h)
    return hsv_to_rgb_uint8(h, s, v)
