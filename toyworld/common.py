"""Small helpers the training stages share: tensors from frames, the LR schedule, progress bars, loss plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().permute(3, 0, 1, 2) / 127.5 - 1.0


def noise_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise shaped like x on x's device, drawn on the CPU generator: every device draws the same."""
    return torch.randn(x.shape, generator=gen).to(x.device)


def cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def save_curve(path: Path, series: dict[str, list[float]], title: str) -> None:
    """Loss curves (moving average, log scale) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        if not ys:
            continue
        ys = np.asarray(ys, dtype=np.float64)
        k = max(1, len(ys) // 50)
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def progress(iterable, total: int, desc: str):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, mininterval=5.0, dynamic_ncols=True)
