"""The toy world: seeded, unbounded procedural scenes of moving shapes, with captions from a small grammar.

A `Scene` is one to three shapes (circle, square, triangle) in eight bright named colours, each with a motion
(bounce, orbit, drift, zigzag), over a background (solid, gradient, stripes, checker) in one of eight muted named
colours. Shapes are bright and saturated, backgrounds are dark or desaturated, so the metrics
(`toyworld.metrics`) can tell foreground from background by saturation and value alone.

Motion is a closed-form function of the frame index, so a scene renders any frame range, forever, with no state:

    scene = sample_scene(np.random.default_rng(0))
    frames = render(scene, start=0, num_frames=81, size=64)      # uint8 (81, 64, 64, 3), 16 FPS
    caption(scene)                                               # "a red circle bouncing on a striped blue background"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

FPS = 16

# Bright, saturated foreground colours (hue in degrees is what the metrics classify by).
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 30),
    "green": (40, 210, 50),
    "cyan": (30, 220, 230),
    "blue": (40, 80, 245),
    "purple": (160, 50, 235),
    "pink": (245, 60, 190),
}
COLOR_HUES: dict[str, float] = {
    "red": 0.0, "orange": 32.0, "yellow": 56.0, "green": 124.0,
    "cyan": 183.0, "blue": 226.0, "purple": 276.0, "pink": 318.0,
}

# Muted background colours: saturation < 0.5 or value < 0.5, so they never count as foreground.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "blue": (35, 45, 95),
    "green": (35, 80, 45),
    "gray": (110, 110, 110),
    "brown": (95, 65, 40),
    "purple": (70, 45, 90),
    "black": (15, 15, 18),
    "white": (215, 215, 210),
    "teal": (30, 80, 85),
}

SHAPES = ("circle", "square", "triangle")

# Sizes and periods, as fractions of the frame. A shape's radius from 0.18 (11.5 px at 64x64) keeps its corners
# through the 8x VAE (toyworld/eval/RETRAIN_PLAN.md: 60% of small squares survive at 0.11, all from 0.22) and makes
# the subject ~2 DiT tokens wide. Stripe and checker periods from 0.3 (19 px) make each band at least ~0.6 of a
# token, so the DiT can place them; the pattern readers (`toyworld.metrics`) fit templates over the same range.
SHAPE_SIZE_RANGE = (0.18, 0.25)
PATTERN_PERIOD_RANGE = (0.3, 0.5)
STRIPE_ANGLES = (0.0, math.pi / 2, math.pi / 4, -math.pi / 4)
MOTIONS = ("bounce", "orbit", "drift", "zigzag")
BACKGROUNDS = ("solid", "gradient", "stripes", "checker")

# Caption vocabulary. The first entry of each list is the canonical word; the others are training-time
# paraphrases (caption augmentation) so unseen wordings land near the trained ones in the text encoder's space.
SHAPE_WORDS = {
    "circle": ["circle", "ball", "disk", "dot", "round blob"],
    "square": ["square", "box", "block", "cube", "tile"],
    "triangle": ["triangle", "wedge", "pyramid", "arrowhead", "three-sided shape"],
}
MOTION_WORDS = {  # (participle, verb phrase)
    "bounce": ["bouncing", "bouncing around", "bouncing off the walls", "ricocheting", "jumping around"],
    "orbit": ["orbiting", "circling", "going round in circles", "spinning around the center", "revolving"],
    "drift": ["drifting", "floating", "wandering slowly", "gliding", "meandering"],
    "zigzag": ["zigzagging", "moving in a zigzag", "darting back and forth", "weaving", "zig-zagging"],
}
BACKGROUND_WORDS = {  # adjective before the colour, or a noun phrase after it
    "solid": ["plain", "solid", "flat", "uniform"],
    "gradient": ["gradient", "fading", "shaded", "graded"],
    "stripes": ["striped", "stripy", "banded", "lined"],
    "checker": ["checkered", "checkerboard", "chequered", "tiled"],
}
COLOR_SYNONYMS = {  # extra words for augmentation (evaluation also uses held-out ones like "crimson")
    "red": ["red", "bright red"],
    "orange": ["orange", "bright orange"],
    "yellow": ["yellow", "golden yellow"],
    "green": ["green", "bright green", "lime"],
    "cyan": ["cyan", "aqua", "turquoise"],
    "blue": ["blue", "bright blue"],
    "purple": ["purple", "violet"],
    "pink": ["pink", "magenta"],
}
BG_COLOR_SYNONYMS = {
    "blue": ["blue", "navy", "dark blue"],
    "green": ["green", "dark green", "forest green"],
    "gray": ["gray", "grey"],
    "brown": ["brown", "dark brown"],
    "purple": ["purple", "dark purple", "plum"],
    "black": ["black", "dark"],
    "white": ["white", "light"],
    "teal": ["teal", "dark teal"],
}


@dataclass(frozen=True)
class WorldStyle:
    """What a caption leaves to chance. `varied` (the toy model's world until session 16) draws pattern
    periods, stripe angles and shape sizes at random and starts clips anywhere on a scene's timeline. `placed`
    (the shipped model's, `SHIPPED_WORLD`) fixes the period (0.4), the angle (vertical stripes) and the size
    (0.22), and starts one-subject scenes at t=0 where their motion starts (`placed_start`): the prompt then
    decides the first chunk up to the motion's direction, which a DiT with a spatial embedding can draw in place
    from pure noise (eval/RETRAIN_PLAN.md, session 15)."""
    periods: tuple[float, float] = PATTERN_PERIOD_RANGE
    angles: tuple[float, ...] = STRIPE_ANGLES
    sizes: tuple[float, float] = SHAPE_SIZE_RANGE
    placed_start: bool = False


WORLD_STYLES = {"varied": WorldStyle(), "placed": WorldStyle((0.4, 0.4), (0.0,), (0.22, 0.22), True)}
VARIED = WORLD_STYLES["varied"]
SHIPPED_WORLD = "placed"    # the world the shipped toy model learned (since session 16; `varied` before)

# Where a `placed` subject starts, by motion: bounce and zigzag at the centre, orbit at the top of its circle,
# drift below the centre (its Lissajous at phase 0).
_PLACED_MOTION = {"bounce": {"x0": 0.5, "y0": 0.5}, "zigzag": {"x0": 0.5, "y0": 0.5, "phase": 0.5},
                  "orbit": {"radius": 0.22, "phase": -math.pi / 2}, "drift": {"phase": 0.0}}


@dataclass(frozen=True)
class Background:
    kind: str                     # one of BACKGROUNDS
    color: str                    # key of BACKGROUND_COLORS
    angle: float = 0.0            # stripes/gradient direction (radians)
    period: float = 0.25          # stripe/checker period as a fraction of the frame size


@dataclass(frozen=True)
class ShapeSpec:
    shape: str                    # one of SHAPES
    color: str                    # key of SHAPE_COLORS
    motion: str                   # one of MOTIONS
    size: float                   # radius as a fraction of the frame size
    # motion parameters (fractions of the frame size, per second; phases in radians)
    x0: float = 0.5
    y0: float = 0.5
    vx: float = 0.3
    vy: float = 0.2
    radius: float = 0.25          # orbit radius
    omega: float = 1.5            # orbit angular speed (rad/s), sign = direction
    phase: float = 0.0


@dataclass(frozen=True)
class Scene:
    background: Background
    shapes: tuple[ShapeSpec, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------------------------- sampling

def sample_shape(rng: np.random.Generator, *, color: str | None = None, shape: str | None = None,
                 motion: str | None = None, size: float | None = None, style: WorldStyle = VARIED) -> ShapeSpec:
    speed = rng.uniform(0.25, 0.5)
    ang = rng.uniform(0, 2 * math.pi)
    return ShapeSpec(
        shape=shape or str(rng.choice(SHAPES)),
        color=color or str(rng.choice(list(SHAPE_COLORS))),
        motion=motion or str(rng.choice(MOTIONS)),
        size=size if size is not None else float(rng.uniform(*style.sizes)),
        x0=float(rng.uniform(0.25, 0.75)), y0=float(rng.uniform(0.25, 0.75)),
        vx=float(speed * math.cos(ang)), vy=float(speed * math.sin(ang)),
        radius=float(rng.uniform(0.15, 0.28)),
        omega=float(rng.choice([-1, 1]) * rng.uniform(1.2, 2.4)),
        phase=float(rng.uniform(0, 2 * math.pi)),
    )


def sample_background(rng: np.random.Generator, *, kind: str | None = None, color: str | None = None,
                      style: WorldStyle = VARIED) -> Background:
    return Background(
        kind=kind or str(rng.choice(BACKGROUNDS)),
        color=color or str(rng.choice(list(BACKGROUND_COLORS))),
        angle=float(rng.choice(list(style.angles))),
        period=float(rng.uniform(*style.periods)),
    )


def placed(shape: ShapeSpec) -> ShapeSpec:
    """The shape with its motion started where a `placed` world starts it (`_PLACED_MOTION`)."""
    return replace(shape, **_PLACED_MOTION[shape.motion])


def sample_scene(rng: np.random.Generator, max_shapes: int = 3, single_shape_prob: float = 0.9,
                 style: WorldStyle = VARIED) -> Scene:
    """A random scene. Shapes in one scene have distinct colours (so each caption names each colour once)."""
    n = 1 if rng.random() < single_shape_prob else int(rng.integers(2, max_shapes + 1))
    colors = rng.choice(list(SHAPE_COLORS), size=n, replace=False)
    shapes = tuple(sample_shape(rng, color=str(c), style=style) for c in colors)
    if style.placed_start and n == 1:
        shapes = (placed(shapes[0]),)
    return Scene(background=sample_background(rng, style=style), shapes=shapes)


# ---------------------------------------------------------------------------------------------- captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator | None = None, colors: bool = True,
            background_color: bool = True) -> str:
    """Caption from the grammar. With `rng`, a random paraphrase (synonyms and templates) for augmentation;
    without, the canonical form: "a red circle bouncing on a striped blue background". `colors=False` leaves the
    subjects' colours out ("a circle bouncing on ..."): the colour must then come from what the stream has seen;
    `background_color=False` the background's too ("... on a striped background", the memory test's prompt)."""

    def pick(options):
        return options[0] if rng is None else str(options[int(rng.integers(len(options)))])

    parts = []
    for s in scene.shapes:
        color = pick(COLOR_SYNONYMS[s.color]) if rng is not None else s.color
        noun = pick(SHAPE_WORDS[s.shape])
        verb = pick(MOTION_WORDS[s.motion])
        named = f"{color} {noun}" if colors else noun
        if rng is not None and rng.random() < 0.3:
            parts.append(f"{_article(verb)} {verb} {named}")
        else:
            parts.append(f"{_article(named)} {named} {verb}")
    subject = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = scene.background
    bcolor = pick(BG_COLOR_SYNONYMS[bg.color]) if rng is not None else bg.color
    adj = pick(BACKGROUND_WORDS[bg.kind])
    look = f"{adj} {bcolor}" if background_color else adj
    if rng is None:
        return f"{subject} on {_article(adj)} {look} background"
    template = int(rng.integers(4))
    if template == 0:
        return f"{subject} on {_article(adj)} {look} background"
    if template == 1:
        return f"{subject} over {_article(adj)} {look} backdrop"
    if template == 2:
        return f"{look} background with {subject}"
    return f"{subject}, {look} background"


# --------------------------------------------------------------------------------------------- rendering

def _tri(x: np.ndarray) -> np.ndarray:
    """Triangle wave in [0, 1] with period 2 (reflection off walls at 0 and 1)."""
    x = np.mod(x, 2.0)
    return np.where(x < 1.0, x, 2.0 - x)


def positions(s: ShapeSpec, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) as fractions of the frame at times t (seconds). Shapes stay fully inside the frame."""
    lo, hi = s.size, 1.0 - s.size
    span = hi - lo
    if s.motion == "bounce":
        x = lo + span * _tri((s.x0 - lo) / span + s.vx * t / span)
        y = lo + span * _tri((s.y0 - lo) / span + s.vy * t / span)
    elif s.motion == "orbit":
        r = min(s.radius, 0.5 - s.size)
        x = 0.5 + r * np.cos(s.phase + s.omega * t)
        y = 0.5 + r * np.sin(s.phase + s.omega * t)
    elif s.motion == "drift":  # slow Lissajous wander
        a = 0.5 - s.size
        x = 0.5 + a * 0.8 * np.sin(s.phase + 0.45 * abs(s.omega) * t)
        y = 0.5 + a * 0.8 * np.sin(1.7 * s.phase + 0.31 * abs(s.omega) * t + 1.0)
    elif s.motion == "zigzag":
        speed = math.copysign(max(abs(s.vx), 0.25), s.vx)
        x = lo + span * _tri((s.x0 - lo) / span + speed * t / span)
        amp = min(0.12, span / 2)
        yc = float(np.clip(s.y0, lo + amp, hi - amp))
        y = yc + amp * (2.0 * _tri(t * 2.0 + s.phase) - 1.0)
    else:
        raise ValueError(f"unknown motion {s.motion!r}")
    return np.broadcast_to(x, t.shape).astype(np.float32), np.broadcast_to(y, t.shape).astype(np.float32)


def _background(bg: Background, size: int) -> np.ndarray:
    base = np.array(BACKGROUND_COLORS[bg.color], np.float32)
    dark = base * 0.55
    light = np.minimum(base * 1.15 + 4, 255)   # stays under the metrics' foreground value threshold
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    u = xx * math.cos(bg.angle) + yy * math.sin(bg.angle)
    if bg.kind == "solid":
        w = np.zeros_like(u)
    elif bg.kind == "gradient":
        w = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif bg.kind == "stripes":
        w = (np.mod(u / bg.period, 1.0) < 0.5).astype(np.float32)
    elif bg.kind == "checker":
        w = ((np.floor(xx / (bg.period / 2)) + np.floor(yy / (bg.period / 2))) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown background {bg.kind!r}")
    lo, hi = (dark, base) if bg.color != "black" else (base, base + 28)
    if bg.kind in ("solid",):
        return np.broadcast_to(base, (size, size, 3)).copy()
    if bg.kind == "gradient":
        lo, hi = dark, light if bg.color != "white" else base
        if bg.color == "white":
            lo = base * 0.7
    return lo[None, None] * (1 - w[..., None]) + hi[None, None] * w[..., None]


def _alpha(shape: str, px: np.ndarray, py: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage from a (pixel-unit) signed distance."""
    dx, dy = px - cx, py - cy
    if shape == "circle":
        sd = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        h = r * 0.85
        sd = np.maximum(np.abs(dx), np.abs(dy)) - h
    elif shape == "triangle":  # upward equilateral triangle inscribed in radius r*1.15
        R = r * 1.2
        sd = None
        for k in range(3):
            a = -math.pi / 2 + k * 2 * math.pi / 3 + math.pi  # outward normals of the three edges
            nx, ny = math.cos(a), math.sin(a)
            d = dx * nx + dy * ny - R * 0.5
            sd = d if sd is None else np.maximum(sd, d)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - sd, 0.0, 1.0)


def render(scene: Scene, start: int = 0, num_frames: int = 81, size: int = 64) -> np.ndarray:
    """Frames start .. start+num_frames-1 at 16 FPS, uint8 (F, size, size, 3)."""
    t = (start + np.arange(num_frames, dtype=np.float64)) / FPS
    bg = _background(scene.background, size)
    out = np.repeat(bg[None], num_frames, axis=0).astype(np.float32)
    py, px = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for s in scene.shapes:
        xs, ys = positions(s, t)
        col = np.array(SHAPE_COLORS[s.color], np.float32)
        r = s.size * size
        for i in range(num_frames):
            a = _alpha(s.shape, px, py, float(xs[i]) * size, float(ys[i]) * size, r)[..., None]
            out[i] = out[i] * (1 - a) + col * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


CLIP_KINDS = ("normal", "still", "return")


@dataclass(frozen=True)
class ClipMix:
    """The kinds of training clips (`World.sample_training`), besides the normal ones.

    - `still`: the first stream chunk is a still of the first frame, then the scene moves on: a stream started
      from a picture (`gen.open(start=...)` commits the picture as a still first chunk); `still_empty_prompt` of
      them are captioned with the empty prompt, so the model learns to continue a picture it is told nothing about.
    - `return`: one subject, first 0-2 chunks of empty background, then in view for 1-3 chunks, gone for 1-3, and
      back for the rest, captioned without its colour: the colour is only in what was seen before the gap, the
      situation of the memory test (`toyworld.memory`), where the packed cache's mid partition is what holds it.
    """
    still_prob: float = 0.1
    still_empty_prompt: float = 0.5
    return_prob: float = 0.1


class World:
    """An endless seeded stream of (frames, caption, scene) clips: `World(seed).sample(num_frames, size)`."""

    def __init__(self, seed: int = 0, max_shapes: int = 3, single_shape_prob: float = 0.9,
                 style: WorldStyle = VARIED):
        self.rng = np.random.default_rng(seed)
        self.max_shapes = max_shapes
        self.single_shape_prob = single_shape_prob
        self.style = style

    def _start(self, scene: Scene) -> int:
        """Where on the scene's unbounded timeline a clip starts: anywhere, or at 0 for a placed one-subject scene."""
        start = int(self.rng.integers(0, 100_000))
        return 0 if self.style.placed_start and len(scene.shapes) == 1 else start

    def sample(self, num_frames: int = 81, size: int = 64, augment_caption: bool = True):
        scene = sample_scene(self.rng, self.max_shapes, self.single_shape_prob, self.style)
        start = self._start(scene)
        frames = render(scene, start=start, num_frames=num_frames, size=size)
        text = caption(scene, self.rng if augment_caption else None)
        return frames, text, scene

    def sample_training(self, chunk_bounds: list[tuple[int, int]], size: int = 64,
                        mix: ClipMix = ClipMix()) -> tuple[np.ndarray, Scene, str]:
        """One training clip whose stream chunks span the pixel frames `chunk_bounds` ([start, end) each, from 0):
        (frames, scene, kind), kind one of CLIP_KINDS (see `ClipMix`)."""
        n_frames = chunk_bounds[-1][1]
        u = self.rng.random()
        if u < mix.still_prob:
            frames, _, scene = self.sample(n_frames, size, augment_caption=False)
            head = chunk_bounds[0][1]
            still = np.concatenate([np.repeat(frames[:1], head, axis=0), frames[1:n_frames - head + 1]])
            return still, scene, "still"
        if u < mix.still_prob + mix.return_prob:
            scene = sample_scene(self.rng, max_shapes=1, single_shape_prob=1.0, style=self.style)
            start = self._start(scene)
            n = len(chunk_bounds)
            lead = int(self.rng.integers(0, 3))
            seen = int(self.rng.integers(1, 4))
            gap = int(self.rng.integers(1, 4))
            seen, gap = fit_return(n, lead, seen, gap)
            return leave_and_return(scene, start, chunk_bounds, size, lead, seen, gap), scene, "return"
        frames, _, scene = self.sample(n_frames, size, augment_caption=False)
        return frames, scene, "normal"


def fit_return(n: int, lead: int, seen: int, gap: int) -> tuple[int, int]:
    """(seen, gap) shortened so that a leave-and-return clip of n chunks shows the subject at least once before the
    gap and comes back before it ends."""
    seen = max(1, min(seen, n - 2 - lead))
    return seen, max(1, min(gap, n - 1 - lead - seen))


def visible_chunks(n: int, lead: int, seen: int, gap: int) -> list[bool]:
    """Which of n stream chunks show the subject of a leave-and-return clip: none for `lead`, then `seen` with it,
    `gap` without, and with it again to the end."""
    return [not (i < lead or lead + seen <= i < lead + seen + gap) for i in range(n)]


def leave_and_return(scene: Scene, start: int, chunk_bounds: list[tuple[int, int]], size: int, lead: int, seen: int,
                     gap: int) -> np.ndarray:
    """The frames of a leave-and-return clip (`visible_chunks`): the scene's own timeline, its subject cut out of
    the chunks where it is away, so when it returns it is where its motion has taken it meanwhile."""
    n_frames = chunk_bounds[-1][1]
    shown = render(scene, start, n_frames, size)
    empty = render(replace(scene, shapes=()), start, n_frames, size)
    visible = visible_chunks(len(chunk_bounds), lead, seen, gap)
    return np.concatenate([(shown if v else empty)[a:b] for (a, b), v in zip(chunk_bounds, visible)])


def single_shape_scene(color: str, shape: str = "circle", motion: str = "bounce", background: str = "stripes",
                       bg_color: str = "blue", seed: int = 0, style: WorldStyle = VARIED) -> Scene:
    """A one-shape scene with chosen attributes (evaluation and tests), drawn as `style` draws it."""
    rng = np.random.default_rng(seed)
    back = sample_background(rng, kind=background, color=bg_color, style=style)   # first: the draws of old seeds
    subject = sample_shape(rng, color=color, shape=shape, motion=motion, style=style)
    return Scene(background=back, shapes=(placed(subject) if style.placed_start else subject,))


__all__ = [
    "FPS", "SHAPE_COLORS", "COLOR_HUES", "BACKGROUND_COLORS", "SHAPES", "MOTIONS", "BACKGROUNDS",
    "SHAPE_SIZE_RANGE", "PATTERN_PERIOD_RANGE", "STRIPE_ANGLES", "CLIP_KINDS", "ClipMix", "WorldStyle",
    "WORLD_STYLES", "VARIED", "SHIPPED_WORLD", "placed",
    "Background", "ShapeSpec", "Scene", "World", "sample_scene", "sample_shape", "sample_background",
    "caption", "render", "positions", "single_shape_scene", "replace", "fit_return", "visible_chunks",
    "leave_and_return",
]
