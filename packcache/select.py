"""Dynamic top-k selection of compressed mid blocks, and the importance that decides eviction.

Score (PackForcing, after Deep Forcing): for mid block m, the raw scaled logits q.k/sqrt(d) summed over the current
chunk's queries and the block's keys, averaged over half of the heads. Because that sum is bilinear,
    sum_i sum_j q_i . k_j = (sum_i q_i) . (sum_j k_j),
it costs one dot product per block and head: no query subsampling is needed, every query counts exactly.

Selection is smoothed to avoid flicker (a known pitfall of frequent set changes): each layer keeps an exponential
moving average of the per-chunk softmax of scores, and picks the top k of that average. Eviction from a full bank
removes the block whose importance, summed over layers, is lowest (never plain FIFO).
"""

from __future__ import annotations

import torch


def block_scores(q: torch.Tensor, key_sums: torch.Tensor, head_fraction: float = 0.5) -> torch.Tensor:
    """q (B, N, H, D) rotated queries; key_sums (M, B, H, D) per-block sums of rotated keys -> scores (M,).

    The score of a block is mean over batch and the first ceil(H*head_fraction) heads of
    (mean_i q_i) . (sum_j k_j) / sqrt(D), i.e. the per-query average of the block's summed logits.
    """
    heads = max(1, round(q.shape[2] * head_fraction))
    q_mean = q[:, :, :heads].float().mean(dim=1)                    # (B, h, D)
    ks = key_sums[:, :, :heads].float()                              # (M, B, h, D)
    logits = (ks * q_mean[None]).sum(-1) / q.shape[-1] ** 0.5        # (M, B, h)
    return logits.mean(dim=(1, 2))


class BlockImportance:
    """Per-layer EMA importance of the mid bank's slots. State: (layers, slots) float32 on the CPU."""

    def __init__(self, layers: int, slots: int, decay: float):
        self.decay = decay
        self.value = torch.zeros(layers, slots)

    def add_block(self, slot: int, valid: torch.Tensor) -> None:
        """A new block starts at the mean importance of the blocks already there (neutral, not favoured)."""
        others = valid.clone()
        others[slot] = False
        self.value[:, slot] = self.value[:, others].mean(dim=1) if others.any() else 1.0

    def update(self, layer: int, scores: torch.Tensor, valid: torch.Tensor) -> None:
        p = torch.softmax(scores[valid].float().cpu(), dim=0)
        row = self.value[layer]
        row[valid] = self.decay * row[valid] + (1 - self.decay) * p

    def top_k(self, layer: int, k: int, valid: torch.Tensor) -> torch.Tensor:
        """Slots of the k most important valid blocks of this layer (unordered)."""
        masked = torch.where(valid, self.value[layer], torch.tensor(float("-inf")))
        return torch.topk(masked, k).indices

    def least_important(self, valid: torch.Tensor, protect: int | None = None) -> int:
        total = self.value.sum(dim=0).clone()
        total[~valid] = float("inf")
        if protect is not None:
            total[protect] = float("inf")
        return int(torch.argmin(total))

    # ---- snapshots (packcache/snapshot.py): every field that decides a future selection or eviction
    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        from .snapshot import assign
        assign(self.value, state["value"], "importance.value")
