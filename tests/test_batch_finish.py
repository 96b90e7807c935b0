"""The batched finish (`packcache.batch.finish_rows`): one streaming decode and one compressed-backup pass for all
sessions of a step. Frames and the state the finish leaves (decoder caches, compressed backups, mid banks) must be
bit-identical to each session stepped alone on CPU fp32, across different chunk counts, prompt switches, resets,
decode=False, mixed cache kinds and a session whose finish fails."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from packcache import batch
from packcache.errors import PackCacheError
from packcache.exact import batch_invariant_convs
from packcache.vae import StreamingDecoder


@pytest.fixture(scope="module")
def gen(tiny_generator):
    return tiny_generator


# name -> (prompt, seed, cache kind, {chunk index: control applied before that chunk})
STREAMS = {
    "old": ("a red circle", 1, "packed", {3: ("prompt", "a green triangle", "recache")}),
    "new": ("a blue square", 2, "packed", {}),
    "reset": ("a yellow square", 3, "packed", {1: ("reset", 9), 2: ("prompt", "a white circle", "blend")}),
    "window": ("a green circle", 4, "window", {}),
    "full": ("a black square", 5, "full", {}),
}


def control(session, c):
    if c[0] == "prompt":
        session.set_prompt(c[1], transition=c[2], blend_chunks=2)
    else:
        session.reset(c[1])


def step_result(session, decode):
    return session.next_chunk() if decode else session.advance()


def equal(a, b, where="state"):
    """Recursive bit-equality of states (tensors, lists, dicts, scalars)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where}: max diff {(a.float() - b.float()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def finish_state(session):
    """What a chunk's finish leaves behind: the cache (compressed backups, mid bank, recent tokens) and the decoder's
    causal-conv cache."""
    return {"cache": session.cache.state_dict(), "decoder": session.decoder.state_dict(),
            "chunk_index": session.chunk_index}


def solo(gen, name, chunks, decode=True):
    prompt, seed, cache, script = STREAMS[name]
    with gen.open(prompt, seed=seed, cache=cache) as s:
        out = []
        for i in range(chunks):
            if i in script:
                control(s, script[i])
            out.append(step_result(s, decode))
        return out, finish_state(s)


def together(gen, timeline, decode=True):
    """timeline: per step, the names of the sessions batched in it. Returns each one's results and final state."""
    sessions, out = {}, {}
    try:
        for names in timeline:
            for name in names:
                if name not in sessions:
                    prompt, seed, cache, _ = STREAMS[name]
                    sessions[name], out[name] = gen.open(prompt, seed=seed, cache=cache), []
                script = STREAMS[name][3]
                if len(out[name]) in script:
                    control(sessions[name], script[len(out[name])])
            for name, res in zip(names, gen.next_chunks([sessions[n] for n in names], decode=decode)):
                assert not isinstance(res, BaseException), res
                out[name].append(res)
        return out, {name: finish_state(s) for name, s in sessions.items()}
    finally:
        for s in sessions.values():
            s.close()


@pytest.fixture
def batched_paths_only(caplog, monkeypatch):
    """Fails the test if a batched decode or compression fell back to row by row (it would still be exact), and
    counts the batched compression passes."""
    calls = []
    real = batch._compress_batched
    monkeypatch.setattr(batch, "_compress_batched", lambda gen, rows: calls.append(len(rows)) or real(gen, rows))
    yield calls
    assert not [r for r in caplog.records if r.name == "packcache.batch" and "failed" in r.getMessage()]


def check(gen, timeline, decode=True):
    got, states = together(gen, timeline, decode)
    for name, results in got.items():
        want, want_state = solo(gen, name, len(results), decode)
        for i, (a, b) in enumerate(zip(results, want)):
            if decode:
                assert a.dtype == np.uint8 and np.array_equal(a, b), f"{name} chunk {i}: frames differ"
            else:
                assert torch.equal(a, b), f"{name} chunk {i}: latents differ"
        equal(states[name], want_state, name)
    return got


def test_new_session_and_one_at_chunk_5_finish_together_exactly(gen, monkeypatch, batched_paths_only):
    calls = []
    real = StreamingDecoder.decode_batched.__func__
    monkeypatch.setattr(StreamingDecoder, "decode_batched",
                        classmethod(lambda cls, d, x: calls.append(len(d)) or real(cls, d, x)))
    # "old" goes alone through its sink, a recache prompt switch (chunk 3) and its first mid-bank admissions; "new"
    # joins at its chunk 0 (a first decoder chunk: its own decode group, while "old" decodes alone) and the two
    # decode in one pass from the next step on
    got = check(gen, [["old"]] * 5 + [["old", "new"]] * 3)
    assert len(got["old"]) == 8 and len(got["new"]) == 3
    assert 2 in calls, "the two sessions' later chunks were never decoded in one pass"
    assert 2 in batched_paths_only, "the two sessions' compressed backups were never made in one pass"


def test_prompt_switch_and_reset_in_one_row(gen, batched_paths_only):
    # "reset" resets before its chunk 1 and blends to a new prompt from chunk 2; "old" recaches at its chunk 3
    check(gen, [["old", "reset"]] * 4)


def test_decode_false_keeps_the_compressed_backup_exact(gen, batched_paths_only):
    check(gen, [["old", "new"]] * 4, decode=False)


def test_window_and_full_caches_mixed_with_packed(gen, batched_paths_only):
    check(gen, [["old", "window", "full"]] * 3)


def test_batched_compression_failure_retries_each_row_alone(gen, monkeypatch):
    def broken(gen, rows):
        raise RuntimeError("injected")
    monkeypatch.setattr(batch, "_compress_batched", broken)
    check(gen, [["old", "new"]] * 3)


def test_a_row_failing_in_the_finish_gets_its_error_and_the_others_go_on(gen):
    """One session's decoder state is corrupt but claims to batch with the others: the batched decode fails, every
    row is decoded again alone, the broken one gets its error (its chunk was committed, so it counts, and the
    session refuses further chunks until a reset), the others' frames and state equal their solo runs."""
    names = ["old", "new", "window"]      # no controls before their chunk 3
    sessions = {n: gen.open(STREAMS[n][0], seed=STREAMS[n][1], cache=STREAMS[n][2]) for n in names}
    try:
        out = {n: [] for n in names}
        for _ in range(2):
            for n, res in zip(names, gen.next_chunks(list(sessions.values()))):
                assert not isinstance(res, BaseException), res
                out[n].append(res)
        bad = sessions["new"].decoder
        good = sessions["old"].decoder
        j = next(i for i, c in enumerate(bad._cache) if isinstance(c, torch.Tensor))
        bad._cache[j] = bad._cache[j][:, :1].clone()        # wrong channel count: this decoder cannot run
        bad.batch_key = good.batch_key                      # ... but says it batches with the others
        results = gen.next_chunks(list(sessions.values()))
        assert isinstance(results[1], Exception)
        assert sessions["new"].chunk_index == 3 and sessions["new"].stats()["chunk_index"] == 3
        with pytest.raises(PackCacheError, match="failed to finish"):
            sessions["new"].next_chunk()
        for n, res in zip(names, results):
            if n != "new":
                assert not isinstance(res, BaseException), res
                out[n].append(res)
        states = {n: finish_state(sessions[n]) for n in ("old", "window")}
    finally:
        for s in sessions.values():
            s.close()
    for n in ("old", "window"):
        want, want_state = solo(gen, n, 3)
        for a, b in zip(out[n], want):
            assert np.array_equal(a, b)
        equal(states[n], want_state, n)


def test_decode_batched_equals_decoding_alone_and_rejects_unlike_decoders(gen):
    torch.manual_seed(0)
    alone = [gen.vae.stream_decoder() for _ in range(3)]
    stacked = [gen.vae.stream_decoder() for _ in range(3)]
    for _ in range(2):   # first chunk (1 + 4(T-1) frames) and a continuation (4T frames, cached features)
        xs = [torch.randn(1, 16, 3, 8, 8) for _ in range(3)]
        want = [d.decode(x) for d, x in zip(alone, xs)]
        got = StreamingDecoder.decode_batched(stacked, xs)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    for a, b in zip(alone, stacked):
        equal(b.state_dict(), a.state_dict())
    fresh = gen.vae.stream_decoder()
    x = torch.randn(1, 16, 3, 8, 8)
    assert fresh.batch_key(x) != stacked[0].batch_key(x)       # first chunk vs continuation: not alike
    with pytest.raises(ValueError):
        StreamingDecoder.decode_batched([fresh, stacked[0]], [x, x])
    assert fresh.batch_key(x) is not None and fresh.started is False  # a refused batch leaves the decoders as they were


def test_convolutions_in_the_mode_are_batch_invariant():
    """Why the CPU finish can batch exactly: inside `batch_invariant_convs` a sample's convolution result does not
    depend on the batch it is in (outside, ATen switches kernels between batch 1 and batch 4 at these sizes)."""
    torch.manual_seed(0)
    w3, b3 = torch.randn(8, 4, 3, 3, 3), torch.randn(8)
    w2 = torch.randn(8, 4, 3, 3)
    xs3 = [torch.randn(1, 4, 3, 16, 16) for _ in range(4)]
    xs2 = [torch.randn(2, 4, 16, 16) for _ in range(4)]
    with torch.no_grad(), batch_invariant_convs("cpu"):
        one3 = torch.cat([F.conv3d(x, w3, b3, padding=(0, 1, 1)) for x in xs3])
        many3 = F.conv3d(torch.cat(xs3), w3, b3, padding=(0, 1, 1))
        one2 = torch.cat([F.conv2d(x, w2, None, padding=1) for x in xs2])
        many2 = F.conv2d(torch.cat(xs2), w2, None, padding=1)
    assert torch.equal(one3, many3) and torch.equal(one2, many2)
    with torch.no_grad():
        torch.testing.assert_close(many3, F.conv3d(torch.cat(xs3), w3, b3, padding=(0, 1, 1)), atol=1e-4, rtol=0)


def test_end_rows_first_then_finish_rows_is_the_same_step(gen, monkeypatch):
    """A caller may run the partition update (`end_rows`) on the critical path and the rest of the finish later:
    `commit_rows` has already run it, so this call skips it (each chunk ends once: the cache state, chunks_seen
    included, equals solo)."""
    real = batch.finish_rows

    def split(gen, rows, decode, start):
        batch.end_rows(rows)
        assert all(r.ended for r in rows)
        real(gen, rows, decode, start)
    monkeypatch.setattr(batch, "finish_rows", split)
    check(gen, [["old", "new"]] * 3)
