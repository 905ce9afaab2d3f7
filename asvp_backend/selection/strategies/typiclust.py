"""TypiClust: cold-start selection of typical points from uncovered clusters (Hacohen et al. 2022)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA

from ._common import DIST_BLOCK, candidate_indices, resolve_device, set_ranking, to_tensor
from .base import Ranking, SelectionInput, Strategy, register_strategy


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def typicality(x: torch.Tensor, knn: int, ref_rows: np.ndarray | None = None) -> torch.Tensor:
    """``1 / mean squared distance to the knn nearest neighbours`` (self excluded) of every row of ``x``.

    Neighbours are searched among ``x[ref_rows]`` (all rows when None), which bounds the cost on big clusters.
    """
    n = x.shape[0]
    ref = x if ref_rows is None else x[torch.from_numpy(ref_rows).to(x.device)]
    in_ref = np.ones(n, bool) if ref_rows is None else np.isin(np.arange(n), ref_rows)
    k = min(knn, ref.shape[0] - 1)  # keep room for the self match, dropped below
    if k <= 0:
        return torch.ones(n, device=x.device)
    out = torch.empty(n, device=x.device)
    ref_sq = (ref * ref).sum(1)
    for s in range(0, n, DIST_BLOCK):
        xb = x[s : s + DIST_BLOCK]
        d = ((xb * xb).sum(1, keepdim=True) - 2.0 * xb @ ref.T + ref_sq).clamp_min_(0.0)
        near = torch.topk(d, k + 1, dim=1, largest=False).values  # ascending
        own = torch.from_numpy(in_ref[s : s + DIST_BLOCK]).to(x.device)
        mean = torch.where(own, near[:, 1:].mean(1), near[:, :k].mean(1))
        out[s : s + DIST_BLOCK] = 1.0 / (mean + 1e-5)
    return out


@register_strategy
class TypiClustStrategy(Strategy):
    """Cold start without a proxy: cluster the features, then take the most typical point of the largest
    clusters that hold the fewest labelled points.

    ``n_clusters = min(labelled + budget, max_clusters)`` (reference TypiClust: at most 500); clusters smaller
    than ``min_cluster_size`` are skipped unless nothing else is left. Typicality = inverse mean squared
    distance to the ``knn`` nearest neighbours inside the cluster, on L2-normalised features (``normalise``).
    Scale: candidates are a uniform subsample of at most ``max_candidates``; k-means runs on a ``pca_dim``-d
    PCA projection (fitted on at most ``pca_fit_rows`` rows; None = full features), which makes 500 clusters
    on 50k x 1280 features take seconds instead of minutes, and becomes MiniBatchKMeans above
    ``minibatch_above`` points. Typicality uses the full (normalised) features, with neighbours searched among
    at most ``max_cluster_points`` members of a cluster; it is computed once per cluster (a cluster picked
    twice gives its second most typical point). Items not chosen are ordered by margin when probabilities
    exist, else at random.
    """

    name: ClassVar[str] = "typiclust"
    set_based: ClassVar[bool] = True

    def __init__(
        self,
        seed: int = 0,
        max_candidates: int | None = 50_000,
        max_clusters: int = 500,
        min_cluster_size: int = 5,
        knn: int = 20,
        max_cluster_points: int = 5_000,
        minibatch_above: int = 20_000,
        pca_dim: int | None = 64,
        pca_fit_rows: int = 10_000,
        normalise: bool = True,
        device: str = "cpu",
    ) -> None:
        super().__init__(seed, device)
        self.max_candidates = max_candidates
        self.max_clusters = max_clusters
        self.min_cluster_size = min_cluster_size
        self.knn = knn
        self.max_cluster_points = max_cluster_points
        self.minibatch_above = minibatch_above
        self.pca_dim = pca_dim
        self.pca_fit_rows = pca_fit_rows
        self.normalise = normalise

    def _cluster(self, x: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
        if self.pca_dim is not None and min(x.shape) > self.pca_dim:
            fit_rows = x
            if x.shape[0] > self.pca_fit_rows:
                fit_rows = x[rng.choice(x.shape[0], self.pca_fit_rows, replace=False)]
            pca = PCA(self.pca_dim, svd_solver="randomized", random_state=self.seed).fit(fit_rows)
            x = pca.transform(x).astype(np.float32)
        if x.shape[0] > self.minibatch_above:
            km = MiniBatchKMeans(n_clusters, batch_size=4096, n_init=3, random_state=self.seed)
        else:
            km = KMeans(n_clusters, n_init=1, random_state=self.seed)
        return km.fit_predict(x)

    @torch.no_grad()
    def rank(self, inp: SelectionInput, budget: int) -> Ranking:
        self._check(inp, budget)
        rng = np.random.default_rng(self.seed)
        k = min(budget, inp.n)
        if k == 0:
            return set_ranking(np.empty(0, np.int64), inp, rng)
        cand = candidate_indices(inp.n, self.max_candidates, k, rng)
        x = np.asarray(inp.features[cand], dtype=np.float32)
        lab = inp.labelled_features if inp.n_labelled else np.empty((0, x.shape[1]), np.float32)
        if self.max_candidates is not None and lab.shape[0] > self.max_candidates:
            lab = lab[np.sort(rng.choice(lab.shape[0], self.max_candidates, replace=False))]
        lab = np.asarray(lab, dtype=np.float32)
        if self.normalise:
            x, lab = _l2_normalise(x), _l2_normalise(lab)
        n_clusters = max(1, min(lab.shape[0] + k, self.max_clusters, x.shape[0] + lab.shape[0]))
        labels = self._cluster(np.vstack([x, lab]), n_clusters, rng)
        pool_lab, lab_lab = labels[: x.shape[0]], labels[x.shape[0] :]
        size = np.bincount(labels, minlength=n_clusters)
        covered = np.bincount(lab_lab, minlength=n_clusters)
        members = [np.flatnonzero(pool_lab == c) for c in range(n_clusters)]
        eligible = [c for c in range(n_clusters) if size[c] >= self.min_cluster_size and members[c].size]
        if not eligible:
            eligible = [c for c in range(n_clusters) if members[c].size]
        queues: dict[int, list[int]] = {}  # cluster -> its members, most typical first (filled lazily)
        chosen: list[int] = []
        xt = to_tensor(x, resolve_device(self.device))
        while len(chosen) < k and eligible:
            c = min(eligible, key=lambda j: (covered[j], -size[j], j))
            if c not in queues:
                queues[c] = self._typical_first(xt, members[c], rng)
            chosen.append(int(queues[c].pop(0)))
            covered[c] += 1
            if not queues[c]:
                eligible.remove(c)
        if len(chosen) < k:  # every eligible cluster exhausted: fill the batch at random
            rest = np.setdiff1d(np.arange(x.shape[0]), np.asarray(chosen, np.int64))
            chosen.extend(rng.permutation(rest)[: k - len(chosen)].tolist())
        return set_ranking(cand[np.asarray(chosen, np.int64)], inp, rng)

    def _typical_first(self, xt: torch.Tensor, rows: np.ndarray, rng: np.random.Generator) -> list[int]:
        ref = None
        if rows.size > self.max_cluster_points:
            ref = np.sort(rng.choice(rows.size, self.max_cluster_points, replace=False))
        knn = min(self.knn, max(1, rows.size // 2))
        typ = typicality(xt[torch.from_numpy(rows).to(xt.device)], knn, ref).cpu().numpy()
        return rows[np.lexsort((rows, -typ))].tolist()
