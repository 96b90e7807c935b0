"""The procedural toy world and its metrics (no model: fast)."""

import numpy as np

from toyworld import metrics as M
from toyworld.world import (BACKGROUNDS, MOTIONS, SHAPE_COLORS, SHAPES, World, caption, render, sample_scene,
                            single_shape_scene)


def test_world_is_seeded_and_unbounded():
    a = World(3).sample(17, 64)
    b = World(3).sample(17, 64)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape == (17, 64, 64, 3) and a[0].dtype == np.uint8
    scene = sample_scene(np.random.default_rng(0))
    far = render(scene, start=16 * 3600 * 5, num_frames=4, size=64)    # five hours in: still a valid frame
    assert far.shape == (4, 64, 64, 3)


def test_caption_grammar_names_every_attribute():
    for seed in range(20):
        scene = sample_scene(np.random.default_rng(seed))
        text = caption(scene)
        for s in scene.shapes:
            assert s.color in text and s.shape in text
        assert text.endswith("background")
        assert caption(scene, np.random.default_rng(seed))   # paraphrases exist


def test_metrics_read_ground_truth_clips():
    for i, color in enumerate(SHAPE_COLORS):
        scene = single_shape_scene(color, shape=SHAPES[i % 3], motion=MOTIONS[i % 4],
                                   background=BACKGROUNDS[i % 4], seed=i)
        frames = render(scene, 0, 32, 64)
        assert M.dominant_color(frames) == color
        row = M.clip_summary(frames)
        assert row["shape_consistency"] > 0.9
        assert row["background_stability"] > 0.95
        assert row["motion_px_s"] > 1.0


def test_prompt_color_parsing():
    assert M.prompt_color("a red circle bouncing on a striped blue background") == "red"
    assert M.prompt_color("a crimson ball on a blue backdrop") == "red"
    assert M.prompt_color("blue background with a green square") == "green"
    assert M.prompt_color("a plain black background") is None


def test_sampler_sweep_prompts_are_not_the_evaluations():
    """The sweep that picks sampler settings draws its own prompts: every colour, each named as the subject's,
    none of them one of the evaluation's 20."""
    import pytest

    from toyworld import metrics as M
    from toyworld.evaluate import PROMPTS
    from toyworld.sampler_sweep import grammar_prompts, parse_spec
    from toyworld.world import SHAPE_COLORS
    prompts = grammar_prompts(16)
    assert len(prompts) == 16 and len(set(prompts)) == 16
    assert [M.prompt_color(p) for p in prompts] == list(SHAPE_COLORS) * 2
    assert not set(prompts) & set(PROMPTS)
    assert grammar_prompts(16) == prompts                      # seeded
    assert parse_spec("3:5") == (3.0, 5.0, 0.0)
    assert parse_spec("5:5:1") == (5.0, 5.0, 1.0)
    for bad in ("3", "1:2:3:4", "a:5"):
        with pytest.raises(SystemExit, match="guidance:shift"):
            parse_spec(bad)


def test_drift_colors_grow_from_nothing_to_an_off_prompt_clip():
    """The `drift` stage's contexts: frame 0 is untouched, the change grows over the clip, the same seed gives the
    same clip, and across seeds every failure mode appears: a background gaining saturation, a subject changing hue
    and, given the background alone, a subject fading into it."""
    from toyworld.drift import drift_colors
    from toyworld.world import render, replace, single_shape_scene
    scene = single_shape_scene("red", background="solid", bg_color="brown", seed=1)
    frames = render(scene, start=0, num_frames=33, size=64)
    fg0, _ = M.foreground(frames[-1:])
    h0, s0, _ = M.rgb_to_hsv(frames[-1])
    bg_saturated = subject_moved = 0
    for seed in range(12):
        d = drift_colors(frames, np.random.default_rng(seed))
        assert d.shape == frames.shape and d.dtype == np.uint8
        assert np.array_equal(d[0], frames[0])
        assert np.array_equal(d, drift_colors(frames, np.random.default_rng(seed)))
        change = np.abs(d.astype(int) - frames.astype(int)).mean(axis=(1, 2, 3))
        assert change[-1] > change[16] > 0
        h, s, _ = M.rgb_to_hsv(d[-1])
        bg_saturated += s[~fg0[0]].mean() > s0[~fg0[0]].mean() + 0.2
        dh = np.abs(h[fg0[0]] - h0[fg0[0]])
        subject_moved += np.minimum(dh, 360 - dh).mean() > 10
    assert bg_saturated >= 3 and subject_moved >= 3
    backdrop = render(replace(scene, shapes=()), num_frames=1, size=64)[0]
    faded = 0
    for seed in range(12):
        d = drift_colors(frames, np.random.default_rng(seed), backdrop)
        assert np.array_equal(d[0], frames[0])
        faded += M.dominant_color(d[-1:]) is None          # the subject has all but gone by the last frame
    assert faded >= 2
