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


def _bounds():
    return [(0, 9)] + [(9 + 12 * i, 21 + 12 * i) for i in range(6)]   # the toy preset's 7 stream chunks


def test_training_clips_of_each_kind_are_what_they_claim():
    """Still-start clips hold their first frame for the whole first chunk and then move; return clips show one
    subject, lose it for whole chunks and get it back, in the same colour; every kind is drawn."""
    from toyworld.world import CLIP_KINDS, ClipMix
    world, seen = World(5), set()
    for _ in range(60):
        frames, scene, kind = world.sample_training(_bounds(), 64, ClipMix(still_prob=0.3, return_prob=0.3))
        seen.add(kind)
        assert frames.shape == (81, 64, 64, 3) and kind in CLIP_KINDS
        if kind == "still":
            assert all(np.array_equal(frames[0], f) for f in frames[1:9])
            assert not np.array_equal(frames[8], frames[20])
        if kind == "return":
            assert len(scene.shapes) == 1
            colors = [M.dominant_color(frames[a:b]) for a, b in _bounds()]
            assert None in colors and set(colors) == {None, scene.shapes[0].color}
            first, gone = colors.index(scene.shapes[0].color), colors.index(None, colors.index(scene.shapes[0].color))
            assert scene.shapes[0].color in colors[gone:], colors       # it comes back after the gap
    assert seen == set(CLIP_KINDS)


def test_captions_without_colours_name_shape_and_background_only():
    scene = single_shape_scene("red", shape="square", motion="drift", background="checker", bg_color="gray")
    text = caption(scene, colors=False)
    assert text == "a square drifting on a checkered gray background"
    for seed in range(10):
        para = caption(scene, np.random.default_rng(seed), colors=False)
        assert not {"red", "bright"} & set(para.replace(",", " ").split())


def test_caption_sampler_follows_the_clip_kinds():
    """`return` clips are captioned without colour, `still` clips often with the empty prompt, normal ones never
    (with null_prob 0), and scenes stored before clip kinds existed read as normal."""
    from toyworld.train import CaptionSampler, scene_to_dict, toy_preset
    scene = single_shape_scene("green", shape="circle")
    stored = [scene_to_dict(scene, "normal"), scene_to_dict(scene, "return"), scene_to_dict(scene, "still")]
    old = {k: v for k, v in stored[0].items() if k != "clip"}
    cs = CaptionSampler(toy_preset(), stored + [old], seed=0)
    texts = [[cs.text_for(i) for _ in range(40)] for i in range(4)]
    assert all("green" in t or "lime" in t for t in texts[0]) and all(t for t in texts[0] + texts[3])
    assert all(t and "green" not in t and "lime" not in t for t in texts[1])
    assert 5 < sum(t == "" for t in texts[2]) < 35


def test_captions_can_leave_out_the_background_colour_as_the_memory_test_does():
    """`background_color=False` gives the memory test's prompt wording; the caption sampler drops it for return clips
    only, and only with `return_bg_color_drop` (other stages' captions unchanged)."""
    from toyworld.memory import MemoryTrial
    from toyworld.train import CaptionSampler, scene_to_dict, toy_preset
    trial = MemoryTrial("red", "square", "drift", "checker", "gray", 0)
    assert caption(trial.scene(), colors=False, background_color=False) == trial.prompt
    for seed in range(10):
        para = caption(trial.scene(), np.random.default_rng(seed), colors=False, background_color=False)
        assert not {"red", "bright", "gray", "grey"} & set(para.replace(",", " ").split()), para
    scene = single_shape_scene("green", shape="circle", bg_color="blue")
    stored = [scene_to_dict(scene, "normal"), scene_to_dict(scene, "return")]
    p = toy_preset()
    plain = CaptionSampler(p, stored, seed=0, return_bg_color_drop=0.5)
    texts = [[plain.text_for(i) for _ in range(60)] for i in range(2)]
    assert all("blue" in t or "navy" in t for t in texts[0])
    assert 10 < sum("blue" not in t and "navy" not in t for t in texts[1]) < 50
    default = CaptionSampler(p, stored, seed=0)
    assert all("blue" in t or "navy" in t for t in (default.text_for(1) for _ in range(30)))


def test_a_placed_world_starts_one_subject_scenes_where_their_motion_starts():
    """`placed`: the prompt decides the first chunk up to the motion's direction (eval/RETRAIN_PLAN.md, session 15):
    one pattern period and angle, one size, and a one-subject clip starts at t=0 at its motion's start."""
    from toyworld.world import WORLD_STYLES, positions

    style = WORLD_STYLES["placed"]
    world = World(5, style=style)
    starts = {}
    for _ in range(60):
        frames, text, scene = world.sample(9, 64)
        bg = scene.background
        assert (bg.period, bg.angle) == (0.4, 0.0)
        if len(scene.shapes) > 1:
            continue
        s = scene.shapes[0]
        assert s.size == 0.22
        x, y = positions(s, np.zeros(1))
        starts.setdefault(s.motion, set()).add((round(float(x[0]), 3), round(float(y[0]), 3)))
        ys, xs = np.nonzero(M.foreground(frames[:1])[0][0])
        assert abs(xs.mean() + 0.5 - 64 * x[0]) < 2 and abs(ys.mean() + 0.5 - 64 * y[0]) < 2   # frame 0 is t=0
    assert set(starts) == set(MOTIONS)
    assert all(len(where) == 1 for where in starts.values()), starts          # one start per motion
    assert starts["bounce"] == {(0.5, 0.5)} and starts["zigzag"] == {(0.5, 0.5)}
    chosen = single_shape_scene("red", shape="square", motion="orbit", background="stripes", style=style)
    assert (chosen.background.period, chosen.background.angle, chosen.shapes[0].size) == (0.4, 0.0, 0.22)
    assert {tuple(round(float(v[0]), 3) for v in positions(chosen.shapes[0], np.zeros(1)))} == starts["orbit"]
    other = World(5)
    varied = [other.sample(9, 64)[2] for _ in range(40)]
    assert len({s.background.period for s in varied}) > 30 and len({s.shapes[0].size for s in varied}) > 30


def test_a_single_shape_scene_keeps_the_draws_of_its_seed():
    """Evaluations and the memory test name their scenes by seed: the background is drawn before the subject, as
    it always was, so a seed keeps its scene (placing the subject is after both draws)."""
    from toyworld.world import Scene, sample_background, sample_shape

    rng = np.random.default_rng(3)
    want = Scene(background=sample_background(rng, kind="checker", color="gray"),
                 shapes=(sample_shape(rng, color="red", shape="square", motion="drift"),))
    assert single_shape_scene("red", shape="square", motion="drift", background="checker", bg_color="gray",
                              seed=3) == want
