"""Start a stream from a picture or clip, and cut to a picture mid-stream (packcache/start.py, the session)."""

import numpy as np
import pytest
import torch

from packcache import PackCacheError, PromptError, StartFramesError
from packcache.start import MAX_START_CHUNKS, check_frames, context_chunks, encode_context, fit_frames, pad_front


@pytest.fixture(scope="module")
def gen(tiny_generator):
    return tiny_generator


def picture(h=64, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("bad, words", [
    ([[1, 2, 3]], "numpy uint8 array"),
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8), np.uint8), "shape"),
    (np.zeros((1, 1, 8, 8, 3), np.uint8), "shape"),
    (np.zeros((8, 8, 4), np.uint8), "3 channels"),
    (np.zeros((0, 8, 8, 3), np.uint8), "no frames"),
    (np.zeros((1, 0, 8, 3), np.uint8), "zero-sized"),
])
def test_malformed_frames_raise_one_engine_error(gen, bad, words):
    with pytest.raises(StartFramesError, match=words) as e:
        gen.open("", start=bad)
    assert isinstance(e.value, PackCacheError) and "\n" not in str(e.value)
    with gen.open("a cat") as s, pytest.raises(StartFramesError, match=words):
        s.set_prompt("", image=bad)


def test_empty_prompt_only_with_a_picture(gen):
    with pytest.raises(PromptError, match="only when a start image"):
        gen.open("  ")
    with gen.open("", start=picture()) as s:
        assert s.prompt == ""
        with pytest.raises(PromptError, match="empty"):
            s.set_prompt("")
        s.set_prompt("", image=picture(seed=1))


def test_fit_scales_to_cover_and_crops_the_centre():
    a = np.zeros((40, 120, 3), np.uint8)
    a[:, 50:70] = 255                                 # a white band in the middle
    out = fit_frames(a, 64, 64)                       # 40 -> 64 (x1.6): 64 x 192, keep columns 64..127
    assert out.shape == (1, 64, 64, 3) and out.dtype == np.uint8
    assert out[0, 32, 32].min() > 250 and out[0, 32, 0].max() < 5 and out[0, 32, 63].max() < 5
    clip = np.stack([a, a])
    assert fit_frames(clip, 30, 90).shape == (2, 30, 90, 3)
    same = picture()
    assert np.array_equal(fit_frames(same, 64, 64)[0], same)
    assert check_frames(same).shape == (1, 64, 64, 3)


def test_chunking_rule():
    # first chunk of a video: 1 + 4(T-1) = 9 frames, later chunks 12 (T = 3 latents, stride 4)
    assert [context_chunks(n, 3, 4, first=True) for n in (1, 9, 10, 21, 22)] == [1, 1, 2, 2, 3]
    assert [context_chunks(n, 3, 4, first=False) for n in (1, 12, 13)] == [1, 1, 2]
    clip = np.arange(10, dtype=np.uint8)[:, None, None, None].repeat(3, -1)
    padded = pad_front(clip, 2, 3, 4, first=True)    # padded at the front: the clip's last frame ends the context
    assert len(padded) == 21 and (padded[:12, 0, 0, 0] == 0).all() and list(padded[-9:, 0, 0, 0]) == list(range(1, 10))
    assert len(pad_front(clip[:1], 1, 3, 4, first=False)) == 13   # the cue's leading 'previous frame'


def test_encode_context_chunk_by_chunk(gen):
    vae = gen.vae
    clip = fit_frames(np.stack([picture(seed=i) for i in range(21)]), 64, 64)
    chunks = encode_context(vae, clip, 3, first=True)
    assert len(chunks) == 2 and all(c.shape == (1, 16, 3, 8, 8) for c in chunks)
    x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    assert torch.allclose(chunks[0], vae.encode(x[:, :, :9]), atol=1e-5)
    assert torch.allclose(chunks[1], vae.encode(x[:, :, 8:21])[:, :, 1:], atol=1e-5)
    cue = encode_context(vae, clip[:1], 3, first=False)
    assert len(cue) == 1 and cue[0].shape == (1, 16, 3, 8, 8)
    with pytest.raises(StartFramesError, match="at most"):
        encode_context(vae, np.repeat(clip[:1], 9 + 12 * MAX_START_CHUNKS, axis=0), 3, first=True)


def test_start_picture_is_committed_as_context_and_the_decoder_continues_from_it(gen):
    img = picture()
    with gen.open("", seed=3, cache="packed", start=img) as s:
        committed = []
        finish = s._finish
        s._finish = lambda x0, slot, prompt, decode, row=None: (committed.append(x0.clone()), finish(x0, slot, prompt, decode, row))[1]
        frames = s.next_chunk()
        assert len(frames) == 12                      # a continuation: 4T frames, not the first chunk's 9
        assert s.cache.chunks_seen == 2               # the picture's chunk, then the generated one
        assert s.cache.sink_filled == 1               # the tiny preset's sink holds the picture
        assert s.stats()["start_frames"] == 1 and s.stats()["frames"] == 12
        start_latents = encode_context(gen.vae, gen.fit(img), 3, first=True)[0]
        assert torch.allclose(committed[0], start_latents)
        # decoding picture + generated chunk in one go gives the picture's 9 frames, then exactly these 12
        whole = gen.vae.decode(torch.cat(committed, dim=2))
        from packcache.vae import frames_to_uint8
        assert np.array_equal(frames_to_uint8(whole)[0, 9:], frames)


def test_picture_changes_the_stream_and_reset_replays_it(gen):
    with gen.open("a red circle", seed=5) as s:
        plain = s.next_chunk()
    with gen.open("a red circle", seed=5, start=picture()) as s:
        first = s.next_chunk()
        s.next_chunk()
        s.reset()
        again = s.next_chunk()
        assert s.cache.chunks_seen == 2
    assert not np.array_equal(plain[-12:], first)
    assert np.array_equal(first, again)


@pytest.mark.parametrize("cache", ["packed", "window", "full"])
def test_start_clip_spans_several_chunks(gen, cache):
    clip = np.stack([picture(seed=i) for i in range(21)])   # 2 chunks of context
    with gen.open("", seed=1, cache=cache, start=clip) as s:
        assert len(s.next_chunk()) == 12
        assert s.cache.chunks_seen == 3


@pytest.mark.parametrize("transition", ["cut", "recache"])
def test_image_cue_mid_stream(gen, transition):
    with gen.open("a red circle", seed=2) as s:
        s.next_chunk()
        s.next_chunk()
        at = s.set_prompt("", transition=transition, image=picture(seed=9))
        assert at == 2
        frames = s.next_chunk()
        assert len(frames) == 12 and s.chunk_index == 3 and s.prompt == ""
        assert s.cache.chunks_seen == 4               # 2 generated, the picture, the new chunk
        assert s.stats()["start_frames"] == 0         # a cue, not the start: a reset does not replay it
        s.reset()
        s.next_chunk()
        assert s.cache.chunks_seen == 1


def test_picture_before_the_first_chunk_becomes_the_start(gen):
    img = picture(seed=4)
    with gen.open("", seed=8, start=img) as s:
        want = s.next_chunk()
    with gen.open("a blue square", seed=8) as s:
        assert s.set_prompt("", image=img) == 0
        got = s.next_chunk()
        assert s.stats()["start_frames"] == 1
        s.reset()
        assert np.array_equal(s.next_chunk(), got)
    assert np.array_equal(want, got)


def test_restart_from_a_picture_is_one_atomic_call(gen):
    with gen.open("a red circle", seed=6) as s:
        s.next_chunk()
        assert s.set_prompt("", image=picture(seed=3), restart=True) == 0
        assert len(s.next_chunk()) == 12 and s.chunk_index == 1
        assert s.stats()["start_frames"] == 1 and s.cache.chunks_seen == 2


def test_no_picture_no_cost(gen, monkeypatch):
    """Without a picture nothing of this runs: no context is encoded or committed."""
    import packcache.generator as G

    def boom(*a, **k):
        raise AssertionError("context encoded")
    monkeypatch.setattr(G, "encode_context", boom)
    with gen.open("a red circle", seed=0) as s:
        assert len(s.next_chunk()) == 9
        s.set_prompt("a blue square", transition="recache")
        s.next_chunk()


def test_batched_and_snapshotted_sessions_keep_their_pictures(gen, tmp_path):
    """A picture-only session batches with a prompted one and equals its solo run; a snapshot carries the start
    picture (a reset after restore replays it) and a queued image cue."""
    def solo(steps):
        with gen.open("", seed=3, start=picture(seed=5)) as s:
            return [s.next_chunk() for _ in range(steps)]

    ref = solo(3)
    with gen.open("", seed=3, start=picture(seed=5)) as a, gen.open("a red circle", seed=4) as b:
        for k in range(2):
            out = gen.next_chunks([a, b])
            assert not isinstance(out[0], Exception), out[0]
            assert np.array_equal(out[0], ref[k])
        a.set_prompt("", image=picture(seed=6))          # a cue waiting for the next chunk
        path = tmp_path / "pic.snapshot.safetensors"
        a.snapshot(path)
        want = a.next_chunk()
        a.reset()
        want_reset = a.next_chunk()
    with gen.restore(path) as r:
        assert np.array_equal(r.next_chunk(), want)       # the cue was committed after the restore too
        r.reset()
        assert np.array_equal(r.next_chunk(), want_reset)  # and the start picture survived for the reset
    assert np.array_equal(want_reset, ref[0])
