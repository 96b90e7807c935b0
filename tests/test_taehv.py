"""TAEHV decoder: the published key layout loads, streaming equals one-shot and a frame-by-frame reference,
frame counts match the Wan VAE's stream (9 then 12 per 3-latent-frame chunk), bad files get one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from packcache.errors import WeightsError
from packcache.taehv import MemBlock, TAEHVModel, TAEHVStream, TGrow, load_taehv, model_from_state_dict

SMALL = dict(widths=(16, 8, 8, 8))


def random_checkpoint(path, z=16, widths=(256, 128, 64, 64), strides=(1, 2, 2), with_encoder=True, seed=0):
    """A random state dict in the taew2_1 layout (plus an encoder key, which real files have and we ignore)."""
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in TAEHVModel(z, widths, strides).state_dict().items()}
    if with_encoder:
        state["encoder.0.weight"] = torch.randn(64, 3, 3, 3)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def test_published_layout_keys_and_size(tmp_path):
    state = random_checkpoint(tmp_path / "taew2_1.pth")
    dec = {k: tuple(v.shape) for k, v in state.items() if k.startswith("decoder.")}
    # the taew2_1 decoder layout: conv 16->256 at index 1, MemBlocks 3-5 / 9-11 / 15-17, TGrow 7 / 13 / 19,
    # bias-free convs 8 / 14 / 20 between stages, the output conv at 22
    assert dec["decoder.1.weight"] == (256, 16, 3, 3)
    assert dec["decoder.3.conv.0.weight"] == (256, 512, 3, 3) and dec["decoder.3.conv.4.bias"] == (256,)
    assert dec["decoder.7.conv.weight"] == (256, 256, 1, 1)
    assert dec["decoder.13.conv.weight"] == (256, 128, 1, 1)
    assert dec["decoder.19.conv.weight"] == (128, 64, 1, 1)
    assert dec["decoder.8.weight"] == (128, 256, 3, 3) and "decoder.8.bias" not in dec
    assert dec["decoder.22.weight"] == (3, 64, 3, 3)
    assert not any(".skip." in k for k in dec)              # equal widths: identity skips, no weights
    n = sum(np.prod(s) for s in dec.values())
    assert 9e6 < n < 12e6                                    # ~11.3 M with the encoder; the decoder alone ~9.8 M
    d = load_taehv(tmp_path / "taew2_1.pth", 16, 4, 8)
    assert d.model.time_strides == (1, 2, 2) and d.model.time_upscale == 4 and d.model.space_upscale == 8
    for k, v in d.model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def _reference_decode(model: TAEHVModel, latents: torch.Tensor) -> torch.Tensor:
    """Frame by frame, as the architecture is defined: each MemBlock sees its input now and one step earlier;
    TGrow emits `stride` frames per input frame. latents (1, z, T, h, w) -> (1, 4T, 3, H, W) in [0, 1]."""
    memory: dict[int, torch.Tensor] = {}

    def run(i: int, x: torch.Tensor) -> list[torch.Tensor]:
        if i == len(model.decoder):
            return [x]
        layer = model.decoder[i]
        if isinstance(layer, MemBlock):
            past = memory.get(i, torch.zeros_like(x))
            memory[i] = x
            return run(i + 1, layer(x, past))
        if isinstance(layer, TGrow):
            y = layer.conv(x)
            return [f for part in y.chunk(layer.stride, 1) for f in run(i + 1, part)]
        return run(i + 1, layer(x))

    frames = [f for t in range(latents.shape[2]) for f in run(0, latents[:, :, t])]
    return torch.stack(frames, 1).clamp(0, 1)


def test_streaming_equals_one_shot_and_the_frame_by_frame_reference(tmp_path):
    random_checkpoint(tmp_path / "small.pth", widths=SMALL["widths"])
    dec = load_taehv(tmp_path / "small.pth", 16, 4, 8)
    torch.manual_seed(1)
    z = torch.randn(1, 16, 9, 4, 5)
    stream = dec.stream_decoder()
    parts = [stream.decode(z[:, :, i:i + 3]) for i in (0, 3, 6)]
    assert [p.shape[2] for p in parts] == [9, 12, 12]       # 1 + 4*2, then 4*3: the Wan VAE's stream
    assert parts[0].shape[-2:] == (32, 40) and parts[0].dtype == torch.float32
    streamed = torch.cat(parts, 2)
    one_shot = dec.stream_decoder().decode(z)
    torch.testing.assert_close(streamed, one_shot, rtol=1e-5, atol=1e-5)
    ref = _reference_decode(dec.model, z)[:, 3:] * 2 - 1     # drop the 3 startup frames, to [-1, 1]
    torch.testing.assert_close(streamed, ref.transpose(1, 2), rtol=1e-4, atol=1e-5)
    assert streamed.min() >= -1 and streamed.max() <= 1


def test_a_wider_stored_tgrow_keeps_its_last_time_step(tmp_path):
    state = random_checkpoint(tmp_path / "wide.pth", widths=SMALL["widths"], strides=(2, 2, 2))
    model = model_from_state_dict({k: v for k, v in state.items() if k.startswith("decoder.")}, time_upscale=4)
    assert model.time_strides == (1, 2, 2)
    torch.testing.assert_close(model.decoder[7].conv.weight, state["decoder.7.conv.weight"][16:])


def test_safetensors_and_bad_files(tmp_path):
    random_checkpoint(tmp_path / "light.safetensors", widths=SMALL["widths"], with_encoder=False)
    assert load_taehv(tmp_path / "light.safetensors", 16, 4, 8).model.latent_channels == 16
    with pytest.raises(WeightsError, match="not found"):
        load_taehv(tmp_path / "missing.pth", 16, 4, 8)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_taehv(tmp_path / "junk.pth", 16, 4, 8)
    torch.save({"encoder.0.weight": torch.zeros(1)}, tmp_path / "enc.pth")
    with pytest.raises(WeightsError, match="no 'decoder.' keys"):
        load_taehv(tmp_path / "enc.pth", 16, 4, 8)
    random_checkpoint(tmp_path / "z48.pth", z=48, widths=SMALL["widths"])
    with pytest.raises(WeightsError, match="48 latent channels"):
        load_taehv(tmp_path / "z48.pth", 16, 4, 8)


def test_a_session_streams_taehv_frames_with_the_wan_vae_timing(tmp_path, tiny_generator):
    gen = tiny_generator
    random_checkpoint(tmp_path / "taew2_1.pth", widths=SMALL["widths"])
    gen.use_decoder("taehv", tmp_path / "taew2_1.pth")
    try:
        assert gen.runtime_info()["decoder"] == "taehv"
        with gen.open("a red circle", seed=0) as s:       # packed cache: the LR branch compresses TAEHV pixels
            shapes = [s.next_chunk().shape for _ in range(3)]
            assert s.stats()["frames"] == 9 + 2 * 12
            assert s.clock.rows()[-1]["compress"] > 0
        assert shapes == [(9, 64, 64, 3)] + [(12, 64, 64, 3)] * 2
        with pytest.raises(WeightsError, match="needs its weights"):
            gen.use_decoder("taehv")
    finally:
        gen.use_decoder("wan")
    assert gen.runtime_info()["decoder"] == "wan"


def test_decode_batched_equals_decoding_alone_and_rejects_unlike_streams(tmp_path):
    random_checkpoint(tmp_path / "small.pth", widths=SMALL["widths"])
    dec = load_taehv(tmp_path / "small.pth", 16, 4, 8)
    torch.manual_seed(2)
    alone = [dec.stream_decoder() for _ in range(3)]
    stacked = [dec.stream_decoder() for _ in range(3)]
    for _ in range(2):   # a first chunk (startup frames dropped) and a continuation (MemBlock memories carried)
        xs = [torch.randn(1, 16, 3, 4, 5) for _ in range(3)]
        want = [st.decode(x) for st, x in zip(alone, xs)]
        got = TAEHVStream.decode_batched(stacked, xs)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(alone, stacked):
        assert all(torch.equal(m, n) for m, n in zip(a._memory, b._memory))
        assert all(m._base is None for m in b._memory)          # each stream owns its memory, not a batch view
    fresh = dec.stream_decoder()
    x = torch.randn(1, 16, 3, 4, 5)
    assert fresh.batch_key(x) != stacked[0].batch_key(x)        # a first chunk and a continuation: not alike
    with pytest.raises(ValueError):
        TAEHVStream.decode_batched([fresh, stacked[0]], [x, x])
    assert not fresh.started and fresh._memory is None          # a refused batch leaves the streams as they were


def test_sessions_batched_together_decode_taehv_in_one_pass(tmp_path, tiny_generator, monkeypatch):
    """The batched step's finish groups TAEHV streams like Wan ones: one decoder pass for both sessions, and each
    session's frames are the ones it gets alone."""
    gen = tiny_generator
    random_checkpoint(tmp_path / "taew2_1.pth", widths=SMALL["widths"])
    gen.use_decoder("taehv", tmp_path / "taew2_1.pth")
    calls = []
    real = TAEHVStream.decode_batched.__func__
    monkeypatch.setattr(TAEHVStream, "decode_batched",
                        classmethod(lambda cls, s, x: calls.append(len(s)) or real(cls, s, x)))
    try:
        prompts = [("a red circle", 1), ("a blue square", 2)]
        want = []
        for prompt, seed in prompts:
            with gen.open(prompt, seed=seed) as s:
                want.append([s.next_chunk() for _ in range(3)])
        sessions = [gen.open(prompt, seed=seed) for prompt, seed in prompts]
        try:
            got = [gen.next_chunks(sessions) for _ in range(3)]
        finally:
            for s in sessions:
                s.close()
        for step, results in enumerate(got):
            for i, frames in enumerate(results):
                assert np.array_equal(frames, want[i][step]), f"session {i} chunk {step}"
        assert calls and all(n == 2 for n in calls), calls
    finally:
        gen.use_decoder("wan")


def test_a_session_with_taehv_snapshots_and_continues_bit_for_bit(tmp_path, tiny_generator):
    """Restarts and cluster moves keep a TAEHV stream: a session written to a snapshot file after 2 chunks and
    restored continues with the frames the original makes; a Wan-decoder generator refuses that snapshot clearly."""
    from packcache.errors import SnapshotError

    gen = tiny_generator
    random_checkpoint(tmp_path / "taew2_1.pth", widths=SMALL["widths"])
    path = tmp_path / "s.snapshot.safetensors"
    gen.use_decoder("taehv", tmp_path / "taew2_1.pth")
    try:
        with gen.open("a red circle", seed=3) as s:
            s.next_chunk()
            s.next_chunk()
            s.snapshot(path)
            want = [s.next_chunk() for _ in range(2)]
        with gen.restore(path) as r:
            got = [r.next_chunk() for _ in range(2)]
        for a, b in zip(got, want):
            assert np.array_equal(a, b)
    finally:
        gen.use_decoder("wan")
    with pytest.raises(SnapshotError, match="another decoder"):
        gen.restore(path)
