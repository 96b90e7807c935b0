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
    assert parse_spec("3:5") == (3.0, 5.0)
    with pytest.raises(SystemExit, match="guidance:shift"):
        parse_spec("3")
