"""Session snapshots: one versioned file holding the complete state of a `GenerationSession` between chunks.

Why it can exist at all: the packed cache bounds a session's state (under 1 MB for the toy model, ~4-5 GB at the
paper's real-size settings) however long the stream has run, so a stream can be written out, moved to another
process and continued there, bit for bit.

File format (a plain safetensors file, so any safetensors reader can open it):
    tensors   every tensor of the state under its dotted path ("cache.sink_k", "decoder.cache.3", "extra.frames")
    metadata  (safetensors' str -> str header)
        format          "packforcing-session"
        format_version  FORMAT_VERSION; a reader refuses newer files (it cannot know what they hold)
        identity        JSON: preset name, hash of the preset's configuration, fingerprint of the weights, dtype
        state           JSON tree of the state; tensors appear as {"__tensor__": "<key>"}
        checksum        crc32 over every (key, tensor bytes) in sorted key order
        summary         JSON: chunk index, prompt, cache kind, creation time, tensor bytes (read without tensors)
        extra           JSON the caller attached (the server keeps its own per-session state here)

Each state holder has its own `state_dict()` / `load_state_dict()` pair (session, cache, importance, streaming
decoder): a new field is one line there. The state tree may hold tensors, None, numbers, strings, lists and
str-keyed dicts. Invariant (tests/test_snapshot.py): a restored session's next chunks equal those of the session
that never stopped, bit for bit, on the same device — in another process, for every cache kind, mid-blend and
right after a prompt switch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import SnapshotError

if TYPE_CHECKING:
    from .generator import GenerationSession, Generator

log = logging.getLogger(__name__)

FORMAT = "packforcing-session"
FORMAT_VERSION = 1
SUFFIX = ".snapshot.safetensors"
_TENSOR = "__tensor__"


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot's header says, read without loading its tensors."""

    path: str
    version: int
    identity: dict
    chunk_index: int
    prompt: str
    cache: str
    created: float          # wall-clock time.time() when written
    tensor_bytes: int
    extra: dict

    @property
    def preset(self) -> str:
        return self.identity.get("preset", "?")


# ---- writing --------------------------------------------------------------------------------------------------
def write_snapshot(session: "GenerationSession", path: str | Path, extra: dict | None = None,
                   extra_tensors: dict[str, torch.Tensor] | None = None) -> SnapshotInfo:
    """Write `session`'s state to `path` atomically (a temporary file, fsync, rename). Call between chunks.

    `extra` (JSON-able) and `extra_tensors` are stored beside the state for the caller (`snapshot_info`,
    `snapshot_tensors`); the engine ignores them on restore."""
    from safetensors.torch import save_file

    path = Path(path)
    state = session.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "", tensors, {}, set())
    for name, t in (extra_tensors or {}).items():
        tensors[f"extra.{name}"] = _to_cpu(t, set())
    summary = {"chunk_index": session.chunk_index, "prompt": session.prompt, "cache": session.cache_kind,
               "created": time.time(), "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "identity": json.dumps(generator_identity(session.gen)),
        "state": json.dumps(tree),
        "checksum": _checksum(tensors),
        "summary": json.dumps(summary),
        "extra": json.dumps(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)          # a snapshot holds a resume key: readable by the server's user only
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write snapshot {path}: {exc.strerror or exc}") from None
    return _info(path, metadata)


def _to_cpu(t: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """A contiguous CPU tensor that shares storage with no tensor already collected (safetensors refuses that)."""
    out = t.detach().to("cpu").contiguous()
    if out.numel():
        ptr = out.untyped_storage().data_ptr()
        if ptr in storages or out is t:      # `t` itself is live state: never hand the writer a buffer in use
            out = out.clone()
        storages.add(out.untyped_storage().data_ptr())
    return out


def _flatten(node: Any, key: str, tensors: dict, seen: dict[int, str], storages: set[int]) -> Any:
    if isinstance(node, torch.Tensor):
        if id(node) in seen:                 # one tensor referenced twice (a blend's target is the current text)
            return {_TENSOR: seen[id(node)]}
        name = key or "root"
        tensors[name] = _to_cpu(node, storages)
        seen[id(node)] = name
        return {_TENSOR: name}
    if isinstance(node, dict):
        for k in node:
            if not isinstance(k, str) or k == _TENSOR:
                raise SnapshotError(f"state key {k!r} at {key or 'root'} cannot be stored")
        return {k: _flatten(v, f"{key}.{k}" if key else k, tensors, seen, storages) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_flatten(v, f"{key}.{i}", tensors, seen, storages) for i, v in enumerate(node)]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise SnapshotError(f"state at {key or 'root'} is a {type(node).__name__}, which a snapshot cannot store")


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for name in sorted(tensors):
        t = tensors[name]
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"crc32:{crc:08x}"


# ---- identity -------------------------------------------------------------------------------------------------
def generator_identity(gen: "Generator") -> dict:
    """What a snapshot must match to continue bit for bit: preset, its configuration, the weights, the dtype.

    The weights' fingerprint hashes every parameter's shape and 32 evenly spaced values (one small transfer per
    model, cached on the generator), which tells apart checkpoints without reading gigabytes."""
    cached = gen.__dict__.get("_snapshot_identity")
    if cached is not None:
        return cached
    preset = json.dumps(dataclasses.asdict(gen.preset), sort_keys=True, default=str)
    modules = [("transformer", gen.model), ("vae", gen.vae.vae), ("compressor", gen.compressor)]
    text_model = getattr(gen.text_encoder, "model", None)
    if isinstance(text_model, torch.nn.Module):
        modules.append(("text", text_model))
    h = hashlib.sha256()
    for prefix, module in modules:
        samples = []
        for name, p in sorted(list(module.named_parameters()) + list(module.named_buffers())):
            h.update(f"{prefix}.{name}{tuple(p.shape)}".encode())
            flat = p.detach().reshape(-1)
            if flat.numel():
                idx = torch.linspace(0, flat.numel() - 1, min(32, flat.numel()), device=flat.device).long()
                samples.append(flat[idx].float())
        if samples:
            h.update(torch.cat(samples).cpu().numpy().tobytes())
    ident = {"preset": gen.preset.name, "preset_hash": hashlib.sha256(preset.encode()).hexdigest()[:16],
             "weights_hash": h.hexdigest()[:16], "dtype": str(gen.dtype).replace("torch.", "")}
    gen.__dict__["_snapshot_identity"] = ident
    return ident


def _check_identity(gen: "Generator", ident: dict, path: Path) -> None:
    mine = generator_identity(gen)
    if ident.get("preset") != mine["preset"]:
        raise SnapshotError(f"{path.name} was taken with preset {ident.get('preset')!r}; this generator runs "
                            f"{mine['preset']!r}")
    if ident.get("preset_hash") != mine["preset_hash"]:
        raise SnapshotError(f"{path.name} was taken with a different configuration of preset {mine['preset']!r} "
                            "(another version or other overrides)")
    if ident.get("dtype") != mine["dtype"]:
        raise SnapshotError(f"{path.name} was taken in {ident.get('dtype')}; this generator runs {mine['dtype']}")
    if ident.get("weights_hash") != mine["weights_hash"]:
        raise SnapshotError(f"{path.name} was taken with different model weights than this generator's")


# ---- reading --------------------------------------------------------------------------------------------------
def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_file():
        raise SnapshotError(f"no snapshot at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types (truncated, bad header)
        raise SnapshotError(f"{path.name} is not a readable snapshot (truncated or corrupted): {exc}") from None
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"{path.name} is not a session snapshot (no {FORMAT!r} header)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise SnapshotError(f"{path.name} has an unreadable format version") from None
    if version > FORMAT_VERSION:
        raise SnapshotError(f"{path.name} has snapshot format {version}; this version reads up to "
                            f"{FORMAT_VERSION} (upgrade to restore it)")
    return meta


def _info(path: Path, meta: dict[str, str]) -> SnapshotInfo:
    try:
        summary, identity, extra = (json.loads(meta[k]) for k in ("summary", "identity", "extra"))
        return SnapshotInfo(str(path), int(meta["format_version"]), identity, int(summary["chunk_index"]),
                            str(summary["prompt"]), str(summary["cache"]), float(summary["created"]),
                            int(summary["tensor_bytes"]), extra)
    except (KeyError, ValueError, TypeError) as exc:
        raise SnapshotError(f"{path.name} has a corrupted header ({type(exc).__name__}: {exc})") from None


def snapshot_info(path: str | Path) -> SnapshotInfo:
    """The snapshot's header (preset, chunk index, prompt, the caller's `extra`), without loading tensors."""
    path = Path(path)
    return _info(path, _read_metadata(path))


def _load(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta = _read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise SnapshotError(f"{path.name} is not a readable snapshot (truncated or corrupted): {exc}") from None
    if _checksum(tensors) != meta.get("checksum"):
        raise SnapshotError(f"{path.name} is corrupted (checksum mismatch)")
    return meta, tensors


def snapshot_tensors(path: str | Path, prefix: str = "extra.") -> dict[str, torch.Tensor]:
    """The `extra_tensors` a snapshot was written with (names without the prefix), checksum verified."""
    _, tensors = _load(Path(path))
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if set(node) == {_TENSOR}:
            try:
                return tensors[node[_TENSOR]]
            except KeyError:
                raise SnapshotError(f"snapshot state names a missing tensor {node[_TENSOR]!r}") from None
        return {k: _unflatten(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_unflatten(v, tensors) for v in node]
    return node


def restore_session(gen: "Generator", path: str | Path) -> "GenerationSession":
    """A new session of `gen` continuing the snapshot at `path` (see `Generator.restore`)."""
    return restore_with_extra(gen, path)[0]


def restore_with_extra(gen: "Generator", path: str | Path
                       ) -> tuple["GenerationSession", SnapshotInfo, dict[str, torch.Tensor]]:
    """`restore_session` plus the snapshot's header and the `extra_tensors` it was written with (one read)."""
    from .generator import GenerationSession

    path = Path(path)
    if gen.device.type == "meta":
        raise SnapshotError("a generator on the meta device cannot restore sessions (sizing only)")
    meta, tensors = _load(path)
    try:
        ident, tree = json.loads(meta["identity"]), json.loads(meta["state"])
    except (KeyError, ValueError) as exc:
        raise SnapshotError(f"{path.name} has a corrupted header ({type(exc).__name__})") from None
    _check_identity(gen, ident, path)
    state = _unflatten(tree, tensors)
    try:
        session = GenerationSession(gen, state["prompt"], int(state["seed"]), state["cache_kind"])
    except KeyError as exc:
        raise SnapshotError(f"{path.name} lacks session field {exc}") from None
    try:
        session.load_state_dict(state)
    except SnapshotError:
        session.close()
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        session.close()
        raise SnapshotError(f"{path.name} does not fit this generator's session state "
                            f"({type(exc).__name__}: {exc})") from None
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return session, _info(path, meta), extra


def assign(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy a saved tensor into a live buffer in place (buffers never move: graph capture relies on it)."""
    if tuple(dst.shape) != tuple(src.shape):
        raise SnapshotError(f"snapshot {name} has shape {tuple(src.shape)}; this generator's is {tuple(dst.shape)}")
    dst.copy_(src)
