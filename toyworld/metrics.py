"""Measurements on generated toy-world video (uint8 frames (F, H, W, 3)), VBench-style but exact for this world.

The world draws shapes bright and saturated and backgrounds dark or desaturated, so a pixel is *foreground* when
its HSV saturation and value are both high; its colour name is the nearest of the eight shape hues.

- `dominant_color(frames)`       the colour name with the most foreground pixels (None if nearly no foreground).
- `prompt_color(prompt)`         the shape colour a prompt asks for (synonyms such as "crimson" included).
- `shape_of(mask)`               circle / square / triangle from the fill ratio of the largest blob's bounding box.
- `subject_consistency(...)`     share of frames whose dominant colour and shape match the reference (first) ones.
- `background_stability(...)`    1 - mean |difference| of background pixels against the reference frame.
- `motion_magnitude(...)`        foreground centroid speed in pixels per second (and a VBench-like dynamic degree).
- `window_report(frames, ...)`   all of the above per time window, for the long-video tables.
"""

from __future__ import annotations

import re

import numpy as np

from .world import COLOR_HUES, FPS

SAT_MIN = 0.5
VAL_MIN = 0.6
MIN_FG_FRACTION = 0.003   # below this share of foreground pixels a frame has "no subject"

COLOR_NAMES = tuple(COLOR_HUES)
_HUES = np.array([COLOR_HUES[c] for c in COLOR_NAMES], np.float32)

# words a prompt may use for each shape colour (evaluation uses some the training captions never do)
PROMPT_COLOR_WORDS = {
    "red": ["red", "crimson", "scarlet", "ruby", "cherry"],
    "orange": ["orange", "tangerine", "amber"],
    "yellow": ["yellow", "golden", "lemon", "gold"],
    "green": ["green", "lime", "emerald"],
    "cyan": ["cyan", "aqua", "turquoise"],
    "blue": ["blue", "azure", "cobalt", "sapphire"],
    "purple": ["purple", "violet", "lavender", "indigo"],
    "pink": ["pink", "magenta", "fuchsia", "rose"],
}


def rgb_to_hsv(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (..., 3) -> hue in degrees [0, 360), saturation and value in [0, 1]."""
    x = frames.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx = x.max(-1)
    mn = x.min(-1)
    d = mx - mn
    s = np.where(mx > 0, d / np.maximum(mx, 1e-6), 0.0)
    dd = np.maximum(d, 1e-6)
    h = np.where(mx == r, ((g - b) / dd) % 6, np.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4)) * 60.0
    return h, s, mx


def foreground(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (mask bool (..., H, W), colour index int (..., H, W), -1 where not foreground)."""
    h, s, v = rgb_to_hsv(frames)
    mask = (s > SAT_MIN) & (v > VAL_MIN)
    dist = np.abs(h[..., None] - _HUES)
    dist = np.minimum(dist, 360.0 - dist)
    idx = dist.argmin(-1)
    return mask, np.where(mask, idx, -1)


def color_histogram(frames: np.ndarray) -> np.ndarray:
    """Per-frame count of foreground pixels of each colour, (F, 8)."""
    _, idx = foreground(frames)
    flat = idx.reshape(idx.shape[0], -1)
    return np.stack([(flat == k).sum(1) for k in range(len(COLOR_NAMES))], axis=1)


def dominant_color(frames: np.ndarray) -> str | None:
    """The colour with the most foreground pixels over all given frames; None when there is almost none."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    hist = color_histogram(frames).sum(0)
    if hist.sum() < MIN_FG_FRACTION * frames.shape[0] * frames.shape[1] * frames.shape[2]:
        return None
    return COLOR_NAMES[int(hist.argmax())]


def prompt_color(prompt: str) -> str | None:
    """The first shape colour named in a prompt (the subject's), by word; None if it names none."""
    words = re.findall(r"[a-z]+", prompt.lower())
    lookup = {w: c for c, ws in PROMPT_COLOR_WORDS.items() for w in ws}
    # "on a blue background": the colour right before background/backdrop words is the background's
    bg_words = {"background", "backdrop"}
    for i, w in enumerate(words):
        if w in lookup:
            following = words[i + 1:i + 3]
            if any(f in bg_words for f in following):
                continue
            return lookup[w]
    return None


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def shape_of(mask: np.ndarray) -> str | None:
    """circle / square / triangle from the largest blob's fill ratio of its bounding box (pi/4, 1, 1/2)."""
    if mask.sum() < 6:
        return None
    blob = _largest_blob(mask)
    ys, xs = np.nonzero(blob)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = blob.sum() / box
    if fill > 0.9:
        return "square"
    if fill > 0.66:
        return "circle"
    return "triangle"


def frame_subjects(frames: np.ndarray) -> tuple[list[str | None], list[str | None], np.ndarray]:
    """Per frame: dominant colour, the shape of that colour's largest blob, and its centroid (x, y) (NaN if none)."""
    _, idx = foreground(frames)
    colors, shapes, cents = [], [], []
    npix = frames.shape[1] * frames.shape[2]
    for i in range(frames.shape[0]):
        counts = np.bincount(idx[i][idx[i] >= 0].ravel(), minlength=len(COLOR_NAMES))
        if counts.sum() < MIN_FG_FRACTION * npix:
            colors.append(None), shapes.append(None), cents.append((np.nan, np.nan))
            continue
        k = int(counts.argmax())
        m = idx[i] == k
        colors.append(COLOR_NAMES[k])
        shapes.append(shape_of(m))
        blob = _largest_blob(m)
        ys, xs = np.nonzero(blob)
        cents.append((xs.mean(), ys.mean()))
    return colors, shapes, np.array(cents, np.float64)


def _mode(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    vals, counts = np.unique(np.array(xs, dtype=object).astype(str), return_counts=True)
    return str(vals[counts.argmax()])


def background_stability(frames: np.ndarray, reference: np.ndarray) -> float:
    """1 - mean |frame - reference| / 255 over pixels that are background in both; 1.0 is a perfectly still
    background. `reference` is one uint8 frame (H, W, 3)."""
    fg, _ = foreground(frames)
    ref_fg, _ = foreground(reference[None])
    both = ~fg & ~ref_fg[0][None]
    diff = np.abs(frames.astype(np.float32) - reference[None].astype(np.float32)).mean(-1)
    if both.sum() == 0:
        return 0.0
    return float(1.0 - (diff * both).sum() / both.sum() / 255.0)


def motion_magnitude(centroids: np.ndarray, fps: int = FPS) -> float:
    """Mean centroid speed in pixels per second over frames where the subject is visible in both."""
    d = np.linalg.norm(np.diff(centroids, axis=0), axis=1)
    d = d[np.isfinite(d)]
    return float(d.mean() * fps) if d.size else 0.0


def dynamic_degree(centroids: np.ndarray, fps: int = FPS, min_px_per_s: float = 3.0) -> float:
    """Share of one-second windows in which the subject moves more than `min_px_per_s` (VBench-like)."""
    n = len(centroids) // fps
    moving = 0
    for w in range(n):
        c = centroids[w * fps:(w + 1) * fps]
        ok = np.isfinite(c).all(1)
        if ok.sum() < 2:
            continue
        c = c[ok]
        if np.linalg.norm(c[-1] - c[0]) > min_px_per_s * (len(c) - 1) / fps:   # net displacement
            moving += 1
    return moving / n if n else 0.0


def window_report(frames: np.ndarray, window_s: float = 10.0, fps: int = FPS,
                  reference_frames: int = 16) -> list[dict]:
    """Per window of `window_s` seconds: subject (colour, shape) consistency against the first second of the
    video, background stability against its first frame, motion magnitude and dynamic degree."""
    colors, shapes, cents = frame_subjects(frames)
    ref_color = _mode(colors[:reference_frames])
    ref_shape = _mode(shapes[:reference_frames])
    ref_frame = frames[0]
    w = int(window_s * fps)
    rows = []
    for start in range(0, len(frames), w):
        sl = slice(start, min(len(frames), start + w))
        cs, ss = colors[sl], shapes[sl]
        n = len(cs)
        color_ok = sum(c == ref_color for c in cs) / n
        shape_ok = sum(s == ref_shape for s in ss) / n
        rows.append({
            "t0_s": start / fps,
            "t1_s": (start + n) / fps,
            "color_consistency": color_ok,
            "shape_consistency": shape_ok,
            "subject_consistency": 0.5 * (color_ok + shape_ok),
            "background_stability": background_stability(frames[sl], ref_frame),
            "motion_px_s": motion_magnitude(cents[sl], fps),
            "dynamic_degree": dynamic_degree(cents[sl], fps),
            "visible": sum(c is not None for c in cs) / n,
        })
    return rows


def clip_summary(frames: np.ndarray, fps: int = FPS) -> dict:
    """One row for a whole clip (the window is the clip)."""
    return window_report(frames, window_s=len(frames) / fps + 1, fps=fps)[0]
