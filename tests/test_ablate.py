"""`python -m toyworld.ablate` end to end on the tiny preset (random weights: the plumbing, not the numbers), and
the memory test's script: which chunks show the subject, and that the world draws it only there."""

import json

import numpy as np

from toyworld import ablate
from toyworld import metrics as M
from toyworld import memory as MEM


def test_memory_script_shows_the_subject_only_between_sink_and_gap():
    from packcache import Generator
    gen = Generator.from_preset("tiny", device="cpu")
    trial = MEM.trials(3, seed=1)[2]
    assert trial.color not in trial.prompt and trial.shape in trial.prompt
    from toyworld.world import BACKGROUND_COLORS, SHAPE_COLORS
    words = set(trial.prompt.split())    # no colour word at all: the subject's colour can come only from memory
    assert not words & (set(SHAPE_COLORS) | set(BACKGROUND_COLORS)), trial.prompt
    frames, shown = MEM.script_frames(gen, trial, sink=2, seen=3, gap=3)
    assert shown == [False, False, True, True, True, False, False, False]
    assert len(frames) == MEM.chunk_frames(gen, 7)[1] == 9 + 7 * 12
    for i, s in enumerate(shown):
        chunk = frames[slice(*MEM.chunk_frames(gen, i))]
        assert M.dominant_color(chunk) == (trial.color if s else None)
    assert len(MEM.encode_chunks(gen, frames, len(shown))) == 8


def test_ablate_writes_rows_table_and_strip(tmp_path):
    assert ablate.main(["--preset", "tiny", "--quick", "--seconds", "3", "--variants", "fifo,nosink",
                        "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "ablations.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["packed fifo", "no sink"]
    for r in rows.values():
        for key in ("subject_consistency", "memory_recall", "prompt_following", "kv_kib", "attended_tokens",
                    "s_per_chunk"):
            assert np.isfinite(r[key]), key
        assert 0 <= r["memory_recall"] <= 1 and 0 <= r["subject_consistency"] <= 1
        assert 0 <= r["subject_drawn"] <= 1 and r["memory_recall"] <= r["subject_drawn"]   # recall needs a subject
        assert 0 <= r["picture_kept"] <= 1 and list(r["picture_colours"]) == ["red circle"]  # --quick: one picture
        assert len(r["picture_colours"]["red circle"].split()) == 5      # 3 s of video: 9 + 4 x 12 frames
    assert rows["packed fifo"]["memory_recall_forced"] is None        # FIFO selection cannot be forced
    assert 0 <= rows["no sink"]["memory_recall_forced"] <= 1
    assert "fifo" in rows["packed fifo"]["setting"] and "sink 0" in rows["no sink"]["setting"]
    # FIFO attends to the newest blocks, which the memory script leaves empty: it never selects the subject's
    assert rows["packed fifo"]["subject_blocks_selected"] == 0.0
    assert 0 <= rows["no sink"]["subject_blocks_selected"] <= 1
    assert rows["no sink"]["attended_tokens"] < rows["packed fifo"]["attended_tokens"]   # the sink's tokens
    assert "| packed fifo |" in (tmp_path / "ABLATIONS.md").read_text()
    assert "picture kept, no prompt" in (tmp_path / "ABLATIONS.md").read_text()
    assert (tmp_path / "ablations.png").stat().st_size > 0
    # a report merged from part runs keeps the rows and their strip rows
    assert ablate.main(["--merge", str(tmp_path), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "ablations.json").read_text())
    assert merged["rows"] == data["rows"]
    from PIL import Image
    a, b = (np.asarray(Image.open(d / "ablations.png")) for d in (tmp_path, tmp_path / "merged"))
    assert np.array_equal(a, b)


def test_memory_trial_reports_which_mid_blocks_were_selected(monkeypatch):
    """The share of selected mid blocks that held the subject: 0 for FIFO (the newest blocks are the empty gap),
    1 for a selection that takes the oldest blocks (the subject's, right after the sink), none for a cache
    without a mid bank."""
    import torch
    import packcache.cache as C
    from packcache import Generator
    gen = Generator.from_preset("tiny", device="cpu")        # sink 1, recent 1, top-2 of a 4-block bank
    trial = MEM.trials(1, seed=2)[0]
    script = dict(sink=1, seen=2, gap=3, probe=1)            # bank at the probe: chunks 1, 2 (subject), 3, 4
    assert MEM.run_trial(gen, trial, cache="window", **script)["subject_selected"] is None
    with ablate.applied(gen, ablate.Variant("fifo", overrides={"selection": "fifo"})):
        assert MEM.run_trial(gen, trial, cache="packed", **script)["subject_selected"] == 0.0

        def oldest_k(chunk_ids, valid, k):
            masked = torch.where(valid, -chunk_ids.float(), torch.tensor(float("-inf")))
            return torch.topk(masked, k).indices
        monkeypatch.setattr(C, "newest", oldest_k)
        assert MEM.run_trial(gen, trial, cache="packed", **script)["subject_selected"] == 1.0


def test_forced_selection_attends_to_the_subjects_blocks_only_where_it_is_asked():
    """The oracle of the memory test: with the subject's blocks forced in, every layer's selection holds them (top
    2 of a bank where only 1 holds the subject: that one and one other); the next session selects on its own again,
    and a cache without a mid bank refuses it in one error."""
    import pytest

    from packcache import Generator
    gen = Generator.from_preset("tiny", device="cpu")        # sink 1, recent 1, top-2 of a 4-block bank
    trial = MEM.trials(1, seed=2)[0]
    script = dict(sink=1, seen=1, gap=3, probe=1)            # bank at the probe: chunks 1 (subject), 2, 3, 4
    forced = MEM.run_trial(gen, trial, cache="packed", force_subject=True, **script)
    assert forced["subject_selected"] == 0.5                 # each layer: the subject's block and one other
    own = MEM.run_trial(gen, trial, cache="packed", **script)["subject_selected"]
    assert own is not None and 0 <= own <= 0.5
    s = gen.open(trial.prompt, seed=0, cache="window")
    with pytest.raises(ValueError, match="packed cache"):
        MEM.force_selection(s, {1})
    s.close()


def test_ablate_takes_a_bundle_and_refuses_a_missing_one_in_one_line(tmp_path, capsys):
    """`--weights` ablates a training run's bundle (the pilot of a stage, before it ships); a path that is not a file
    is one usage error, not a traceback."""
    import pytest
    with pytest.raises(SystemExit) as e:
        ablate.main(["--weights", str(tmp_path / "nope.safetensors"), "--quick", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--weights" in capsys.readouterr().err
    assert not (tmp_path / "ablations.json").exists()
