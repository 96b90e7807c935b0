"""Which compressed mid blocks each layer attends to, and which block a full bank evicts.

Score (PackForcing, after Deep Forcing): for mid block m, the raw scaled logits q.k/sqrt(d) between the queries of
the recent and current chunks and the block's keys, averaged over half of the heads. The logit sum is bilinear,

    sum_i sum_j q_i . k_j = (sum_i q_i) . (sum_j k_j),

so every query counts exactly at the cost of one dot product per block and head: no query subsampling. The cache
keeps each recent chunk's query sum from its commit pass (clean queries at t=0); the current chunk's queries come
from the first denoising step (pure noise on its own, which is why the paper adds the recent ones).

Calibration: blocks are ranked by their *mean per-token affinity*, the summed logits divided by the number of
query and key tokens (`block_scores`). Within one chunk it ranks exactly as the paper's raw sum (every block has the
same token count), and its scale is a single query-key logit whatever the tokens per block (2 in the toy model, 182
at real size), so the smoothing below behaves the same at every size. An earlier version averaged a softmax over
blocks of the raw sums: near uniform at 2 tokens per block and near one-hot at 182.

Smoothing (the known flicker pitfall of frequent set changes): each layer keeps an exponential moving average of
the affinities, centred per chunk (the mean over the bank is subtracted: a shift common to all blocks carries no
ranking information and would otherwise favour blocks that happened to be scored in high-affinity chunks). A layer
picks the top k of its average; with `importance_decay` 0 that is the paper's per-chunk top k. A full bank evicts
the block whose average, summed over layers, is lowest.

`fifo` selection (the paper's ablation baseline) attends to the k newest blocks and evicts the oldest.

The ranking is the paper's and is not learnt here, but what it ranks is the model's own queries and keys: the toy
model's optional `memory` training stage adds a hinge on `block_affinity` (toyworld/train_memory.py
`selection_loss`) so that a block holding what the stream will need outscores empty ones.
"""

from __future__ import annotations

import torch


def block_affinity(q_sum: torch.Tensor, q_count: int, key_sums: torch.Tensor, key_count: int,
                   head_fraction: float = 0.5) -> torch.Tensor:
    """Mean per-token affinity of each block for each batch row: (M, B).

    q_sum (B, H, D): the sum of the scoring queries (rotated to their packed positions), q_count of them;
    key_sums (M, B, H, D): each block's summed keys (rotated), key_count keys per block. The affinity is
    (q_sum . key_sum) / (q_count * key_count * sqrt(D)), averaged over the first round(H * head_fraction) heads
    ("half-head evaluation"). Differentiable: the memory stage's selection loss trains on it (toyworld/train_hr.py).
    """
    heads = max(1, round(q_sum.shape[1] * head_fraction))
    qs = q_sum[:, :heads].float()                                    # (B, h, D)
    ks = key_sums[:, :, :heads].float()                              # (M, B, h, D)
    logits = (ks * qs[None]).sum(-1) / (q_sum.shape[-1] ** 0.5 * q_count * key_count)   # (M, B, h)
    return logits.mean(dim=2)


def block_scores(q_sum: torch.Tensor, q_count: int, key_sums: torch.Tensor, key_count: int,
                 head_fraction: float = 0.5) -> torch.Tensor:
    """What the cache ranks by: `block_affinity` averaged over the batch, (M,)."""
    return block_affinity(q_sum, q_count, key_sums, key_count, head_fraction).mean(dim=1)


class BlockImportance:
    """Per-layer smoothed affinity of the mid bank's slots. State: `value`, (layers, slots) float32 on the CPU."""

    def __init__(self, layers: int, slots: int, decay: float):
        self.decay = decay
        self.value = torch.zeros(layers, slots)

    def add_block(self, slot: int, valid: torch.Tensor) -> None:
        """A new block starts at the mean of the blocks already there (neutral, neither favoured nor doomed)."""
        others = valid.clone()
        others[slot] = False
        self.value[:, slot] = self.value[:, others].mean(dim=1) if others.any() else 0.0

    def update(self, layer: int, scores: torch.Tensor, valid: torch.Tensor) -> None:
        """Fold one chunk's affinities (M,) of the valid slots into the layer's average, centred on their mean."""
        a = scores[valid].float().cpu()
        row = self.value[layer]
        row[valid] = self.decay * row[valid] + (1 - self.decay) * (a - a.mean())

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


def newest(chunk_ids: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """FIFO selection: slots of the k valid blocks with the highest chunk ids (unordered)."""
    masked = torch.where(valid, chunk_ids.float(), torch.tensor(float("-inf")))
    return torch.topk(masked, k).indices


def oldest(chunk_ids: torch.Tensor, valid: torch.Tensor, protect: int | None = None) -> int:
    """FIFO eviction: the valid slot with the lowest chunk id."""
    masked = torch.where(valid, chunk_ids.float(), torch.tensor(float("inf")))
    if protect is not None:
        masked[protect] = float("inf")
    return int(torch.argmin(masked))
