"""Session snapshots (packcache/snapshot.py): a restored session continues bit for bit, in another process, for
every cache kind, mid-blend and around a prompt switch; a bad file gets one clear SnapshotError."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from packcache import PackCacheError, SnapshotError, snapshot_info, snapshot_tensors

ROOT = Path(__file__).resolve().parent.parent
P0 = "a red circle bouncing"
# One never-stopped run per cache kind: {chunk index: (text, transition, blend_chunks) queued before that chunk},
# and the chunk indices after which a snapshot is taken. A switch queued at a snapshot's index is still pending.
RUNS = {
    "packed": ({4: ("a blue triangle", "recache", 4), 6: ("a green square", "blend", 3)}, (4, 5, 7), 9),
    "window": ({2: ("a green square", "blend", 3)}, (3,), 5),
    "full": ({2: ("a green square", "cut", 4)}, (3,), 5),
}
SNAPSHOTS = [(kind, at) for kind, (_, ats, _) in RUNS.items() for at in ats]
AFTER = 2   # chunks compared after each snapshot


def produce(out: Path) -> None:
    """In a separate process: each run, snapshotted on the way; its frames are the never-stopped reference."""
    from packcache import Generator

    torch.set_num_threads(1)
    gen = Generator.from_preset("tiny", device="cpu", dtype=torch.float32)
    for kind, (switches, ats, total) in RUNS.items():
        frames = []
        with gen.open(P0, seed=5, cache=kind) as s:
            for i in range(total):
                if i in switches:
                    text, transition, n = switches[i]
                    s.set_prompt(text, transition=transition, blend_chunks=n)
                if i in ats:
                    s.snapshot(out / f"{kind}-{i}.snapshot.safetensors", extra={"at": i})
                frames.append(s.next_chunk())
        np.save(out / f"{kind}.npy", np.stack(frames[1:]))   # the first chunk has fewer frames


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    out = tmp_path_factory.mktemp("snapshots")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind,at", SNAPSHOTS)
def test_restored_session_continues_bit_for_bit_in_another_process(tiny_generator, produced, kind, at):
    path = produced / f"{kind}-{at}.snapshot.safetensors"
    info = snapshot_info(path)
    assert (info.chunk_index, info.cache, info.preset, info.extra) == (at, kind, "tiny", {"at": at})
    reference = np.load(produced / f"{kind}.npy")
    with tiny_generator.restore(path) as s:
        assert s.chunk_index == at and s.cache_kind == kind
        if (kind, at) == ("packed", 4):       # the state each case is about really is there
            assert s._pending is not None and s.prompt == P0
        if (kind, at) == ("packed", 7):       # mid-blend, mid bank full (evictions happened)
            assert s._blend is not None and int(s.cache.mid_valid.sum()) == tiny_generator.preset.cache.mid_capacity
        if kind == "window":
            assert s._blend is not None
        restored = []
        for i in range(at, at + AFTER):
            if i in RUNS[kind][0] and i != at:   # a switch queued at `at` is inside the snapshot (pending)
                text, transition, n = RUNS[kind][0][i]
                s.set_prompt(text, transition=transition, blend_chunks=n)
            restored.append(s.next_chunk())
        assert s.chunk_index == at + AFTER
    for i, frames in enumerate(restored):
        ref = reference[at + i - 1]
        assert frames.shape == ref.shape and np.array_equal(frames, ref), f"{kind}: chunk {at + i} differs"


def test_snapshot_of_a_restored_session_holds_the_same_state(tiny_generator, tmp_path):
    """Restore is complete: snapshotting right after a restore writes the very same tensors."""
    with tiny_generator.open(P0, seed=2) as s:
        s.next_chunk()
        s.next_chunk()
        s.snapshot(tmp_path / "a.snapshot.safetensors")
    with tiny_generator.restore(tmp_path / "a.snapshot.safetensors") as r:
        r.snapshot(tmp_path / "b.snapshot.safetensors")
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a.snapshot.safetensors"), load_file(tmp_path / "b.snapshot.safetensors")
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- bad files: one clear SnapshotError each ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tiny_generator, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "s.snapshot.safetensors"
    with tiny_generator.open(P0, seed=1) as s:
        s.next_chunk()
        s.next_chunk()
        s.snapshot(path, extra={"k": 1}, extra_tensors={"frames": torch.arange(6, dtype=torch.uint8)})
    return path


def _header_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _expect(gen, path, match):
    with pytest.raises(SnapshotError, match=match) as err:
        gen.restore(path)
    assert isinstance(err.value, PackCacheError) and "\n" not in str(err.value)


def test_truncated_file(tiny_generator, good, tmp_path):
    data = good.read_bytes()
    bad = tmp_path / "t.snapshot.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    _expect(tiny_generator, bad, "truncated or corrupted")
    bad.write_bytes(data[:20])
    _expect(tiny_generator, bad, "truncated or corrupted")


def test_corrupted_tensor_bytes(tiny_generator, good, tmp_path):
    data = bytearray(good.read_bytes())
    data[(_header_len(data) + len(data)) // 2] ^= 0x40
    bad = tmp_path / "c.snapshot.safetensors"
    bad.write_bytes(bytes(data))
    _expect(tiny_generator, bad, "checksum")


def test_corrupted_header(tiny_generator, good, tmp_path):
    data = bytearray(good.read_bytes())
    data[_header_len(data) // 2] = ord("\x01")
    bad = tmp_path / "h.snapshot.safetensors"
    bad.write_bytes(bytes(data))
    _expect(tiny_generator, bad, "snapshot")


def _rewrite(good: Path, out: Path, **meta) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(good), "pt") as f:
        metadata = dict(f.metadata())
    metadata.update(meta)
    save_file(load_file(good), str(out), metadata=metadata)
    return out


def test_newer_format_version(tiny_generator, good, tmp_path):
    bad = _rewrite(good, tmp_path / "v.snapshot.safetensors", format_version="99")
    _expect(tiny_generator, bad, "format 99.*upgrade")
    with pytest.raises(SnapshotError, match="format 99"):
        snapshot_info(bad)


def test_other_preset_config_weights_or_dtype(tiny_generator, good, tmp_path):
    from packcache import Generator
    ident = snapshot_info(good).identity
    bad = _rewrite(good, tmp_path / "p.snapshot.safetensors", identity=json.dumps({**ident, "preset": "toy"}))
    _expect(tiny_generator, bad, "preset 'toy'")
    other_config = Generator.from_preset("tiny", device="cpu", compression="pool")
    _expect(other_config, good, "different configuration")
    other_weights = Generator.from_preset("tiny", device="cpu", seed=1)
    _expect(other_weights, good, "different model weights")
    other_dtype = Generator.from_preset("tiny", device="cpu", dtype=torch.bfloat16)
    _expect(other_dtype, good, "float32.*bfloat16")


def test_not_a_snapshot_or_missing(tiny_generator, tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    _expect(tiny_generator, plain, "not a session snapshot")
    _expect(tiny_generator, tmp_path / "nope.snapshot.safetensors", "no snapshot")


def test_extra_tensors_and_info_round_trip(good):
    info = snapshot_info(good)
    assert info.chunk_index == 2 and info.prompt == P0 and info.extra == {"k": 1} and info.tensor_bytes > 0
    assert torch.equal(snapshot_tensors(good)["frames"], torch.arange(6, dtype=torch.uint8))
    assert oct(good.stat().st_mode & 0o777) == oct(0o600)


def test_snapshot_refused_while_closed(tiny_generator, tmp_path):
    s = tiny_generator.open(P0)
    s.close()
    with pytest.raises(SnapshotError, match="closed"):
        s.snapshot(tmp_path / "x.snapshot.safetensors")
    assert not list(tmp_path.iterdir())


if __name__ == "__main__":
    produce(Path(sys.argv[1]))


def test_a_restored_session_continues_its_previous_chunk(tiny_generator, tmp_path):
    """With `continue_from_step` the next chunk starts from the last one's latents: they are part of the state, so
    a restored session's next chunk is the one the original would have drawn."""
    from dataclasses import replace

    from packcache.sampler import FlowSampler
    saved = tiny_generator.sampler
    tiny_generator.sampler = FlowSampler(replace(saved.config, continue_from_step=1))
    try:
        with tiny_generator.open(P0, seed=5) as s:
            s.next_chunk()
            s.next_chunk()
            s.snapshot(tmp_path / "c.snapshot.safetensors")
            want = [s.advance() for _ in range(2)]
        with tiny_generator.restore(tmp_path / "c.snapshot.safetensors") as r:
            assert r._first_step() == 1
            got = [r.advance() for _ in range(2)]
    finally:
        tiny_generator.sampler = saved
    for a, b in zip(want, got):
        assert torch.equal(a, b)
