"""The public Generator/session API on the tiny preset: determinism, prompt switching, bounds, teardown."""

import numpy as np
import pytest

from packcache import Generator, PackCacheError, PresetError, PromptError


@pytest.fixture(scope="module")
def gen(tiny_generator):
    return tiny_generator


def run(gen, prompt="a red circle", seed=0, chunks=3, cache="packed"):
    with gen.open(prompt, seed=seed, cache=cache) as s:
        return [s.next_chunk() for _ in range(chunks)]


def test_chunks_are_uint8_rgb_with_streaming_frame_counts(gen):
    frames = run(gen, chunks=2)
    t = gen.preset.cache.chunk_frames
    assert frames[0].shape == (1 + 4 * (t - 1), 64, 64, 3) and frames[0].dtype == np.uint8
    assert frames[1].shape == (4 * t, 64, 64, 3)


def test_same_seed_same_frames_other_seed_other_frames(gen):
    a, b, c = run(gen, seed=3), run(gen, seed=3), run(gen, seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("cache", ["packed", "window", "full"])
def test_every_cache_kind_streams(gen, cache):
    frames = run(gen, chunks=6, cache=cache)
    assert len(frames) == 6 and all(f.std() > 0 for f in frames)


def test_packed_session_memory_constant_and_positions_bounded(gen):
    with gen.open("a blue square", cache="packed") as s:
        seen = []
        for i in range(10):
            s.next_chunk()
            st = s.stats()
            lo, hi = st["position_range"]
            assert lo >= 0 and hi <= 40
            if i >= 5:
                seen.append((st["kv_bytes"], st["attended_tokens"]))
        assert len(set(seen)) == 1
        assert st["partitions"]["mid"]["archived_blocks"] <= gen.preset.cache.mid_capacity


@pytest.mark.parametrize("transition", ["cut", "recache", "blend"])
def test_prompt_switch_takes_effect_at_the_returned_chunk(gen, transition):
    with gen.open("a red circle", seed=1) as s:
        base = [s.next_chunk() for _ in range(4)]
    with gen.open("a red circle", seed=1) as s:
        for _ in range(3):
            s.next_chunk()
        effective = s.set_prompt("a green triangle", transition=transition, blend_chunks=2)
        assert effective == 3
        switched = s.next_chunk()
        assert s.stats()["prompt"] == "a green triangle"
    assert not np.array_equal(switched, base[3])


def test_reset_restarts_the_stream(gen):
    with gen.open("a red circle", seed=5) as s:
        first = s.next_chunk()
        s.next_chunk()
        s.reset()
        again = s.next_chunk()
        assert s.chunk_index == 1
    np.testing.assert_array_equal(first, again)


def test_bad_input_raises_one_clear_error(gen):
    with gen.open("ok") as s:
        with pytest.raises(PromptError, match="empty"):
            s.set_prompt("   ")
        with pytest.raises(PromptError, match="transition"):
            s.set_prompt("x", transition="dissolve")
        with pytest.raises(PromptError, match="blend_chunks"):
            s.set_prompt("x", transition="blend", blend_chunks=0)
        s.next_chunk()   # still alive
    with pytest.raises(PresetError, match="unknown cache"):
        gen.open("x", cache="lru")
    with pytest.raises(PresetError, match="known presets"):
        Generator.from_preset("nope")


def test_close_frees_cache_and_refuses_more_chunks(gen):
    s = gen.open("a red circle")
    s.next_chunk()
    s.close()
    s.close()   # idempotent
    assert s.cache.sink_k is None and s.cache.mid_k is None
    with pytest.raises(PackCacheError, match="closed"):
        s.next_chunk()


def test_cross_attention_kv_computed_once_per_prompt_not_per_step(gen):
    calls = []
    hooks = [b.attn2.to_k.register_forward_hook(lambda *a: calls.append(1)) for b in gen.model.transformer.blocks]
    try:
        with gen.open("a red circle counted") as s:
            for _ in range(3):
                s.next_chunk()
            per_prompt = len(calls)
            s.set_prompt("a blue square counted")
            s.next_chunk()
    finally:
        for h in hooks:
            h.remove()
    layers = gen.preset.transformer.num_layers
    assert per_prompt == layers            # 3 chunks x (4 steps + commit + compress) passes, one K/V per layer
    assert len(calls) == 2 * layers


def test_guided_sampling_runs_conditional_and_empty_prompt_passes(gen):
    """guidance_scale > 1: each denoising step runs the DiT a second time (the empty prompt); the commit and the
    compression passes do not. The frames differ from unguided ones and stay deterministic."""
    from dataclasses import replace

    from packcache.sampler import FlowSampler
    calls = []
    hook = gen.model.transformer.blocks[0].attn1.register_forward_hook(lambda *a: calls.append(1))
    saved = gen.sampler
    try:
        plain = run(gen, chunks=2)
        plain_calls = len(calls)
        gen.sampler = FlowSampler(replace(gen.preset.sampler, guidance_scale=4.0, between_steps="ode"))
        guided = run(gen, chunks=2)
        guided_calls = len(calls) - plain_calls
        again = run(gen, chunks=2)
    finally:
        hook.remove()
        gen.sampler = saved
    assert guided_calls - plain_calls == 2 * gen.sampler.steps
    assert not np.array_equal(guided[1], plain[1])
    assert all(np.array_equal(a, b) for a, b in zip(guided, again))


def test_later_chunks_continue_the_previous_one_unless_the_scene_restarts(gen):
    """`SamplerConfig.continue_from_step`: a stream's first chunk starts from pure noise, every later one at that
    step from the previous chunk (one DiT pass fewer); a cut, a recache or a reset starts afresh, a blend continues,
    and a start picture is continued like a generated chunk. 0 keeps every chunk from pure noise."""
    from dataclasses import replace

    from packcache.sampler import FlowSampler
    saved = gen.sampler
    frame = np.zeros((64, 64, 3), np.uint8)
    try:
        gen.sampler = FlowSampler(replace(gen.preset.sampler, continue_from_step=1))
        starts = []
        with gen.open("a red circle", seed=3, cache="window") as s:
            first_step = s._first_step
            s._first_step = lambda: starts.append(first_step()) or starts[-1]
            continued = [s.next_chunk() for _ in range(2)]
            s.set_prompt("a blue square", transition="cut")
            s.next_chunk()
            s.set_prompt("a green circle", transition="blend", blend_chunks=2)
            s.next_chunk()
            s.set_prompt("a red square", transition="recache")
            s.next_chunk()
            s.reset()
            s.next_chunk()
            s.next_chunk()
        assert starts == [0, 1, 0, 1, 0, 0, 1]
        with gen.open("", seed=3, cache="packed", start=frame) as s:
            first_step = s._first_step
            s._first_step = lambda: starts.append(first_step()) or starts[-1]
            s.next_chunk()                              # (the picture is committed at the first chunk's start)
        assert starts[-1] == 1
        gen.sampler = saved
        fresh = run(gen, seed=3, chunks=2, cache="window")
    finally:
        gen.sampler = saved
    assert np.array_equal(continued[0], fresh[0])        # the same first chunk: the same noise draw
    assert not np.array_equal(continued[1], fresh[1])
