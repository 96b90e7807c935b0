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


# ------------------------------------------------------------------------------------------------------------
# Scene readers (issue 16): subject count, shape, background colour and pattern, motion word. Each reads generated
# frames with the world's exact knowledge of what it draws (toyworld.world): the shapes' signed-distance renders,
# the muted background palette and its four patterns, and the closed-form motions. Their accuracy on rendered
# ground truth is measured by `toyworld.scene_check` and asserted in tests/test_toyworld_scene.py.

MIN_SUBJECT_AREA = 20      # px at 64x64: the smallest shape the world draws (a triangle of size 0.11) covers ~90
# area of each shape per squared radius, as `world._alpha` draws them: pi r^2, (1.7 r)^2, an equilateral triangle
# of inradius 0.6 r
_SHAPE_AREA = {"circle": np.pi, "square": 1.7 ** 2, "triangle": 3 * np.sqrt(3) * 0.6 ** 2}


def subjects(mask: np.ndarray, min_area: int = MIN_SUBJECT_AREA) -> tuple[np.ndarray, list[int]]:
    """Connected foreground components of one frame's mask (8-connected) at least `min_area` pixels large:
    -> (label image, labels sorted by area, largest first)."""
    from scipy import ndimage
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return lab, []
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = [int(i) + 1 for i in np.argsort(-areas) if areas[i] >= min_area]
    return lab, keep


def subject_count(mask: np.ndarray, min_area: int = MIN_SUBJECT_AREA) -> int:
    """How many separate subjects one frame shows (foreground components above `min_area`)."""
    return len(subjects(mask, min_area)[1])


def shape_scores(blob: np.ndarray) -> dict[str, float]:
    """IoU of one blob (bool (H, W)) with each shape the world draws, rendered at the blob's centroid with the
    blob's area. The world's shapes are axis-aligned and upright, their centre is their centroid, so a drawn shape
    scores ~1 on its own template; a shapeless blob scores low on all three."""
    from .world import _alpha
    ys, xs = np.nonzero(blob)
    area = float(len(xs))
    if area == 0:
        return {s: 0.0 for s in _SHAPE_AREA}
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    py, px = np.mgrid[0:blob.shape[0], 0:blob.shape[1]].astype(np.float32) + 0.5
    out = {}
    for shape, k in _SHAPE_AREA.items():
        r = float(np.sqrt(area / k))
        t = _alpha(shape, px, py, cx, cy, r) >= 0.5
        out[shape] = float((t & blob).sum() / max(1, (t | blob).sum()))
    return out


SHAPE_MIN_IOU = 0.8        # a drawn shape scores >= 0.90 on its own template (toyworld.scene_check); below: "blob"
SHAPES_READ = ("circle", "square", "triangle", "blob")


def classify_shape(blob: np.ndarray, min_area: int = MIN_SUBJECT_AREA) -> str | None:
    """circle / square / triangle: the template (`shape_scores`) the blob overlaps best, or "blob" when it
    overlaps none well enough to be called a shape; None for a blob smaller than `min_area`."""
    if blob.sum() < min_area:
        return None
    scores = shape_scores(blob)
    best = max(scores, key=scores.get)
    return best if scores[best] >= SHAPE_MIN_IOU else "blob"


def color_subject_count(color_index: np.ndarray, min_area: int = MIN_SUBJECT_AREA) -> int:
    """Subjects counted per colour: same-colour connected regions above `min_area` (the world gives the shapes
    of one scene distinct colours, so two touching shapes are still two)."""
    return sum(subject_count(color_index == k, min_area) for k in np.unique(color_index[color_index >= 0]))


def frame_scene(frame: np.ndarray, min_area: int = MIN_SUBJECT_AREA) -> dict:
    """One frame's subjects: `count` (same-colour regions, `color_subject_count`), `blobs` (foreground regions
    of any colour), the largest blob's shape (`classify_shape`), its best template IoU and its centroid (x, y)
    in px."""
    mask, idx = foreground(frame[None])
    lab, keep = subjects(mask[0], min_area)
    if not keep:
        return {"count": 0, "blobs": 0, "shape": None, "iou": 0.0, "centroid": (np.nan, np.nan)}
    blob = lab == keep[0]
    scores = shape_scores(blob)
    shape = max(scores, key=scores.get)
    iou = scores[shape]
    if iou < SHAPE_MIN_IOU:
        shape = "blob"
    ys, xs = np.nonzero(blob)
    return {"count": color_subject_count(idx[0], min_area), "blobs": len(keep), "shape": shape,
            "iou": iou, "centroid": (xs.mean() + 0.5, ys.mean() + 0.5)}


# --- background -----------------------------------------------------------------------------------------------

_BG_PROTOTYPES: tuple[np.ndarray, np.ndarray] | None = None


def _background_prototypes() -> tuple[np.ndarray, np.ndarray]:
    """Every pixel value the world's backgrounds take, per colour name: (values (N, 3) float, colour index (N,))."""
    global _BG_PROTOTYPES
    if _BG_PROTOTYPES is None:
        from .world import BACKGROUND_COLORS, BACKGROUNDS, Background, _background
        vals, idx = [], []
        for k, color in enumerate(BACKGROUND_COLORS):
            px = np.concatenate([_background(Background(kind, color), 64).reshape(-1, 3) for kind in BACKGROUNDS])
            u = np.unique(np.round(px), axis=0)
            vals.append(u)
            idx.append(np.full(len(u), k))
        _BG_PROTOTYPES = (np.concatenate(vals).astype(np.float32), np.concatenate(idx))
    return _BG_PROTOTYPES


def background_image(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The background behind moving subjects: per pixel, the median over frames where that pixel is not
    foreground or next to it (a subject's anti-aliased rim is neither). -> (image float (H, W, 3), valid bool
    (H, W): False where a subject covered it in every frame)."""
    from scipy import ndimage
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    fg, _ = foreground(frames)
    fg = ndimage.binary_dilation(fg, structure=np.ones((1, 3, 3), bool), iterations=2)
    x = frames.astype(np.float32)
    x[fg] = np.nan
    valid = ~fg.all(0)
    img = np.zeros(frames.shape[1:], np.float32)
    if valid.any():
        img[valid] = np.nanmedian(x[:, valid], axis=0)
    return img, valid


def background_color(frames: np.ndarray) -> str | None:
    """The background's colour name: the majority over non-foreground pixels of the nearest value any of the
    world's backgrounds of that colour takes (so a dark stripe of blue reads as blue, not black)."""
    from .world import BACKGROUND_COLORS
    img, valid = background_image(frames)
    if valid.sum() < 16:
        return None
    px = img[valid]
    vals, idx = _background_prototypes()
    d = ((px[:, None, :] - vals[None]) ** 2).sum(-1)
    votes = np.bincount(idx[d.argmin(1)], minlength=len(BACKGROUND_COLORS))
    return list(BACKGROUND_COLORS)[int(votes.argmax())]


# Thresholds on the background's luma (0-255) and template fits, chosen on rendered frames (toyworld.scene_check) and
# on the VAE's round trips of them (encoded chunk by chunk, stream-decoded: what a perfect DiT would show). Through
# the VAE a plain background keeps a faint texture no template explains: luma spread 1.9-5.9 (median 2.8, 95th
# percentile 4.5), best fit r2 <= 0.2 in 95% of chunks (144 chunks of 18 clips); the faintest drawn pattern, a dark
# gradient, spreads >= 5.3 rendered and >= 4.7 after the VAE, and every drawn pattern fits its template with
# r2 >= 0.57 after the VAE (5th percentile). Until session 20 every unexplained background at or above 2.5 read
# "other", so the VAE alone read a plain background right in 36% of chunks.
PATTERN_FLAT_STD = 2.5     # robust spread below this: solid, whatever the fits say (nothing there to fit)
PATTERN_MIN_R2 = 0.3       # a background a template explains this well is that pattern
PATTERN_TEXTURE_STD = 5.0  # unexplained and fainter than this: solid under the VAE's texture; above it, "other"
PATTERNS_READ = ("solid", "gradient", "stripes", "checker", "other")

_PATTERN_TEMPLATES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _pattern_templates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The world's own stripes (4 angles) and checkers at every period it draws (`PATTERN_PERIOD_RANGE` of the
    frame, step 0.005), as 0/1 maps: -> (templates (N, size, size), kind index (N,): 0 stripes, 1 checker)."""
    if size not in _PATTERN_TEMPLATES:
        from .world import PATTERN_PERIOD_RANGE, STRIPE_ANGLES, Background, _background
        maps, kinds = [], []
        lo, hi = PATTERN_PERIOD_RANGE
        for period in np.arange(lo, hi + 1e-4, 0.005):
            for kind, angles in (("stripes", STRIPE_ANGLES), ("checker", (0.0,))):
                for ang in angles:
                    lum = _background(Background(kind, "gray", float(ang), float(period)), size).mean(-1)
                    maps.append(lum > lum.mean())
                    kinds.append(0 if kind == "stripes" else 1)
        _PATTERN_TEMPLATES[size] = (np.stack(maps).astype(np.float32), np.array(kinds))
    return _PATTERN_TEMPLATES[size]


def pattern_features(img: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """How well each of the world's patterns explains the background's luma: a robust spread (interquartile, so a
    stray rim pixel is not a pattern), and the share of variance explained by a plane (gradient), by the best of
    the world's stripe maps and by the best of its checker maps (each fitted as a + b * map)."""
    luma = img @ np.array([0.299, 0.587, 0.114], np.float32)
    h, w = valid.shape
    L = luma[valid]
    q1, q3 = np.percentile(L, [25, 75]) if L.size else (0.0, 0.0)
    feats = {"std": float((q3 - q1) / 1.349), "gradient_r2": 0.0, "stripes_r2": 0.0, "checker_r2": 0.0}
    var = float(L.var()) if L.size else 0.0
    if var < 1e-6 or L.size < 16:
        return feats
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    A = np.stack([np.ones_like(L), xx[valid], yy[valid]], 1)
    coef, *_ = np.linalg.lstsq(A, L, rcond=None)
    feats["gradient_r2"] = float(1 - ((L - A @ coef) ** 2).mean() / var)
    if h == w:
        maps, kinds = _pattern_templates(h)
        T = maps[:, valid]                                                  # (N, P)
        Tc = T - T.mean(1, keepdims=True)
        Lc = L - L.mean()
        r2 = (Tc @ Lc) ** 2 / np.maximum((Tc ** 2).sum(1) * (Lc ** 2).sum(), 1e-9)   # squared correlation
        feats["stripes_r2"] = float(r2[kinds == 0].max())
        feats["checker_r2"] = float(r2[kinds == 1].max())
    return feats


def classify_pattern(feats: dict[str, float]) -> str:
    """solid / gradient / stripes / checker from `pattern_features`, or "other" when no template explains a
    background with more texture than the VAE leaves on a plain one (noise, blotches: not a pattern of the world)."""
    if feats["std"] < PATTERN_FLAT_STD:
        return "solid"
    fits = {k: feats[f"{k}_r2"] for k in ("gradient", "stripes", "checker")}
    best = max(fits, key=fits.get)
    if fits[best] >= PATTERN_MIN_R2:
        return best
    return "solid" if feats["std"] < PATTERN_TEXTURE_STD else "other"


def background_pattern(frames: np.ndarray) -> str | None:
    """The background's pattern (solid / gradient / stripes / checker) from its non-foreground pixels."""
    img, valid = background_image(frames)
    if valid.sum() < 16:
        return None
    return classify_pattern(pattern_features(img, valid))


# --- motion ---------------------------------------------------------------------------------------------------

def motion_features(centroids: np.ndarray, size: int = 64, fps: int = FPS) -> dict[str, float] | None:
    """Features of a centroid track (N, 2) px that tell the world's motions apart (None when fewer than 8 frames
    show the subject). Orbit keeps a constant distance from the frame's centre; bounce moves at a constant speed
    in straight lines; zigzag reverses its vertical direction every half second; drift is slow and smooth. The
    track is smoothed over 3 frames first: a decoded blob's centroid jitters by a pixel or so."""
    c = np.asarray(centroids, np.float64)
    ok = np.isfinite(c).all(1)
    if ok.sum() < 8:
        return None
    t = np.nonzero(ok)[0]
    c = c[ok]
    c = np.stack([np.convolve(c[:, k], np.ones(3) / 3, "valid") for k in range(2)], 1)
    t = t[1:-1]
    v = np.diff(c, axis=0) / np.diff(t)[:, None] * fps                      # px/s between visible frames
    speed = np.linalg.norm(v, axis=1)
    r = np.linalg.norm(c - size / 2, axis=1)
    vy = v[:, 1]
    vy = vy[np.abs(vy) > 2.0]                                                 # ignore jitter around standstill
    flips = np.count_nonzero(np.diff(np.sign(vy)) != 0) if vy.size > 1 else 0
    span_s = (t[-1] - t[0]) / fps
    return {
        "speed": float(np.median(speed)),
        "speed_cv": float(speed.std() / max(speed.mean(), 1e-6)),
        "radius": float(r.mean()),
        "radius_cv": float(r.std() / max(r.mean(), 1e-6)),
        "vy_flips_per_s": float(flips / max(span_s, 1e-6)),
    }


def classify_motion(feats: dict[str, float] | None) -> str | None:
    """bounce / orbit / drift / zigzag from `motion_features` (thresholds chosen on rendered tracks,
    toyworld.scene_check); None when the track is too short."""
    if feats is None:
        return None
    if feats["radius_cv"] < 0.1 and feats["radius"] > 4.0 and feats["speed_cv"] < 0.15:
        return "orbit"            # a circle about the frame's centre at a constant speed
    if feats["vy_flips_per_s"] >= 1.5:
        return "zigzag"           # two vertical reversals a second
    if feats["speed"] < 17.5:
        return "drift"            # bounce moves at >= 0.25 frame/s = 16 px/s, drift's median is ~12
    return "bounce"


def scene_report(frames: np.ndarray, min_area: int = MIN_SUBJECT_AREA) -> dict:
    """What one clip (typically one chunk) shows: per-frame subject counts, shapes and centroids, and the clip's
    share of one-subject frames, its majority shape, background colour and pattern, and motion word."""
    rows = [frame_scene(f, min_area) for f in frames]
    counts = np.array([r["count"] for r in rows])
    blobs = np.array([r["blobs"] for r in rows])
    cents = np.array([r["centroid"] for r in rows], np.float64)
    return {
        "counts": counts.tolist(),
        "one_subject": float((counts == 1).mean()),
        "one_blob": float((blobs == 1).mean()),
        "shapes": [r["shape"] for r in rows],
        "shape": _mode([r["shape"] for r in rows]),
        "iou": float(np.mean([r["iou"] for r in rows])),
        "bg_color": background_color(frames),
        "pattern": background_pattern(frames),
        "centroids": cents,
        "motion": classify_motion(motion_features(cents)),
    }


def prompt_scene(prompt: str) -> dict[str, str | None]:
    """What a prompt asks for, read with the caption grammar's vocabulary (canonical words and paraphrases):
    subject colour, shape and motion, background colour and pattern; None for what it does not say."""
    from .world import BACKGROUND_WORDS, BG_COLOR_SYNONYMS, MOTION_WORDS, SHAPE_WORDS
    text = " " + " ".join(re.findall(r"[a-z\-]+", prompt.lower())) + " "

    def find(vocab: dict[str, list[str]]) -> str | None:
        hits = [(text.find(f" {w} "), len(w), key) for key, ws in vocab.items() for w in ws if f" {w} " in text]
        return min(hits, key=lambda h: (h[0], -h[1]))[2] if hits else None

    bg_color = None
    m = re.search(r"((?:[a-z]+ )?[a-z]+) (?:background|backdrop)", text)
    if m:
        words = m.group(1).split()
        lookup = {w: c for c, ws in BG_COLOR_SYNONYMS.items() for w in ws}
        bg_color = lookup.get(" ".join(words)) or lookup.get(words[-1])
    return {"color": prompt_color(prompt), "shape": find(SHAPE_WORDS), "motion": find(MOTION_WORDS),
            "bg_color": bg_color, "pattern": find(BACKGROUND_WORDS)}
