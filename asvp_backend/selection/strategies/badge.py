"""BADGE: k-means++ seeding on gradient embeddings of the proxy (Ash et al. 2020).

docs/method.md, *Proxy and strategies*."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..proxy import Proxy
from ._common import candidate_indices, greedy_over_partitions, partitions, resolve_device, set_ranking, to_tensor
from .base import Ranking, SelectionError, SelectionInput, Strategy, register_strategy

#: reference constants ("from active learning at ImageNet scale"): pooled rows of the (C x H) gradient, area
POOLING_H = 16
POOLING_AREA = 512


def pooled_grad_embedding(
    hidden: torch.Tensor, logits: torch.Tensor, pool_h: int = POOLING_H, pool_area: int = POOLING_AREA
) -> torch.Tensor:
    """Gradient of the cross-entropy at the predicted label w.r.t. the last layer's weights,
    ``(softmax(z) - onehot(argmax z)) (x) h``, adaptive-average-pooled from (C, H) to ~``pool_area`` dims.

    The gradient is an outer product, and adaptive average pooling is separable, so pooling each factor
    first and then taking the outer product gives exactly ``adaptive_avg_pool2d`` of the full (C, H)
    matrix without ever building it.
    """
    c, h = logits.shape[1], hidden.shape[1]
    rows = min(pool_h, c)
    cols = min(pool_area // rows, h)
    p = torch.softmax(logits.float(), dim=1)
    p[torch.arange(p.shape[0], device=p.device), p.argmax(1)] -= 1.0
    a = F.adaptive_avg_pool1d(p.unsqueeze(1), rows).squeeze(1)  # (n, rows)
    b = F.adaptive_avg_pool1d(hidden.float().unsqueeze(1), cols).squeeze(1)  # (n, cols)
    return (a.unsqueeze(2) * b.unsqueeze(1)).reshape(p.shape[0], rows * cols)


@register_strategy
class BadgeStrategy(Strategy):
    """Uncertain *and* diverse batches: k-means++ seeding on pooled gradient embeddings.

    The first centre is the largest-norm embedding (the original BADGE code; most uncertain item), every next
    one is drawn with probability proportional to its squared distance to the nearest chosen centre, so
    indices are distinct and confident items (embedding near 0) are rarely drawn. Scale: candidates are a
    uniform subsample of at most ``max_candidates``, split into random partitions of at most
    ``partition_size`` that each pick their share (reference ``badge_partition_subset``: 320k into 20). Unlike
    the reference, partitions take turns (pick ``i`` from partition ``i mod P``) and count every earlier pick
    as a centre, so the first tasks served span the pool. Items not chosen are ordered by margin.
    ``device``: where embeddings and distances live (``auto`` = CUDA when present).
    """

    name: ClassVar[str] = "badge"
    requires_probs: ClassVar[bool] = True
    set_based: ClassVar[bool] = True

    def __init__(
        self,
        seed: int = 0,
        max_candidates: int | None = 100_000,
        partition_size: int | None = 10_000,
        embed_batch_size: int = 16_384,
        device: str = "cpu",
    ) -> None:
        super().__init__(seed, device)
        self.max_candidates = max_candidates
        self.partition_size = partition_size
        self.embed_batch_size = embed_batch_size

    def embed(self, proxy: Proxy, features: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        """Pooled gradient embeddings of ``features[indices]``, computed in batches (memory stays small)."""
        dev = resolve_device(self.device)
        out = []
        for s in range(0, indices.size, self.embed_batch_size):
            hid, logits = proxy.hidden_and_logits(features[indices[s : s + self.embed_batch_size]])
            out.append(pooled_grad_embedding(to_tensor(hid, dev), to_tensor(logits, dev)))
        return torch.cat(out) if out else torch.empty((0, 1), device=dev)

    @torch.no_grad()
    def rank(self, inp: SelectionInput, budget: int) -> Ranking:
        self._check(inp, budget)
        if inp.proxy is None:
            raise SelectionError("strategy 'badge' needs the fitted proxy in SelectionInput.proxy")
        rng = np.random.default_rng(self.seed)
        k = min(budget, inp.n)
        if k == 0:
            return set_ranking(np.empty(0, np.int64), inp, rng)
        cand = candidate_indices(inp.n, self.max_candidates, k, rng)
        emb = self.embed(inp.proxy, inp.features, cand)
        parts = partitions(cand.size, self.partition_size, rng)
        # the original BADGE starts from the largest gradient overall: visit the part holding it first
        top = int(torch.argmax((emb * emb).sum(1)))
        first = next(i for i, part in enumerate(parts) if np.isin(top, part))
        parts = parts[first:] + parts[:first]
        points = [emb[torch.from_numpy(part).to(emb.device)] for part in parts]
        no_centres = [torch.full((x.shape[0],), float("inf"), device=x.device) for x in points]

        def choose(dist: torch.Tensor, picked: torch.Tensor, x_sq: torch.Tensor) -> int:
            if torch.isinf(dist).all():
                return int(torch.argmax(x_sq))  # first centre: largest gradient norm
            return self._d2_sample(dist.masked_fill(picked, 0.0), picked, rng)

        picks = greedy_over_partitions(points, no_centres, k, choose)
        return set_ranking(cand[np.asarray([parts[p][j] for p, j in picks], np.int64)], inp, rng)

    @staticmethod
    def _d2_sample(weights: torch.Tensor, picked: torch.Tensor, rng: np.random.Generator) -> int:
        """Draw an index with probability proportional to ``weights`` (uniform over unpicked if all are 0)."""
        cum = torch.cumsum(weights.double(), 0)
        total = float(cum[-1])
        if total <= 0.0 or not np.isfinite(total):
            free = torch.nonzero(~picked).flatten()
            return int(free[int(rng.integers(free.numel()))])
        u = torch.tensor(rng.random() * total, dtype=torch.float64, device=cum.device)
        j = int(torch.searchsorted(cum, u, right=True))
        if j >= weights.numel() or bool(picked[j]):  # rounding at the very end of the cumulative sum
            j = int(torch.nonzero(weights > 0).max())
        return j
