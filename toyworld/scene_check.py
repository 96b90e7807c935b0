"""How right the scene readers of `toyworld.metrics` are on rendered ground truth, where the answer is known.

    python -m toyworld.scene_check            # prints the tables; `toyworld.evaluate` puts them in RESULTS.md

Every shape at the world's smallest, middle and largest size under every motion and background; every background
colour under every pattern; one- to three-subject scenes for the subject count; and centroid tracks of every
motion over windows of 1, 2 and 4 chunks. A reader that is wrong on renders cannot be trusted on generated video,
so the evaluation reports these numbers next to the model's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from . import metrics as M
from .world import (BACKGROUND_COLORS, BACKGROUNDS, MOTIONS, SHAPES, Scene, render, sample_background,
                    sample_scene, sample_shape)

SIZES = (0.11, 0.14, 0.17)         # the range `world.sample_shape` draws from, ends and middle
CHUNK = 12                         # frames per stream chunk after the first
Through = Callable[[np.ndarray], np.ndarray] | None   # what rendered frames pass through before they are read


def _through(through: Through, frames: np.ndarray) -> np.ndarray:
    return frames if through is None else through(frames)


def vae_roundtrip(vae) -> Callable[[np.ndarray], np.ndarray]:
    """Frames -> encode + decode with `vae` (a `packcache.vae.VideoVAE`): does the VAE alone keep what the
    readers read? Clips are padded at the front to the 1 + 4k frames the causal VAE takes."""
    import torch

    from packcache.vae import frames_to_uint8

    from .common import to_tensor

    def run(frames: np.ndarray) -> np.ndarray:
        pad = (-(len(frames) - 1)) % 4
        x = np.concatenate([np.repeat(frames[:1], pad, 0), frames]) if pad else frames
        with torch.no_grad():
            out = frames_to_uint8(vae.decode(vae.encode(to_tensor(x)[None])))[0]
        return out[pad:]
    return run


def confusion(pairs: list[tuple[str, str | None]], labels: tuple[str, ...],
              extra: tuple[str, ...] = ()) -> dict[str, dict[str, int]]:
    """{truth: {read: count}} with `extra` columns (answers outside the labels) and a "none" column for frames
    the reader gave no answer on."""
    out = {t: {r: 0 for r in (*labels, *extra, "none")} for t in labels}
    for truth, read in pairs:
        out[truth][read if read is not None else "none"] += 1
    return out


def accuracy(pairs) -> float:
    return sum(t == r for t, r in pairs) / max(1, len(pairs))


def check_shapes(frames_per_clip: int = CHUNK, seed: int = 0, through: Through = None,
                 sizes: tuple[float, ...] = SIZES) -> dict:
    """Every shape x size x motion x background kind, one random colour and placement each."""
    rng = np.random.default_rng(seed)
    pairs, old = [], []
    for shape in SHAPES:
        for size in sizes:
            for motion in MOTIONS:
                for kind in BACKGROUNDS:
                    s = sample_shape(rng, shape=shape, motion=motion, size=size)
                    scene = Scene(sample_background(rng, kind=kind), (s,))
                    frames = _through(through, render(scene, int(rng.integers(100_000)), frames_per_clip))
                    for f in frames:
                        pairs.append((shape, M.frame_scene(f)["shape"]))
                        old.append((shape, M.shape_of(M.foreground(f[None])[0][0])))
    return {"frames": len(pairs), "accuracy": accuracy(pairs), "confusion": confusion(pairs, SHAPES, ("blob",)),
            "fill_ratio_accuracy": accuracy(old)}


def check_backgrounds(frames_per_clip: int = CHUNK, seed: int = 1, per_cell: int = 3, through: Through = None) -> dict:
    """Every background colour x pattern (random angle and period), with one moving subject in front."""
    rng = np.random.default_rng(seed)
    pat, col = [], []
    for color in BACKGROUND_COLORS:
        for kind in BACKGROUNDS:
            for _ in range(per_cell):
                scene = Scene(sample_background(rng, kind=kind, color=color), (sample_shape(rng),))
                frames = _through(through, render(scene, int(rng.integers(100_000)), frames_per_clip))
                pat.append((kind, M.background_pattern(frames)))
                col.append((color, M.background_color(frames)))
    return {"clips": len(pat), "pattern_accuracy": accuracy(pat),
            "pattern_confusion": confusion(pat, BACKGROUNDS, ("other",)),
            "color_accuracy": accuracy(col), "color_confusion": confusion(col, tuple(BACKGROUND_COLORS))}


def check_counts(clips: int = 60, frames_per_clip: int = CHUNK, seed: int = 2, through: Through = None) -> dict:
    """Scenes of one to three subjects: the count read against the number of shapes drawn, frame by frame, per
    colour (`count`) and as foreground regions of any colour (`blobs`: touching shapes merge)."""
    rng = np.random.default_rng(seed)
    pairs, blobs = [], []
    for i in range(clips):
        scene = sample_scene(rng, max_shapes=3, single_shape_prob=1 / 3)
        frames = _through(through, render(scene, int(rng.integers(100_000)), frames_per_clip))
        reads = [M.frame_scene(f) for f in frames]
        pairs += [(len(scene.shapes), r["count"]) for r in reads]
        blobs += [(len(scene.shapes), r["blobs"]) for r in reads]
    one = [(t, r) for t, r in pairs if t == 1]
    return {"frames": len(pairs), "accuracy": accuracy(pairs), "one_subject_accuracy": accuracy(one),
            "blob_accuracy": accuracy(blobs),
            "confusion": {t: {r: sum(1 for a, b in pairs if a == t and b == r) for r in range(4)} for t in (1, 2, 3)}}


def motion_tracks(clips_per_motion: int = 40, frames: int = 64, seed: int = 3, through: Through = None):
    """Rendered clips' centroid tracks (read back through the metrics, not taken from the world): (motion, (F, 2))."""
    rng = np.random.default_rng(seed)
    out = []
    for motion in MOTIONS:
        for _ in range(clips_per_motion):
            scene = Scene(sample_background(rng), (sample_shape(rng, motion=motion),))
            fr = _through(through, render(scene, int(rng.integers(100_000)), frames))
            out.append((motion, np.array([M.frame_scene(f)["centroid"] for f in fr])))
    return out


def check_motion(windows: tuple[int, ...] = (12, 24, 48), clips_per_motion: int = 40, seed: int = 3,
                 through: Through = None) -> dict:
    """The rule (`metrics.classify_motion`) per window length, and how separable the motions are at all: a random
    forest's 5-fold cross-validated accuracy on the same features (an upper bound a better rule could reach)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import cross_val_score
    tracks = motion_tracks(clips_per_motion, max(windows) + 16, seed, through)
    rows = []
    for w in windows:
        pairs, X, y = [], [], []
        for motion, c in tracks:
            for start in range(0, len(c) - w + 1, w):
                f = M.motion_features(c[start:start + w])
                pairs.append((motion, M.classify_motion(f)))
                if f is not None:
                    X.append([f[k] for k in sorted(f)])
                    y.append(motion)
        forest = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
        cv = float(cross_val_score(forest, np.array(X), np.array(y), cv=5).mean())
        rows.append({"frames": w, "seconds": w / 16, "windows": len(pairs), "rule": accuracy(pairs),
                     "forest_cv": cv, "confusion": confusion(pairs, MOTIONS)})
    return {"rows": rows}


def check_all(quick: bool = False, through: Through = None) -> dict:
    n = 6 if quick else CHUNK
    return {"shape": check_shapes(n, through=through),
            "background": check_backgrounds(n, per_cell=1 if quick else 3, through=through),
            "count": check_counts(20 if quick else 60, n, through=through),
            "motion": check_motion(clips_per_motion=10 if quick else 40, through=through)}


def confusion_md(conf: dict) -> str:
    cols = list(next(iter(conf.values())))
    head = "| drawn \\ read | " + " | ".join(map(str, cols)) + " |"
    sep = "|" + "---|" * (len(cols) + 1)
    body = ["| " + str(t) + " | " + " | ".join(str(row[c]) for c in cols) + " |" for t, row in conf.items()]
    return "\n".join([head, sep] + body)


def report_md(res: dict, title: str = "## The scene readers on rendered ground truth "
              "(`python -m toyworld.scene_check`)") -> list[str]:
    s, b, c, m = res["shape"], res["background"], res["count"], res["motion"]
    md = [title + "\n",
          f"Shape of the largest subject (best IoU with the world's own circle / square / triangle at the blob's "
          f"centroid and area): **{s['accuracy']:.1%}** of {s['frames']} frames (every shape x 3 sizes x 4 motions x "
          f"4 backgrounds); the old bounding-box fill ratio (`shape_of`): {s['fill_ratio_accuracy']:.1%}.\n",
          confusion_md(s["confusion"]), "",
          f"Background pattern: **{b['pattern_accuracy']:.1%}** and background colour: **{b['color_accuracy']:.1%}** "
          f"of {b['clips']} chunks (every colour x pattern, random angle and period, a subject in front).\n",
          confusion_md(b["pattern_confusion"]), "",
          f"Subject count (same-colour regions of at least {M.MIN_SUBJECT_AREA} px): right in {c['accuracy']:.1%} of "
          f"{c['frames']} frames of 1-3-subject scenes, {c['one_subject_accuracy']:.1%} of one-subject frames "
          f"(a shape hidden behind another reads as fewer; counted as foreground regions of any colour, touching "
          f"shapes merge: {c['blob_accuracy']:.1%}).\n",
          confusion_md(c["confusion"]), "",
          "Motion word from the subject's centroid track, by window length: the rule in `metrics.classify_motion`, "
          "and a random forest's 5-fold cross-validated accuracy on the same features (how separable the motions "
          "are at all from such a window).\n",
          "| window | windows | rule | forest (CV) |", "|---|---|---|---|"]
    md += [f"| {r['frames']} frames ({r['seconds']:g} s) | {r['windows']} | {r['rule']:.1%} | {r['forest_cv']:.1%} |"
           for r in m["rows"]]
    last = m["rows"][-1]
    md += ["", f"Confusion of the rule at {last['frames']} frames:\n", confusion_md(last["confusion"]), ""]
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description="Accuracy of the toy world's scene readers on rendered frames")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vae", action="store_true",
                    help="read the frames after an encode + decode with the shipped toy VAE (does the VAE keep it?)")
    args = ap.parse_args(argv)
    through = None
    if args.vae:
        import torch
        torch.set_num_threads(1)
        from packcache import Generator
        through = vae_roundtrip(Generator.from_preset("toy", device="cpu").vae)
    title = "## The scene readers on rendered frames" + (" after the shipped VAE's encode + decode" if args.vae else "")
    print("\n".join(report_md(check_all(args.quick, through), title + " (`python -m toyworld.scene_check"
                                + (" --vae" if args.vae else "") + "`)")))


if __name__ == "__main__":
    main()
