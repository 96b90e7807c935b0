"""Sessions batched into one forward pass (`Generator.next_chunks`): each session's latents are bit-identical to
running it alone, across prompt switches, resets, joins and leaves, different chunk counts, guidance and caches;
an error stays with its session."""

from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch

from packcache import PackCacheError
from packcache.sampler import FlowSampler


@pytest.fixture(scope="module")
def gen(tiny_generator):
    return tiny_generator


@contextmanager
def sampler_with(gen, **changes):
    """The generator with its preset's sampler changed, restored afterwards."""
    saved = gen.sampler
    gen.sampler = FlowSampler(replace(gen.preset.sampler, **changes))
    try:
        yield gen
    finally:
        gen.sampler = saved


@pytest.fixture
def guided(gen):
    """The tiny generator with classifier-free guidance (2N rows per step)."""
    with sampler_with(gen, guidance_scale=3.0) as g:
        yield g


# A scripted stream: chunk index -> control applied before that chunk.
SCRIPTS = {
    "a": ("a red circle", 1, {3: ("prompt", "a green triangle", "recache"), 6: ("prompt", "a blue square", "blend")}),
    "b": ("a yellow square", 2, {2: ("reset", 7), 4: ("prompt", "a red circle", "cut")}),
    "c": ("a blue circle", 3, {1: ("prompt", "a white triangle", "blend")}),
}


def apply(session, control):
    if control[0] == "prompt":
        session.set_prompt(control[1], transition=control[2], blend_chunks=2)
    else:
        session.reset(control[1])


def solo(gen, name, chunks, cache="packed"):
    prompt, seed, script = SCRIPTS[name]
    out = []
    with gen.open(prompt, seed=seed, cache=cache) as s:
        for i in range(chunks):
            if i in script:
                apply(s, script[i])
            out.append(s.advance())
    return out


def batched(gen, timeline, cache="packed"):
    """timeline: per step, the names of the sessions in that step's batch (a name absent from a step waits; one
    absent from all later steps leaves). Returns each session's latents in order."""
    sessions, counts, out = {}, {}, {}
    try:
        for names in timeline:
            batch = []
            for name in names:
                if name not in sessions:
                    prompt, seed, _ = SCRIPTS[name]
                    sessions[name], counts[name], out[name] = gen.open(prompt, seed=seed, cache=cache), 0, []
                script = SCRIPTS[name][2]
                if counts[name] in script:
                    apply(sessions[name], script[counts[name]])
                batch.append(sessions[name])
            for name, res in zip(names, gen.next_chunks(batch, decode=False)):
                assert not isinstance(res, BaseException), res
                out[name].append(res)
                counts[name] += 1
    finally:
        for s in sessions.values():
            s.close()
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"chunk {i}: max diff {(x - y).abs().max().item():.3g}"


def test_batched_sessions_equal_their_solo_runs_through_switches_resets_joins_and_leaves(gen):
    # a runs alone for 2 chunks, b joins (a at chunk 2, b at 0: different context lengths in one batch), c joins
    # later, b pauses one step and comes back, a leaves before the end.
    timeline = [["a"], ["a"], ["a", "b"], ["a", "b"], ["a", "b", "c"], ["a", "c"], ["a", "b", "c"], ["b", "c"],
                ["b", "c"]]
    got = batched(gen, timeline)
    assert_same(got["a"], solo(gen, "a", 7))
    assert_same(got["b"], solo(gen, "b", 6))
    assert_same(got["c"], solo(gen, "c", 5))


@pytest.fixture
def continuing(gen):
    """The tiny generator with later chunks starting from the previous one (`continue_from_step`), as the toy's."""
    with sampler_with(gen, continue_from_step=1) as g:
        yield g


def test_continuing_batch_equals_solo_with_rows_at_different_first_steps(continuing):
    """Rows starting from pure noise (a first chunk, after a reset or a cut) and rows continuing their previous
    chunk run as two batches in one step, each bit-identical to its session alone."""
    timeline = [["a"], ["a", "b"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c"], ["b", "c"]]
    got = batched(continuing, timeline)
    assert_same(got["a"], solo(continuing, "a", 5))
    assert_same(got["b"], solo(continuing, "b", 5))
    assert_same(got["c"], solo(continuing, "c", 3))


def test_guided_batch_equals_solo(guided):
    got = batched(guided, [["a"], ["a", "c"], ["a", "c"]])
    assert_same(got["a"], solo(guided, "a", 3))
    assert_same(got["c"], solo(guided, "c", 2))


@pytest.mark.parametrize("cache", ["window", "full"])
def test_other_caches_batch_exactly(gen, cache):
    """window: constant anchor, everyone batches; full: one model call per chunk index (anchor), still exact."""
    got = batched(gen, [["a"], ["a", "c"], ["a", "c"]], cache=cache)
    assert_same(got["a"], solo(gen, "a", 3, cache))
    assert_same(got["c"], solo(gen, "c", 2, cache))


def test_frames_match_and_stats_advance(gen):
    with gen.open("a red circle", seed=4) as alone:
        ref = [alone.next_chunk() for _ in range(2)]
    with gen.open("a red circle", seed=4) as s, gen.open("a blue square", seed=5) as t:
        frames = [gen.next_chunks([s, t]) for _ in range(2)]
        assert s.stats()["chunk_index"] == t.stats()["chunk_index"] == 2
        assert s.stats()["frames"] == sum(len(f) for f in ref)
    for (mine, _), want in zip(frames, ref):
        assert mine.dtype == np.uint8 and np.array_equal(mine, want)


def test_a_failing_session_gets_its_error_and_the_others_go_on(gen):
    ref = solo(gen, "a", 3)
    a = gen.open(*SCRIPTS["a"][:2])
    closed = gen.open("a red circle")
    closed.close()
    broken = gen.open("a blue circle")
    try:
        got = [a.advance()]
        real_reader = broken.cache.reader

        def failing_reader():        # a cache fault in the middle of the batched model call
            inner = real_reader()

            class Failing:
                writes = False

                def context(self, layer, q):
                    if layer == 1:
                        raise RuntimeError("cache fault")
                    return inner.context(layer, q)
            return Failing()

        broken.cache.reader = failing_reader
        res = gen.next_chunks([a, closed, broken], decode=False)
        assert isinstance(res[1], PackCacheError) and "closed" in str(res[1])
        assert isinstance(res[2], RuntimeError) and "cache fault" in str(res[2])
        got.append(res[0])
        del broken.cache.reader
        res = gen.next_chunks([a, broken], decode=False)   # the failed chunk left broken usable
        assert not isinstance(res[1], BaseException)
        got.append(res[0])
        assert_same(got, ref)
        assert broken.stats()["chunk_index"] == 1
    finally:
        a.close()
        broken.close()


def test_a_session_twice_in_one_batch_is_refused(gen):
    with gen.open("a red circle") as s:
        with pytest.raises(PackCacheError):
            gen.next_chunks([s, s])


def test_session_footprint_for_admission(gen):
    from packcache.batch import max_sessions_for_memory, session_footprint

    fp = session_footprint(gen, "packed")
    with gen.open("a red circle") as s:
        assert fp.cache_bytes == s.stats()["kv_bytes"] > 0
    assert fp.activation_bytes > 0 and not fp.measured            # estimated on the CPU
    n, fp2, free = max_sessions_for_memory(gen, "packed", limit=10**9)
    assert n == max(1, int(free * 0.9 // fp2.total))
    with pytest.raises(PackCacheError, match="bound"):
        session_footprint(gen, "full")
