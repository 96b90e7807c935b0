"""The scene readers of toyworld/metrics.py (subject count, shape, background colour and pattern, motion word) on
rendered ground truth, where the answer is known, and the scene evaluation's bookkeeping (no model: fast)."""

import numpy as np
import pytest

from toyworld import metrics as M
from toyworld import scene_check as S
from toyworld.world import (BACKGROUND_COLORS, BACKGROUNDS, MOTIONS, SHAPES, Background, Scene, caption, render,
                            sample_background, sample_shape, single_shape_scene)


def test_shape_reader_is_right_on_rendered_frames_of_every_shape_and_size():
    res = S.check_shapes(frames_per_clip=2)
    assert res["frames"] == 3 * 3 * 4 * 4 * 2
    assert res["accuracy"] >= 0.95                      # issue 16's bar for the classifier on renders
    for shape in SHAPES:
        assert res["confusion"][shape][shape] >= 0.9 * sum(res["confusion"][shape].values())


def test_a_shapeless_blob_is_not_called_a_shape():
    """Two overlapping discs of one colour: one region, but no template fits it."""
    yy, xx = np.mgrid[0:64, 0:64]
    blob = ((xx - 24) ** 2 + (yy - 30) ** 2 < 81) | ((xx - 36) ** 2 + (yy - 36) ** 2 < 100)
    scores = M.shape_scores(blob)
    assert max(scores.values()) < M.SHAPE_MIN_IOU
    assert M.classify_shape(blob) == "blob"
    assert M.classify_shape(np.zeros((64, 64), bool)) is None


def test_background_colour_and_pattern_readers_on_every_colour_and_pattern():
    res = S.check_backgrounds(frames_per_clip=4, per_cell=1)
    assert res["clips"] == len(BACKGROUND_COLORS) * len(BACKGROUNDS)
    assert res["pattern_accuracy"] >= 0.95 and res["color_accuracy"] >= 0.95


def test_a_noisy_background_is_no_pattern():
    """Texture no template explains reads as "other", not as the last class standing."""
    rng = np.random.default_rng(0)
    base = render(Scene(Background("solid", "blue"), ()), 0, 4)
    noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 120).astype(np.uint8)
    assert M.background_pattern(base) == "solid"
    assert M.background_pattern(noisy) == "other"
    assert M.background_color(base) == "blue"


def textured(frames: np.ndarray, spread: float, seed: int = 0) -> np.ndarray:
    """`frames` with one blotchy texture on every frame (noise blurred to the VAE's latent scale, 8 px), scaled to
    the reader's robust luma `spread`: the kind of texture the VAE leaves on a plain background."""
    from scipy import ndimage
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=frames.shape[1:3]), 4)
    q1, q3 = np.percentile(noise, [25, 75])
    tex = noise / ((q3 - q1) / 1.349) * spread
    return np.clip(frames + tex[None, :, :, None], 0, 255).astype(np.uint8)


@pytest.mark.parametrize("spread, read", [(1.5, "solid"), (4.0, "solid"), (8.0, "other")])
def test_an_unexplained_texture_is_plain_only_while_fainter_than_any_drawn_pattern(spread, read):
    """Below PATTERN_TEXTURE_STD an unstructured texture is the VAE's (a plain background through the VAE spreads up
    to ~5.9, the faintest drawn pattern >= 4.7 and fits its template); above it, noise that is no pattern."""
    base = render(Scene(Background("solid", "blue"), ()), 0, 4).astype(np.float32)
    frames = textured(base, spread)
    img, valid = M.background_image(frames)
    feats = M.pattern_features(img, valid)
    assert abs(feats["std"] - spread) < 0.35 * spread + 0.5
    assert max(feats[f"{k}_r2"] for k in ("gradient", "stripes", "checker")) < M.PATTERN_MIN_R2
    assert M.background_pattern(frames) == read


def test_the_faintest_drawn_gradient_reads_as_a_gradient_under_the_same_texture():
    """A dark gradient (the world's faintest pattern) stays a gradient with the VAE's texture on top: the template
    fit decides before the spread does."""
    bg = Background("gradient", "black", 0.0, 0.2)
    frames = render(Scene(bg, ()), 0, 4)
    img, valid = M.background_image(frames)
    assert M.pattern_features(img, valid)["std"] < 2 * M.PATTERN_TEXTURE_STD
    assert M.background_pattern(textured(frames.astype(np.float32), 2.5)) == "gradient"


def test_subject_count_counts_shapes_of_distinct_colours_even_when_they_touch():
    res = S.check_counts(clips=12, frames_per_clip=3)
    assert res["one_subject_accuracy"] == 1.0
    assert res["accuracy"] >= 0.9
    # two touching shapes of different colours: one foreground region, two subjects
    rng = np.random.default_rng(1)
    a = sample_shape(rng, color="red", shape="square", motion="orbit", size=0.15)
    b = a.__class__(**{**a.__dict__, "color": "blue", "phase": a.phase + 0.5})
    frame = render(Scene(sample_background(rng, kind="solid"), (a, b)), 0, 1)[0]
    read = M.frame_scene(frame)
    assert read["count"] == 2 and read["blobs"] == 1


def test_motion_rule_separates_the_four_motions_over_three_seconds():
    tracks = S.motion_tracks(clips_per_motion=4, frames=48, seed=11)
    ok = [m == M.classify_motion(M.motion_features(c)) for m, c in tracks]
    assert np.mean(ok) >= 0.75                            # 92% over 160 tracks in scene_check; few tracks here
    assert M.motion_features(np.full((20, 2), np.nan)) is None
    assert M.classify_motion(None) is None


@pytest.mark.parametrize("paraphrase", [False, True])
def test_prompt_scene_reads_back_what_the_grammar_wrote(paraphrase):
    rng = np.random.default_rng(5)
    for i in range(40):
        scene = single_shape_scene("red", shape=SHAPES[i % 3], motion=MOTIONS[i % 4], background=BACKGROUNDS[i % 4],
                                   bg_color=list(BACKGROUND_COLORS)[i % 8], seed=i)
        text = caption(scene, rng if paraphrase else None)
        want = M.prompt_scene(text)
        s = scene.shapes[0]
        assert (want["shape"], want["motion"], want["pattern"], want["bg_color"]) == \
            (s.shape, s.motion, scene.background.kind, scene.background.color), text


def test_scene_eval_reads_rendered_chunks_as_right_and_draws_a_strip(tmp_path):
    """The evaluation's per-chunk bookkeeping on ground truth: every verdict a hit, confusions on the diagonal;
    the strip has one row per prompt."""
    from toyworld import scene_eval as E
    prompt = "a green square zigzagging on a striped brown background"
    want = M.prompt_scene(prompt)
    scene = single_shape_scene("green", shape="square", motion="zigzag", background="stripes", bg_color="brown")
    frames = render(scene, 0, 9 + 12 * 7)
    chunks = [frames[:9]] + [frames[9 + 12 * k:21 + 12 * k] for k in range(7)]
    run = {"prompt": prompt, "want": want, **E.read_chunks(chunks, want)}
    assert all(all(v) for v in run["hits"].values()), run["hits"]
    assert run["motion_hits"] == [True, True] and run["one_subject_frames"] == run["one_blob_frames"] == 1.0
    summary = E.summarize([run])
    assert summary["shape"] == summary["pattern"] == summary["bg_color"] == summary["one_blob"] == 1.0
    assert summary["confusion"]["shape"]["square"]["square"] == 8
    path = tmp_path / "strip.png"
    E.strip([("square", E.truth_frame(prompt), chunks), ("again", E.truth_frame(prompt), chunks)], path)
    from PIL import Image
    img = Image.open(path)
    assert img.height > 2 * 64 * 2 and img.width > 6 * 64 * 2


def test_results_sections_split_by_stage_for_merge():
    from toyworld.evaluate import join_sections, split_sections
    text = "# head\n\n## VAE alone: x\n\nrow\n\n## VAE alone on varied clips\n\n## Real time (64x64)\n\nt\n\n" \
           "## Prompt switch (`cut`)\n\n## Prompt switch (`recache`)\n\n## Extrapolation: 120 s\n### packed\n"
    parts = split_sections(text)
    assert list(parts) == ["vae", "rt", "switch", "long"]
    assert "varied clips" in parts["vae"] and "recache" in parts["switch"] and "### packed" in parts["long"]
    once = join_sections("# head\n", parts)
    assert join_sections("# head\n", split_sections(once)) == once        # merging again adds no blank lines
    assert "\n\n\n" not in once and once.count("\n## ") == 6


def test_retrain_probe_data_stats_read_the_training_world():
    """The retrain plan's data check: shares are shares, and the radius read is within the world's size range (a
    shape ~2 DiT tokens wide since the retrain)."""
    from toyworld.retrain_probe import data_stats
    from toyworld.world import SHAPE_SIZE_RANGE
    d = data_stats(clips=8, frames=17, every=8)
    assert 0.0 <= d["one_subject_frames"] <= 1.0 and 0.0 < d["one_subject_clips"] <= 1.0
    lo, hi = (64 * s for s in SHAPE_SIZE_RANGE)
    assert lo <= d["radius_px"] <= hi and 2 * lo / 16 <= d["diameter_tokens"] <= 2 * hi / 16
    assert d["diameter_tokens"] > 1.4
    assert sum(d["patterns"].values()) == 8


def test_retrain_probe_denoise_reads_each_sampler_level_against_the_true_latents():
    """The denoise probe: one row for the true latents (the VAE's ceiling: it reads the grid scenes right) and one
    per sampler level, the last being the stream's own first chunk from pure noise."""
    from toyworld.evaluate import load_generator
    from toyworld.retrain_probe import denoise_by_level
    from toyworld.scene_eval import grid_scenes
    gen = load_generator(None)
    rows = denoise_by_level(gen, seeds=(0,), scenes=grid_scenes()[:3])
    assert [r["start"] for r in rows][0] == "true latents" and rows[-1]["start"].endswith("(the stream)")
    assert len(rows) == 1 + gen.sampler.steps and all(r["samples"] == 3 for r in rows)
    assert rows[0]["shape"] == 1.0 and rows[0]["color"] == 1.0 and rows[0]["one_subject"] == 1.0
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("one_subject", "shape", "bg_color", "pattern", "color"))


def test_context_check_reads_true_continuations_and_what_the_context_is_worth(capsys):
    """The continuation check on one scene: the true start clip is committed (k chunks), the next chunk read; the
    x0 errors are positive and, from sigma 1 with no context, about the latents' own spread (nothing to go on)."""
    from toyworld import context_check as C
    from toyworld.evaluate import load_generator
    gen = load_generator(None)
    res = C.run(gen, 1)
    assert set(res["shape"]) == {f"{a} {k}" for a in ("forced", "free") for k in C.CONTEXT_CHUNKS}
    assert all(v in (0.0, 1.0) for v in res["shape"].values())
    mse = res["x0_mse"]
    assert all(0.0 < v < 3.0 for v in mse.values())
    assert all(mse[f"{n} k{k} s0.6"] < mse[f"{n} k{k} s1.0"] for n in ("context", "alone") for k in C.CONTEXT_CHUNKS)
    table = C.report(res)
    assert table.count("\n| ") == 1 + len(C.CONTEXT_CHUNKS)
    with pytest.raises(SystemExit) as e:
        C.main(["--scenes", "0"])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_an_evaluation_report_names_the_command_that_made_it(monkeypatch):
    """RESULTS.md's first line is the command with its arguments, also when run from the shell (argv None), so a
    candidate bundle's report says which weights it measured."""
    from toyworld.evaluate import invocation
    assert invocation(["--only", "scene", "--weights", "/w/a b.safetensors"]) == \
        "python -m toyworld.evaluate --only scene --weights '/w/a b.safetensors'"
    monkeypatch.setattr("sys.argv", ["evaluate.py", "--weights", "/w/c.safetensors"])
    assert invocation(None) == "python -m toyworld.evaluate --weights /w/c.safetensors"
