"""Checks that run before any model loads, so a wrong argument costs a second, not a model load, and ends in
one line (`PackCacheError`). Used by `python -m packcache.generate` and `run_server.py`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import PackCacheError, WeightsError


_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")   # NVIDIA, WSL, ROCm


def check_device(device: str | None) -> None:
    """The device exists on this machine (None: the default, which always does)."""
    if device is None:
        return
    if (device.split(":")[0] == "cuda" and sys.platform.startswith("linux")
            and not any(os.path.exists(d) for d in _GPU_NODES)):
        # answered without importing torch (tens of seconds on a loaded machine): no GPU driver node at all
        raise PackCacheError(f"--device {device} but no CUDA device is available (no GPU driver on this machine; "
                             "use --device cpu)")
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise PackCacheError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PackCacheError(f"--device {device} but no CUDA device is available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PackCacheError(f"--device {device} but this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise PackCacheError(f"--device {device} but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise PackCacheError(f"--device {device}: only cpu, cuda and mps are supported")


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.index.json"))


def check_model_dir(model_dir: str | Path) -> Path:
    """A diffusers-format Wan2.1 T2V folder with every part the generator loads (configs and weight files)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise WeightsError(f"model folder not found: {root}")
    for part, needs_weights in (("transformer", True), ("vae", True), ("text_encoder", True), ("tokenizer", False)):
        sub = root / part
        if not sub.is_dir():
            raise WeightsError(f"incomplete model folder: {sub} is missing (expected a diffusers-format Wan2.1 "
                               "folder: transformer/, vae/, text_encoder/, tokenizer/)")
        if part != "tokenizer" and not (sub / "config.json").is_file():
            raise WeightsError(f"incomplete model folder: {sub / 'config.json'} is missing")
        if needs_weights and not _has_weights(sub):
            raise WeightsError(f"incomplete model folder: no weight files (*.safetensors, *.bin) in {sub}")
        if part == "tokenizer" and not any(sub.iterdir()):
            raise WeightsError(f"incomplete model folder: {sub} is empty")
    return root


def check_checkpoint(path: str | Path | None) -> None:
    if path is not None and not Path(path).exists():
        raise WeightsError(f"checkpoint not found: {path}")
