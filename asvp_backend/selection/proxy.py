"""Proxy classifiers trained on cached features (docs/method.md, *Proxy and strategies*).

Both proxies follow scikit-learn conventions: ``__init__`` only stores parameters, ``fit`` does the work and
returns ``self``, learned state ends with ``_``. Labels may be any sortable ints or strings; ``classes_``
holds them sorted and ``predict_proba`` columns follow that order.

Degenerate labelled sets (documented choice, no crash): with a single labelled class (which includes a set of
one sample) there is nothing to separate, so no SGD runs and ``predict_proba`` returns a single all-ones
column; every probability-based score is then "certain" (1.0). Callers should treat fewer than two labelled
classes as a cold start. An empty labelled set raises ``ValueError``.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from torch import nn

from asvp_backend.fsutil import atomic_file

FORMAT = "asvp-proxy"
FORMAT_VERSION = 1


@runtime_checkable
class Proxy(Protocol):
    """What rounds and strategies need from a proxy."""

    classes_: np.ndarray

    def fit(self, X: np.ndarray, y: np.ndarray) -> Proxy: ...
    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...
    def predict(self, X: np.ndarray) -> np.ndarray: ...
    def hidden_and_logits(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def save(self, path: str | os.PathLike[str]) -> None: ...


# --------------------------------------------------------------------------------------------- helpers


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a labelled set; return (X, classes, y as column indices)."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-d (n, d) array, got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be 1-d with {X.shape[0]} labels, got shape {y.shape}")
    if X.shape[0] == 0:
        raise ValueError("cannot fit a proxy on an empty labelled set")
    classes, y_idx = np.unique(y, return_inverse=True)
    return X, classes, y_idx.astype(np.int64)


def _resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _load_device(saved: str, requested: str | None) -> str:
    """The requested device, else the saved one, else CPU when the saved GPU is absent (web process)."""
    if requested is not None:
        return requested
    return "cpu" if torch.device(saved).type == "cuda" and not torch.cuda.is_available() else saved


def _autocast(dev: torch.device) -> Any:
    """bf16 autocast on CUDA (fast, accurate enough for a proxy); plain float32 elsewhere."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")


def _batches(X: np.ndarray, batch_size: int, dev: torch.device):
    """Yield (start, float32 tensor) chunks: float16 pools are widened one batch at a time."""
    for start in range(0, X.shape[0], batch_size):
        chunk = np.ascontiguousarray(X[start : start + batch_size])
        yield start, torch.from_numpy(chunk).to(dev, non_blocking=True).float()


def epoch_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) slices of one epoch; a last batch of one sample is merged into the previous one,
    because BatchNorm in training mode cannot normalise a batch of one (docs/method.md, *Proxy and strategies*)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) >= 2 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2] = (bounds[-2][0], n)
        bounds.pop()
    return bounds


def cosine_716(step: int, total_steps: int) -> float:
    """Reference schedule factor ``max(0, cos(7*pi/16 * step/total))``: ends near 0.195, no warm-up."""
    return max(0.0, math.cos(7.0 * math.pi / 16.0 * step / max(1, total_steps)))


def _classes_meta(classes: np.ndarray) -> dict[str, Any]:
    return {"classes": classes.tolist(), "classes_dtype": classes.dtype.str}


def _classes_from_meta(meta: dict[str, Any]) -> np.ndarray:
    return np.asarray(meta["classes"], dtype=np.dtype(meta["classes_dtype"]))


def _atomic_torch_save(obj: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Readers never see half a file (fsutil.atomic_file)."""
    with atomic_file(Path(path)) as fh:
        torch.save(obj, fh)


def _load_payload(path: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    # weights_only=True: only tensors and plain containers/scalars are unpickled, never arbitrary objects
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an asvp proxy file")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported proxy format version {payload.get('format_version')}")
    if kind is not None and payload.get("kind") != kind:
        raise ValueError(f"{path} holds a {payload.get('kind')!r} proxy, not {kind!r}")
    return payload


class _FittedMixin:
    """Shared helpers: parameters, the fitted check, predict."""

    classes_: np.ndarray

    def get_params(self) -> dict[str, Any]:
        """The constructor's parameters, read from its signature (scikit-learn's convention)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most probable label per row, taken from ``classes_``."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------- MLP


class _MLP(nn.Module):
    """Reference proxy: Linear(d, h) -> BatchNorm1d(h) -> ReLU -> Linear(h, C)."""

    def __init__(self, d: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MLPProxy(_FittedMixin):
    """The ASVP/SVPp proxy: a fresh MLP on cached features every round (docs/method.md, *Proxy and strategies*).

    ``hidden=None`` uses the feature dimension (reference). Epochs scale up so that at least ``min_steps``
    SGD steps run: with batch 2048 a few hundred labels would otherwise get only 50 steps.
    """

    kind: ClassVar[str] = "mlp"

    def __init__(
        self,
        hidden: int | None = None,
        epochs: int = 50,
        batch_size: int = 2048,
        lr: float = 0.1,
        min_steps: int = 100,
        device: str = "cpu",
        seed: int = 0,
        predict_batch_size: int = 4096,
    ) -> None:
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.min_steps = min_steps
        self.device = device
        self.seed = seed
        self.predict_batch_size = predict_batch_size

    def _build(self, d: int, n_classes: int, dev: torch.device) -> _MLP:
        with torch.random.fork_rng(devices=[]):  # deterministic init without touching the global RNG
            torch.manual_seed(self.seed)
            model = _MLP(d, self.hidden or d, n_classes)
        return model.to(dev)

    def fit(self, X: np.ndarray, y: np.ndarray) -> MLPProxy:
        """Train a re-initialised MLP: SGD nesterov 0.9, wd 0, cosine(7/16) per step, shuffled batches."""
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (BatchNorm needs two samples per batch)")
        X, classes, y_idx = _check_xy(X, y)
        dev = _resolve_device(self.device)
        n, d = X.shape
        model = self._build(d, len(classes), dev)
        batches = epoch_batches(n, self.batch_size)
        epochs = max(self.epochs, math.ceil(self.min_steps / len(batches)))
        total = epochs * len(batches)
        if len(classes) < 2:
            epochs, total = 0, 0  # single class: nothing to learn (module docstring)
        Xt = torch.from_numpy(np.ascontiguousarray(X)).to(dev).float()
        yt = torch.from_numpy(y_idx).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=0.0)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(self.seed)
        model.train()
        step = 0
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            for start, stop in batches:
                for group in opt.param_groups:
                    group["lr"] = self.lr * cosine_716(step, total)
                idx = perm[start:stop]
                with _autocast(dev):
                    loss = loss_fn(model(Xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        model.eval()
        self.model_ = model
        self.classes_ = classes
        self.n_features_in_ = d
        self.n_steps_ = step
        self.n_epochs_ = epochs
        return self

    @torch.no_grad()
    def _forward(self, X: np.ndarray, want_hidden: bool) -> tuple[np.ndarray | None, np.ndarray]:
        self._check_fitted()
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have shape (n, {self.n_features_in_}), got {X.shape}")
        dev = next(self.model_.parameters()).device
        self.model_.eval()
        n, c = X.shape[0], len(self.classes_)
        hidden = np.empty((n, self.model_.head.in_features), np.float32) if want_hidden else None
        logits = np.empty((n, c), np.float32)
        for start, xb in _batches(X, self.predict_batch_size, dev):
            with _autocast(dev):
                h = self.model_.body(xb)
                z = self.model_.head(h)
            logits[start : start + len(xb)] = z.float().cpu().numpy()
            if hidden is not None:
                hidden[start : start + len(xb)] = h.float().cpu().numpy()
        return hidden, logits

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Softmax probabilities, (n, C) float32, columns in ``classes_`` order; batched, eval mode."""
        _, logits = self._forward(X, want_hidden=False)
        return _softmax(logits)

    def hidden_and_logits(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input of the last layer, logits): what BADGE needs for gradient embeddings."""
        hidden, logits = self._forward(X, want_hidden=True)
        assert hidden is not None
        return hidden, logits

    def save(self, path: str | os.PathLike[str]) -> None:
        """Small torch file (state dict + plain metadata), written atomically; load with weights_only."""
        self._check_fitted()
        state = {k: v.detach().cpu() for k, v in self.model_.state_dict().items()}
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "params": self.get_params(),
            "n_features_in": self.n_features_in_,
            "hidden_dim": self.model_.head.in_features,
            "n_steps": self.n_steps_,
            "n_epochs": self.n_epochs_,
            "state_dict": state,
            **_classes_meta(self.classes_),
        }
        _atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | None = None) -> MLPProxy:
        """Rebuild a fitted proxy; ``device`` overrides the saved one (saved GPU -> CPU when absent)."""
        payload = _load_payload(path, cls.kind)
        params = dict(payload["params"])
        params["device"] = _load_device(params["device"], device)
        proxy = cls(**params)
        classes = _classes_from_meta(payload)
        model = _MLP(payload["n_features_in"], payload["hidden_dim"], len(classes))
        model.load_state_dict(payload["state_dict"])
        proxy.model_ = model.to(_resolve_device(proxy.device)).eval()
        proxy.classes_ = classes
        proxy.n_features_in_ = payload["n_features_in"]
        proxy.n_steps_ = payload["n_steps"]
        proxy.n_epochs_ = payload["n_epochs"]
        return proxy


# --------------------------------------------------------------------------------------------- logistic


class LogisticProxy(_FittedMixin):
    """Fast option: multinomial logistic regression (scikit-learn L-BFGS) on the raw features.

    Fitted weights are kept as plain arrays (logits = X @ coef_.T + intercept_), so prediction is a batched
    matmul in torch and saving needs no pickle. ``hidden_and_logits`` returns the features themselves.
    """

    kind: ClassVar[str] = "logistic"

    def __init__(
        self,
        C: float = 1.0,
        max_iter: int = 500,
        device: str = "cpu",
        seed: int = 0,
        predict_batch_size: int = 4096,
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.device = device
        self.seed = seed
        self.predict_batch_size = predict_batch_size

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogisticProxy:
        X, classes, y_idx = _check_xy(X, y)
        d = X.shape[1]
        if len(classes) < 2:
            coef = np.zeros((1, d), np.float32)  # single class: constant prediction (module docstring)
            intercept = np.zeros(1, np.float32)
        else:
            clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
            clf.fit(X.astype(np.float32, copy=False), y_idx)
            coef = clf.coef_.astype(np.float32)
            intercept = clf.intercept_.astype(np.float32)
            if len(classes) == 2:  # sklearn keeps one row for two classes; logits [0, z], same softmax
                coef = np.vstack([np.zeros_like(coef), coef])
                intercept = np.concatenate([np.zeros(1, np.float32), intercept])
        self.coef_ = coef
        self.intercept_ = intercept
        self.classes_ = classes
        self.n_features_in_ = d
        return self

    def _logits(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have shape (n, {self.n_features_in_}), got {X.shape}")
        dev = _resolve_device(self.device)
        w = torch.from_numpy(self.coef_).to(dev)
        b = torch.from_numpy(self.intercept_).to(dev)
        out = np.empty((X.shape[0], len(self.coef_)), np.float32)
        with torch.no_grad():
            for start, xb in _batches(X, self.predict_batch_size, dev):
                out[start : start + len(xb)] = torch.addmm(b, xb, w.T).cpu().numpy()
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Softmax probabilities, (n, C) float32, columns in ``classes_`` order."""
        return _softmax(self._logits(X))

    def hidden_and_logits(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features as float32, logits): the last layer's input is the feature itself."""
        return np.asarray(X, dtype=np.float32), self._logits(X)

    def save(self, path: str | os.PathLike[str]) -> None:
        self._check_fitted()
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "params": self.get_params(),
            "n_features_in": self.n_features_in_,
            "state_dict": {
                "coef": torch.from_numpy(self.coef_),
                "intercept": torch.from_numpy(self.intercept_),
            },
            **_classes_meta(self.classes_),
        }
        _atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | None = None) -> LogisticProxy:
        payload = _load_payload(path, cls.kind)
        params = dict(payload["params"])
        params["device"] = _load_device(params["device"], device)
        proxy = cls(**params)
        proxy.coef_ = payload["state_dict"]["coef"].numpy()
        proxy.intercept_ = payload["state_dict"]["intercept"].numpy()
        proxy.classes_ = _classes_from_meta(payload)
        proxy.n_features_in_ = payload["n_features_in"]
        return proxy


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- registry

PROXIES: dict[str, type[MLPProxy] | type[LogisticProxy]] = {"mlp": MLPProxy, "logistic": LogisticProxy}


def create_proxy(name: str, **params: Any) -> Proxy:
    """Build an unfitted proxy by registry name, e.g. ``create_proxy("mlp", device="cuda")``."""
    try:
        cls = PROXIES[name]
    except KeyError:
        raise ValueError(f"unknown proxy {name!r}; known: {', '.join(sorted(PROXIES))}") from None
    return cls(**params)


def load_proxy(path: str | os.PathLike[str], device: str | None = None) -> Proxy:
    """Load any saved proxy, dispatching on the ``kind`` stored in the file."""
    kind = _load_payload(path).get("kind")
    if kind not in PROXIES:
        raise ValueError(f"{path}: unknown proxy kind {kind!r}")
    return PROXIES[kind].load(path, device=device)


def cross_val_accuracy(
    proxy_factory: Callable[[], Proxy], X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0
) -> float | None:
    """Stratified k-fold accuracy of fresh proxies on the labelled set, for the round log.

    Uses ``min(folds, smallest class count)`` folds; returns None when that is below 2 or fewer than two
    classes are labelled (an estimate would be meaningless).
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.shape[0] != y.shape[0]:
        raise ValueError("X and y must have the same number of rows")
    if y.size == 0:
        return None
    _, counts = np.unique(y, return_counts=True)
    n_splits = min(folds, int(counts.min()))
    if len(counts) < 2 or n_splits < 2:
        return None
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    correct = 0
    for train_idx, test_idx in skf.split(np.zeros(len(y)), y):
        proxy = proxy_factory().fit(X[train_idx], y[train_idx])
        correct += int(np.sum(proxy.predict(X[test_idx]) == y[test_idx]))
    return correct / len(y)
