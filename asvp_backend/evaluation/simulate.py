"""`simulate`: replay active learning offline with an oracle, through the backend's own modules.

Every method runs the same loop per seed: round 0 labels a seeded random initial set (the same for every
method of a seed), each round trains what the method trains on the current labels, records the deliverable
model's test accuracy and picks the next batch. Methods (``METHODS``):

- ``random``: uniform picks; the reference of the sample saving ratio.
- ``svpp``: the proxy on generation-0 (pre-trained) features, never refreshed (docs/method.md, *Measuring the
  savings*). Each of its rounds is the backend's round (``selection/queue.py``: the same proxy, strategy and
  audit picks from the same arrays and seeds), as every proxy method's are; its batch is the queue's top.
- ``asvp``: the proxy plus both alignments exactly as ``AlignmentPolicy`` decides them: every round LogME
  and LogME-PED of the labelled set (reference = the pool's features of the current generation); when the
  policy fires, fine-tune on the current labels but the audit ones, re-extract every feature with that
  backbone, and let the backend's gate judge the candidate on the audit labels (``judge_features``): adopted,
  it becomes generation + 1; rejected, the run goes on with the serving features; below AUDIT_MIN_LABELS it
  waits and a later round judges it. A decision to update in the last round is recorded but not run: no
  batch is left to select on the new features.
- ``asvp-ungated``: ``asvp`` whose refreshes always serve (``ALIGN_GATE=false``); the gate's verdict is still
  recorded, to count its errors against the test split.
- ``standard``: fine-tune the backbone every round (FT, from the pre-trained weights) and select with its
  softmax over the pool.

What "the deliverable" is: ``--eval finetune`` trains what Start Training trains (``policy.deliverable_methods``:
LP-FT on generation 0, after a refresh FT and LP-FT with the audit labels choosing, ``deliverable_rank``) on the
labels but the audit ones, and measures it on the test split, as the authors' scripts do (docs/method.md,
*Measuring the savings*);
``--eval proxy`` measures the proxy instead (cheap, for CPU runs). ``standard`` has no proxy: its curve is
always its own fine-tuned model.

Wall time per round is split into selection (proxy training, pool scoring, ranking), training (fine-tunes
a method needs in order to select), extraction (caching features), alignment (LogME/PED, NumPy on the CPU)
and evaluation (what only the learning curve needs). Features are cached on disk under ``OUT/cache`` by
(data set, backbone, weights hash, input size, split): a repeated or resumed run charges the seconds
measured when they were first extracted, so its costs are those of an uninterrupted run.

Resumable: after every round the run's whole state (labels in order, feature generation and checkpoint,
score history, records) replaces ``OUT/progress/<method>-seed<k>.json`` atomically. Every random choice in
a round is seeded from (seed, round) as the backend seeds it (the proxy methods: the run's seed is the
project's SEED) or from (seed, round, purpose), never from a global stream, so a killed run that continues
from its finished rounds gives the same curves, selections and decisions as one that was never killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from asvp_backend.alignment.gate import WAIT, Gate, judge_features, judge_model
from asvp_backend.alignment.integrity import CHECKPOINT_WEIGHTS
from asvp_backend.alignment.policy import AlignmentPolicy, Decision, deliverable_rank
from asvp_backend.fsutil import atomic_write_bytes
from asvp_backend.selection.audit import AuditPolicy
from asvp_backend.selection.queue import (
    QueueSettings,
    RoundInputs,
    RoundRanking,
    audit_estimate,
    next_batch,
    place_audit,
    rank_pool,
)

from .datasets import Dataset, Split, load_dataset

if TYPE_CHECKING:  # torch loads when a run fine-tunes, not when the module is imported
    from asvp_backend.alignment.finetune import FinetuneRecipe


log = logging.getLogger(__name__)

EVAL_MODES = ("finetune", "proxy")
BUCKETS = ("selection", "training", "extraction", "alignment", "evaluation")
#: fine-tuned models the standard method can select with: their softmax is all it has
PROBABILITY_STRATEGIES = ("margin", "entropy", "least_confidence", "random")
PROGRESS_FORMAT = "asvp-simulate-run"
_FEATURE_MEMO = 4  # feature matrices kept in memory (generation 0 and the runs' current ones)
_INFER_BATCH = 256

# purposes of derived seeds: each random choice of a round has its own stream
_INITIAL, _SELECT, _PROXY, _FINETUNE, _EVAL = range(1, 6)


def derive_seed(seed: int, round_no: int, purpose: int) -> int:
    """A 32-bit seed from (run seed, round, purpose): identical whether or not the run was resumed."""
    return int(np.random.SeedSequence([seed, round_no, purpose]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that decides a simulation's results (plus seeds, rounds, methods and the device)."""

    dataset: str
    methods: tuple[str, ...] = ("random", "svpp", "asvp", "standard")
    strategy: str = "margin"
    proxy: str = "mlp"
    initial: int = 100
    budget_per_round: int = 100
    rounds: int = 10
    seeds: int = 3
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "auto"
    image_size: int | None = None
    device: str = "auto"
    eval: str = "finetune"
    finetune_epochs: int | None = None  # None: recipe_for's scaling
    lp_epochs: int | None = None  # None: the recipe's LP epochs
    subset: int | None = None
    test_subset: int | None = None
    data_seed: int = 0
    align_threshold: float = AlignmentPolicy.threshold
    align_window: int = AlignmentPolicy.window
    align_min_labels: int = AlignmentPolicy.min_labels
    align_min_new_labels: int = AlignmentPolicy.min_new_labels
    align_max_updates: int = AlignmentPolicy.max_updates
    training_method: str = AlignmentPolicy.training_method
    audit_fraction: float = AuditPolicy.fraction  # the backend's audit sample, in the proxy methods' batches
    audit_early_fraction: float = AuditPolicy.early_fraction
    audit_min_labels: int = AuditPolicy.min_labels
    audit_existing: str = "ignore"  # "random": the random initial labels start the audit (AUDIT_EXISTING)
    gate_z: float = Gate.z
    extract_batch: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown or '(none given)'}; choose from {', '.join(METHODS)}")
        if self.eval not in EVAL_MODES:
            raise ValueError(f"--eval must be one of {EVAL_MODES}, got {self.eval!r}")
        if self.initial < 1 or self.budget_per_round < 1 or self.rounds < 0 or self.seeds < 1:
            raise ValueError("need --initial >= 1, --budget-per-round >= 1, --rounds >= 0 and --seeds >= 1")
        if self.finetune_epochs is not None and self.finetune_epochs < 1:
            raise ValueError(f"--finetune-epochs must be >= 1, got {self.finetune_epochs}")
        if self.lp_epochs is not None and self.lp_epochs < 0:
            raise ValueError(f"--lp-epochs must be >= 0, got {self.lp_epochs}")
        from asvp_backend.selection import proxy_names, strategy_names

        if self.strategy not in strategy_names():
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(strategy_names())}")
        if self.proxy not in proxy_names():
            raise ValueError(f"unknown proxy {self.proxy!r}; choose from {', '.join(proxy_names())}")
        if "standard" in self.methods and self.strategy not in PROBABILITY_STRATEGIES:
            raise ValueError(f"the standard method selects with its fine-tuned model's softmax, so the strategy "
                             f"must be one of {', '.join(PROBABILITY_STRATEGIES)}, got {self.strategy!r}")  # fmt: skip
        self.policy()  # validates the training method
        if not 0.0 <= self.audit_fraction <= 0.5 or not 0.0 <= self.audit_early_fraction <= 0.5:
            raise ValueError("--audit-fraction and --audit-early-fraction must be between 0 and 0.5")
        if self.audit_existing not in ("ignore", "random"):
            raise ValueError(f"--audit-existing must be ignore or random, got {self.audit_existing!r}")
        if self.audit_min_labels < 1 or self.gate_z < 0:
            raise ValueError("need --audit-min-labels >= 1 and --gate-z >= 0")

    def policy(self) -> AlignmentPolicy:
        return AlignmentPolicy(True, self.align_threshold, self.align_window, self.align_min_labels,
                               self.align_min_new_labels, self.align_max_updates, self.training_method)

    def audit(self) -> AuditPolicy:
        return AuditPolicy(self.audit_fraction, self.audit_early_fraction, self.audit_min_labels,
                           self.audit_existing == "random")

    def gate(self) -> Gate:
        return Gate(self.gate_z, self.audit_min_labels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = list(self.methods)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimulationConfig:
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: tuple(v) if k == "methods" else v for k, v in d.items() if k in known}
        return cls(**kwargs)

    def identity(self) -> dict[str, Any]:
        """The settings a finished round depends on: a resumed run must match them. Seeds and methods may
        grow (more runs) and the device may change; the rounds may not (the last round selects nothing)."""
        d = self.to_dict()
        for key in ("methods", "seeds", "device", "extract_batch"):
            d.pop(key)
        return d


# ------------------------------------------------------------------------------------------------- state


@dataclass
class RunState:
    """One (method, seed) run; everything needed to continue it after its last finished round."""

    method: str
    seed: int
    labelled: list[int] = field(default_factory=list)  # train rows, in labelling order
    generation: int = 0
    checkpoint: str | None = None  # folder (relative to OUT) of the backbone that made the current features
    scores: list[list[float]] = field(default_factory=list)  # [labels, LogME-PED] of this generation's rounds
    updates: int = 0
    labels_at_last_update: int = 0
    charged: list[str] = field(default_factory=list)  # feature cache keys whose extraction this run paid for
    audit: list[int] = field(default_factory=list)  # train rows picked for the audit sample, in picking order
    held: dict[str, Any] | None = None  # a refreshed generation waiting for audit labels (the gate said wait)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    device: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROGRESS_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        if d.get("format") != PROGRESS_FORMAT:
            raise ValueError("not a simulate progress record")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Laps:
    """Wall seconds per bucket (``BUCKETS``) of one round."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(BUCKETS, 0.0)

    @contextlib.contextmanager
    def __call__(self, bucket: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[bucket] += time.perf_counter() - start

    def add(self, bucket: str, seconds: float) -> None:
        self.seconds[bucket] += seconds


# ----------------------------------------------------------------------------------------- feature cache


@dataclass(frozen=True)
class Features:
    vectors: np.ndarray  # (n, d) float16, the feature store's type
    seconds: float  # what extracting them cost when they were computed
    key: str


def cache_key(parts: dict[str, Any]) -> str:
    """The file name of a cache entry: a hash of what decides its content."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureCache:
    """``<key>.npy`` + ``<key>.json`` under ``root``; the JSON is written last and marks a complete entry."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, parts: dict[str, Any], compute: Callable[[], np.ndarray]) -> Features:
        key = cache_key(parts)
        vec_path, meta_path = self.root / f"{key}.npy", self.root / f"{key}.json"
        if meta_path.is_file() and vec_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                vectors = np.load(vec_path)
                if vectors.dtype == np.float16 and list(vectors.shape) == meta["shape"]:
                    return Features(vectors, float(meta["seconds"]), key)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("feature cache entry %s is unreadable (%s): extracting again", key, exc)
        start = time.perf_counter()
        vectors = np.ascontiguousarray(compute(), dtype=np.float16)
        seconds = time.perf_counter() - start
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.npy.tmp"
        with tmp.open("wb") as fh:
            np.save(fh, vectors)
        tmp.replace(vec_path)
        meta = {**parts, "shape": list(vectors.shape), "seconds": seconds, "created": time.time()}
        atomic_write_bytes(meta_path, json.dumps(meta, indent=1, default=str).encode())
        return Features(vectors, seconds, key)


class DeliverableCache:
    """``deliverables/<key>.json`` under ``root``: what an ``--eval finetune`` deliverable scored and cost.

    A round's deliverable is a pure function of the labelled rows (in their order) and the recipe, seed included
    (it is always trained from the pre-trained weights), so runs that share a round share it: SVPp and ASVP of
    one seed pick the same labels until ASVP's first adopted refresh, and a gated ASVP whose refresh was rejected
    goes on picking SVPp's. A hit charges the stored seconds, so each run's cost reads as if it had trained the
    model; only the wall time of the simulation is shorter."""

    def __init__(self, root: Path) -> None:
        self.root = root / "deliverables"

    def get(self, parts: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """What the deliverable ``parts`` names measured (``compute``'s values) and ``seconds``, its training and
        measuring time, training it when none is stored."""
        path = self.root / f"{cache_key(parts)}.json"
        if path.is_file():
            try:
                found = json.loads(path.read_text())
                return {**found["measured"], "seconds": float(found["seconds"])}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("deliverable cache entry %s is unreadable (%s): training again", path.name, exc)
        start = time.perf_counter()
        measured = compute()
        seconds = time.perf_counter() - start
        self.root.mkdir(parents=True, exist_ok=True)
        entry = {**parts, "measured": measured, "seconds": seconds}
        atomic_write_bytes(path, json.dumps(entry, indent=1, default=str).encode())
        return {**measured, "seconds": seconds}


# ------------------------------------------------------------------------------------------------ helpers


class _LabelledRows:
    """The labelled train rows as fine-tuning sees them (``alignment.finetune.LabelledImages``)."""

    def __init__(self, dataset: Dataset, rows: np.ndarray) -> None:
        self.dataset = dataset
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def label(self, index: int) -> str:
        return self.dataset.classes[int(self.dataset.train.labels[self.rows[index]])]

    def load(self, index: int) -> Any:
        return self.dataset.train.image(int(self.rows[index]))


def _bar(total: int, desc: str, enabled: bool, unit: str = "img") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not enabled)


def constant_accuracy(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Test accuracy of always answering the one labelled class (fewer than two classes: nothing to train)."""
    if len(train_labels) == 0:
        return 0.0
    return float(np.mean(test_labels == np.bincount(train_labels).argmax()))


@dataclass
class Outcome:
    """What a method's round produced."""

    accuracy: float
    evaluated_by: str  # "proxy" | "ft" | "lpft" | "constant"
    selected: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------- workspace


class Workspace:
    """What every method shares: data, device, backbones, the feature cache, proxies and fine-tuning."""

    def __init__(self, config: SimulationConfig, dataset: Dataset, out: Path, progress: bool = True) -> None:
        from asvp_backend.features.device import resolve_device

        self.config = config
        self.dataset = dataset
        self.out = out
        self.progress = progress
        self.device = resolve_device(config.device)
        self.policy = config.policy()
        self.cache = FeatureCache(out / "cache")
        self.deliverables = DeliverableCache(out / "cache")
        self._memo: OrderedDict[str, Features] = OrderedDict()

    # -- features
    def backbone(self, checkpoint: str | None) -> Any:
        from asvp_backend.features import create_backbone

        weights = self.config.weights if checkpoint is None else str(self.out / checkpoint / CHECKPOINT_WEIGHTS)
        return create_backbone(self.config.backbone, weights, device=self.device, image_size=self.config.image_size)

    def features(self, checkpoint: str | None, split: str) -> Features:
        memo_key = f"{checkpoint}|{split}"
        if memo_key in self._memo:
            self._memo.move_to_end(memo_key)
            return self._memo[memo_key]
        backbone = self.backbone(checkpoint)
        parts = {"dataset": self.dataset.key, "split": split, "backbone": backbone.name,
                 "weights_hash": backbone.weights_hash, "input_size": list(backbone.input_size)}  # fmt: skip
        data = self.dataset.train if split == "train" else self.dataset.test
        found = self.cache.get(parts, lambda: self._extract(backbone, data, f"features g{checkpoint or 0} {split}"))
        self._memo[memo_key] = found
        while len(self._memo) > _FEATURE_MEMO:
            self._memo.popitem(last=False)
        return found

    def _extract(self, backbone: Any, split: Split, desc: str) -> np.ndarray:
        out = np.empty((len(split), backbone.dim), dtype=np.float16)
        step = self.config.extract_batch
        with _bar(len(split), desc, self.progress) as bar:
            for start in range(0, len(split), step):
                stop = min(start + step, len(split))
                out[start:stop] = backbone.embed_images([split.image(i) for i in range(start, stop)])
                bar.update(stop - start)
        return out

    # -- proxies and selection
    @property
    def proxy_device(self) -> str:
        return self.device.type

    def fit_proxy(self, x: np.ndarray, y: np.ndarray, seed: int) -> Any:
        """A fresh proxy on the labelled features, None below two classes (cold start, as rank_pool does)."""
        from asvp_backend.selection import create_proxy

        if len(set(y.tolist())) < 2:
            return None
        return create_proxy(self.config.proxy, device=self.proxy_device, seed=seed).fit(x.astype(np.float32), y)

    def select(self, pool: np.ndarray, budget: int, seed: int, probs: np.ndarray | None,
               x_pool: np.ndarray | None = None, x_lab: np.ndarray | None = None, proxy: Any = None,
               strategy: str | None = None) -> np.ndarray:  # fmt: skip
        """The ``budget`` pool rows with the lowest scores (the backend's convention, ties by position); a
        cold start (no probabilities) picks at random, as the issue's random initial set does."""
        from asvp_backend.selection import SelectionInput, create_strategy

        budget = min(budget, len(pool))
        if budget == 0:
            return np.empty(0, dtype=np.int64)
        name = strategy or (self.config.strategy if probs is not None else "random")
        features = x_pool if x_pool is not None else np.empty((len(pool), 0), dtype=np.float32)
        labelled = x_lab if x_lab is not None else np.empty((0, features.shape[1]), dtype=np.float32)
        ranking = create_strategy(name, seed=seed, device=self.proxy_device).rank(
            SelectionInput(features, probs, labelled, proxy), budget
        )
        chosen = np.argsort(np.asarray(ranking.scores), kind="stable")[:budget]
        return pool[chosen].astype(np.int64)

    def proxy_accuracy(self, proxy: Any, x_test: np.ndarray, y_lab: np.ndarray) -> tuple[float, str]:
        if proxy is None:
            return constant_accuracy(y_lab, self.dataset.test.labels), "constant"
        pred = proxy.predict(x_test.astype(np.float32))
        return float(np.mean(pred == self.dataset.test.labels)), "proxy"

    # -- fine-tuning
    def recipe(self, method: str, n_rows: int, seed: int) -> FinetuneRecipe:
        """The backend's recipe for ``n_rows`` labels, with no held-out slice: the test split measures accuracy."""
        from asvp_backend.alignment.finetune import recipe_for

        recipe = recipe_for(method, n_rows, epochs=self.config.finetune_epochs, seed=seed)
        recipe = replace(recipe, holdout_fraction=0.0)
        if self.config.lp_epochs is not None:
            recipe = replace(recipe, lp_epochs=self.config.lp_epochs)
        return recipe

    def finetune(self, method: str, rows: np.ndarray, seed: int) -> Any:
        """FT or LP-FT from the pre-trained weights on the labelled rows."""
        from asvp_backend.alignment.finetune import finetune

        recipe = self.recipe(method, len(rows), seed)
        with _bar(0, f"fine-tune {method} on {len(rows)}", self.progress, unit="step") as bar:

            def progress(done: int, total: int, stage: str) -> None:
                bar.total = total
                bar.n = done
                bar.set_description(f"fine-tune {method} {stage}", refresh=False)
                bar.refresh()

            return finetune(self.config.backbone, self.config.weights, _LabelledRows(self.dataset, rows), recipe,
                            device=str(self.device), image_size=self.config.image_size, progress=progress)  # fmt: skip

    def classify(self, result: Any, split: Split, rows: np.ndarray, desc: str) -> np.ndarray:
        """Softmax of a fine-tuned model over ``split[rows]``, columns in the data set's class order."""
        import torch

        from asvp_backend.features.backbones import Backbone
        from asvp_backend.features.device import prepare_model

        model = Backbone(
            name=self.config.backbone,
            model=prepare_model(result.model, self.device),
            weights_hash="finetuned",
            preprocessing=dict(result.preprocessing),
            device=self.device,
        )
        index = {name: k for k, name in enumerate(self.dataset.classes)}
        columns = np.array([index[name] for name in result.classes], dtype=np.int64)
        probs = np.zeros((len(rows), len(self.dataset.classes)), dtype=np.float32)
        with _bar(len(rows), desc, self.progress) as bar:
            for start in range(0, len(rows), _INFER_BATCH):
                chunk = rows[start : start + _INFER_BATCH]
                logits = model.classify(torch.stack([model.transform(split.image(int(i))) for i in chunk]))
                probs[start : start + len(chunk), columns] = torch.softmax(logits, dim=1).numpy()
                bar.update(len(chunk))
        result.model.to("cpu")
        return probs

    def deliverable(self, method: str, rows: np.ndarray, audit: np.ndarray, seed: int, laps: Laps) -> dict[str, Any]:
        """``--eval finetune``: train a deliverable (FT or LP-FT) on ``rows`` and measure it on the test split and
        on the ``audit`` rows (never trained on), as a model record ``deliverable_rank`` can rank: the backend's
        job judges it on the audit labels once there are AUDIT_MIN_LABELS of them (``audit_right``: whether it
        labels each right, for the verdict against the proxy)."""
        labels = self.dataset.train.labels[rows]
        if len(set(labels.tolist())) < 2:
            return {"method": "constant", "labelled": len(rows), "comparison": {},
                    "test_accuracy": constant_accuracy(labels, self.dataset.test.labels)}
        test, train = self.dataset.test, self.dataset.train

        def train_and_measure() -> dict[str, Any]:
            result = self.finetune(method, rows, seed)
            probs = self.classify(result, test, np.arange(len(test)), f"test {method}")
            measured: dict[str, Any] = {"test_accuracy": float(np.mean(probs.argmax(axis=1) == test.labels)),
                                        "audit_accuracy": None, "audit_right": []}
            if len(audit):
                right = self.classify(result, train, audit, f"audit {method}").argmax(axis=1) == train.labels[audit]
                measured.update(audit_accuracy=float(np.mean(right)), audit_right=right.tolist())
            return measured

        cfg = self.config
        parts = {"dataset": self.dataset.key, "backbone": cfg.backbone, "weights": cfg.weights,
                 "image_size": cfg.image_size, "device": self.device.type,
                 "recipe": self.recipe(method, len(rows), seed).to_dict(),
                 "rows": hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest(),
                 "audit": hashlib.sha256(np.asarray(audit, np.int64).tobytes()).hexdigest(),
                 "measures": "test, audit_right"}  # fmt: skip
        measured = self.deliverables.get(parts, train_and_measure)
        laps.add("evaluation", measured["seconds"])
        judged = measured["audit_accuracy"] is not None and len(audit) >= cfg.audit_min_labels
        return {"method": method, "labelled": len(rows), "test_accuracy": measured["test_accuracy"],
                "audit_right": np.asarray(measured["audit_right"], dtype=bool),
                "comparison": {"judged_on": "audit", "model_accuracy": measured["audit_accuracy"], "n": len(audit)}
                if judged else {}}


# ---------------------------------------------------------------------------------------------- methods


class Method(ABC):
    """One way of choosing labels; ``play`` runs a round on the current labels and picks the next batch."""

    name: ClassVar[str]

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    @abstractmethod
    def play(self, run: RunState, round_no: int, rows: np.ndarray, budget: int, laps: Laps) -> Outcome:
        """``rows``: the labelled train rows now; ``budget``: how many to pick for the next round (0 at the
        last). May advance ``run`` (generation, checkpoint, scores); the caller persists it afterwards."""

    # shared steps
    def _features(self, run: RunState, checkpoint: str | None, split: str, bucket: str, laps: Laps) -> np.ndarray:
        """Features of ``split``; the first use in a run pays their extraction into ``bucket``."""
        feats = self.ws.features(checkpoint, split)
        if feats.key not in run.charged:
            run.charged.append(feats.key)
            laps.add(bucket, feats.seconds)
        return feats.vectors

    def _pool(self, rows: np.ndarray) -> np.ndarray:
        return np.setdiff1d(np.arange(len(self.ws.dataset.train), dtype=np.int64), rows)

    def _evaluate(self, run: RunState, round_no: int, rows: np.ndarray, proxy: Any, laps: Laps,
                  train_bucket: str = "evaluation",
                  extra: dict[str, Any] | None = None) -> tuple[float, str]:  # fmt: skip
        ws = self.ws
        if ws.config.eval == "proxy":
            if proxy is None and len(set(ws.dataset.train.labels[rows].tolist())) >= 2:
                x = self._features(run, run.checkpoint, "train", train_bucket, laps)
                seed = derive_seed(run.seed, round_no, _PROXY)
                with laps("evaluation"):
                    proxy = ws.fit_proxy(x[rows], ws.dataset.train.labels[rows], seed)
            x_test = self._features(run, run.checkpoint, "test", "evaluation", laps)
            with laps("evaluation"):
                return ws.proxy_accuracy(proxy, x_test, ws.dataset.train.labels[rows])
        # the backend's Start Training: trained on the labels but the audit ones, with the policy's methods, the
        # deliverable ranked as the job ranks it (on the audit labels when there are enough of them)
        audit = np.intersect1d(np.asarray(run.audit, dtype=np.int64), rows)
        trained = rows[~np.isin(rows, audit)]  # in labelling order, as the rounds added them
        seed = derive_seed(run.seed, round_no, _EVAL)
        candidates = [{**ws.deliverable(method, trained, audit, seed, laps), "at": order}
                      for order, method in enumerate(ws.policy.deliverable_methods(run.generation))]
        if len(candidates) > 1:  # the verdict orders candidates; one deliverable is delivered whatever it says
            self._judge_against_proxy(run, candidates, trained, audit, train_bucket, laps)
        best = max(candidates, key=deliverable_rank)
        if len(candidates) > 1 and extra is not None:
            extra["deliverables"] = [{"method": c["method"], "test_accuracy": round(c["test_accuracy"], 4),
                                      "audit_accuracy": (c["comparison"] or {}).get("model_accuracy"),
                                      "verdict": c.get("verdict"), "chosen": c is best} for c in candidates]
        return best["test_accuracy"], best["method"]

    def _judge_against_proxy(self, run: RunState, candidates: list[dict[str, Any]], trained: np.ndarray,
                             audit: np.ndarray, bucket: str, laps: Laps) -> None:
        """Each deliverable judged on the audit labels gets the finetune job's verdict against the serving
        proxy (``judge_model``: the proxy cross-fitted on the same audit labels), which ranks before the audit
        accuracy."""
        judged = [c for c in candidates if c["comparison"]]
        if not judged:
            return
        x = self._features(run, run.checkpoint, "train", bucket, laps)
        labels = self.ws.dataset.train.labels
        trained = np.sort(trained)  # task-id order, as the job reads its labels
        with laps("evaluation"):
            for c in judged:
                comparison = judge_model(self.ws.config.gate(), self._make_proxy(run), c["audit_right"], x[trained],
                                         labels[trained], x[audit], labels[audit], seed=run.seed)
                if comparison is not None:
                    c.update(verdict=str(comparison["verdict"]), comparison=comparison)

    def _make_proxy(self, run: RunState) -> Callable[[], Any]:
        from asvp_backend.selection import create_proxy

        return lambda: create_proxy(self.ws.config.proxy, device=self.ws.proxy_device, seed=run.seed)


class RandomMethod(Method):
    """Uniform picks (``random`` strategy); its deliverable is trained like the others'."""

    name = "random"

    def play(self, run: RunState, round_no: int, rows: np.ndarray, budget: int, laps: Laps) -> Outcome:
        accuracy, by = self._evaluate(run, round_no, rows, None, laps)
        with laps("selection"):
            pool = self._pool(rows)
            selected = self.ws.select(pool, budget, derive_seed(run.seed, round_no, _SELECT), None, strategy="random")
        return Outcome(accuracy, by, selected)


class ProxyMethod(Method):
    """SVPp: a fresh proxy each round on the current generation's features (generation 0 forever here).

    Each round is the backend's round (selection/queue.py, the same functions on the same arrays, in task-id
    order, with the backend's seeds): the proxy trains on the labelled rows, the strategy ranks the pool, the
    audit picks are placed in that ranking, and the batch is its top, as an annotator who labels the queue from
    the top takes it. The proxy that ranks is the one evaluated, and each round records its accuracy estimated
    on the audit labels (cross-fitted), to set beside the test accuracy."""

    name = "svpp"

    def _queue(self, run: RunState) -> QueueSettings:
        """The backend's queue settings for this run: its seed is the project's SEED."""
        config = self.ws.config
        return QueueSettings(proxy=config.proxy, strategy=config.strategy, cold_start_strategy="random",
                             seed=run.seed, audit=config.audit())

    def _rank(self, run: RunState, round_no: int, rows: np.ndarray, budget: int, laps: Laps,
              x: np.ndarray | None = None) -> tuple[RoundInputs, RoundRanking]:
        """The round on the current features: the backend counts rounds from 1, and the audit from the first
        round (the initial labels are not audited)."""
        x = self._features(run, run.checkpoint, "train", "extraction", laps) if x is None else x
        queue = self._queue(run)
        if round_no == 0 and queue.audit.existing_random:  # the initial labels are random: they start the audit
            run.audit = sorted({*run.audit, *(int(r) for r in rows)})
        with laps("selection"):
            pool = self._pool(rows)
            inputs = RoundInputs.from_arrays(rows, x[rows], self.ws.dataset.train.labels[rows], pool, x[pool])
            ranking = rank_pool(inputs, queue, round_no + 1, self.ws.proxy_device, batch=budget)
            since_start = len(rows) - min(self.ws.config.initial, len(rows))
            place_audit(ranking, inputs, queue, since_start, len(self._audit_rows(run, rows)))
        return inputs, ranking

    def _audit_rows(self, run: RunState, rows: np.ndarray) -> np.ndarray:
        """The audit labels now: audit picks that are labelled."""
        return np.intersect1d(np.asarray(run.audit, dtype=np.int64), rows)

    def _select(self, run: RunState, inputs: RoundInputs, ranking: RoundRanking, budget: int) -> np.ndarray:
        """The top `budget` of the queue; its audit picks join the run's audit sample."""
        batch = next_batch(ranking, budget)
        picks = set(ranking.audit_rows.tolist())
        run.audit.extend(int(inputs.pool_ids[r]) for r in batch.tolist() if r in picks)
        return inputs.pool_ids[batch].astype(np.int64)

    def _audit_estimate(self, run: RunState, rows: np.ndarray, inputs: RoundInputs,
                        laps: Laps) -> dict[str, Any] | None:
        """The proxy's accuracy estimated on the audit labels, as the round job records it."""
        with laps("evaluation"):
            return audit_estimate(inputs, self._audit_rows(run, rows), self._queue(run), self.ws.proxy_device)

    def play(self, run: RunState, round_no: int, rows: np.ndarray, budget: int, laps: Laps) -> Outcome:
        inputs, ranking = self._rank(run, round_no, rows, budget, laps)
        accuracy, by = self._evaluate(run, round_no, rows, ranking.proxy, laps)
        extra = {"audit": self._audit_estimate(run, rows, inputs, laps)}
        return Outcome(accuracy, by, self._select(run, inputs, ranking, budget), extra)


class AlignedProxyMethod(ProxyMethod):
    """ASVP: SVPp plus the LogME-PED trigger and the training-method policy (``AlignmentPolicy``), and the
    backend's refresh gate: a refreshed generation serves only when the audit labels say it is better
    (``judge_features``). Fine-tuning never sees audit labels."""

    name = "asvp"
    gated: ClassVar[bool] = True

    def play(self, run: RunState, round_no: int, rows: np.ndarray, budget: int, laps: Laps) -> Outcome:
        ws = self.ws
        extra: dict[str, Any] = {}
        if run.held is not None and len(self._audit_rows(run, rows)) >= ws.config.audit_min_labels:
            extra["gate"] = self._judge(run, rows, str(run.held["checkpoint"]), laps)  # waited: judge it now
        generation = run.generation
        inputs, ranking = self._rank(run, round_no, rows, budget, laps)
        accuracy, by = self._evaluate(run, round_no, rows, ranking.proxy, laps, extra=extra)
        extra["audit"] = self._audit_estimate(run, rows, inputs, laps)
        decision = self.decide(run, inputs, laps)
        extra["decision"] = decision.to_dict()
        if decision.fires and budget == 0:
            # the backend would update now; here no batch is left to select on the new features, so the
            # fine-tune and re-extraction would cost without changing anything the curve shows
            extra["update_skipped"] = "last round: no batch left to select on new features"
        elif decision.fires and run.held is not None:
            extra["update_skipped"] = "a refreshed generation is waiting for audit labels"
        elif decision.fires:
            assert decision.method is not None
            extra["update"] = self._update(run, round_no, rows, decision.method, laps)
            extra["gate"] = self._judge(run, rows, extra["update"]["checkpoint"], laps)
        if run.generation != generation:  # the next batch is chosen on the new features
            inputs, ranking = self._rank(run, round_no, rows, budget, laps)
        return Outcome(accuracy, by, self._select(run, inputs, ranking, budget), extra)

    def decide(self, run: RunState, inputs: RoundInputs, laps: Laps) -> Decision:
        """The round job's alignment step (jobs/alignment.py after_round): the same scores, the same policy."""
        from asvp_backend.alignment.transferability import labelled_set_scores

        with laps("alignment"):
            score, score_ped = labelled_set_scores(inputs.x_lab, inputs.y_lab, inputs.x_pool, run.seed)
        history = [(int(labels), float(ped)) for labels, ped in run.scores]
        decision = self.ws.policy.decide(generation=run.generation, labelled=len(inputs.lab_ids), logme=score,
                                         logme_ped=score_ped, history=history, updates=run.updates,
                                         labels_at_last_update=run.labels_at_last_update)
        if score_ped is not None and (not history or history[-1][0] != len(inputs.lab_ids)):
            run.scores.append([len(inputs.lab_ids), score_ped])
        return decision

    def _update(self, run: RunState, round_no: int, rows: np.ndarray, method: str, laps: Laps) -> dict[str, Any]:
        """Feature alignment: fine-tune on the current labels but the audit ones, save the backbone, extract
        the candidate generation (it serves once the gate adopts it)."""
        from asvp_backend.alignment.checkpoint import save_checkpoint

        ws = self.ws
        folder = f"runs/{run.name}/g{run.generation + 1}-u{run.updates + 1}"
        trained = np.setdiff1d(rows, self._audit_rows(run, rows))
        with laps("training"):
            result = ws.finetune(method, trained, derive_seed(run.seed, round_no, _FINETUNE))
            save_checkpoint(result, ws.out / folder)
        run.updates += 1
        run.labels_at_last_update = len(rows)
        before = laps.seconds["extraction"]
        self._features(run, folder, "train", "extraction", laps)
        return {"generation": run.generation + 1, "checkpoint": folder, "method": method, "labels": len(rows),
                "trained_on": len(trained), "finetune_seconds": result.metrics.get("seconds"),
                "extraction_seconds": laps.seconds["extraction"] - before}  # fmt: skip

    def _judge(self, run: RunState, rows: np.ndarray, folder: str, laps: Laps) -> dict[str, Any]:
        """The gate's verdict on the candidate generation in `folder` (adopted, rejected or held), as the round
        job judges it (labelled rows in task-id order, the project's seed), with what the test split says of
        the same two proxies (the truth the gate cannot see, for its error rates)."""
        ws = self.ws
        labels = ws.dataset.train.labels
        rows = np.sort(rows)
        x_new = self._features(run, folder, "train", "extraction", laps)
        x_old = self._features(run, run.checkpoint, "train", "extraction", laps)
        with laps("alignment"):
            verdict = judge_features(ws.config.gate(), self._make_proxy(run), x_new[rows], x_old[rows],
                                     labels[rows], np.isin(rows, self._audit_rows(run, rows)), seed=run.seed)
        truth = {side: ws.proxy_accuracy(ws.fit_proxy(x[rows], labels[rows], run.seed),
                                         ws.features(checkpoint, "test").vectors, labels[rows])[0]
                 for side, x, checkpoint in (("challenger", x_new, folder), ("incumbent", x_old, run.checkpoint))}
        adopted = verdict.adopts or not self.gated
        held = not adopted and verdict.decision == WAIT
        run.held = {"checkpoint": folder} if held else None
        if adopted:
            run.generation += 1
            run.checkpoint = folder
            run.scores = []
        outcome = "adopted" if adopted else "waiting" if held else "rejected"
        return {"outcome": outcome, "labels": len(rows), "checkpoint": folder, **verdict.to_dict(),
                "test_challenger": round(truth["challenger"], 4), "test_incumbent": round(truth["incumbent"], 4)}


class UngatedProxyMethod(AlignedProxyMethod):
    """ASVP without the gate (``ALIGN_GATE=false``): every refresh serves; the gate's verdict is still recorded,
    so its false-adopt and false-reject rates can be counted against the test split."""

    name = "asvp-ungated"
    gated = False


class StandardMethod(Method):
    """Standard AL: fine-tune (FT, from the pre-trained weights) every round; select with its softmax."""

    name = "standard"

    def play(self, run: RunState, round_no: int, rows: np.ndarray, budget: int, laps: Laps) -> Outcome:
        ws = self.ws
        pool = self._pool(rows)
        labels = ws.dataset.train.labels[rows]
        seed = derive_seed(run.seed, round_no, _SELECT)
        if len(set(labels.tolist())) < 2:
            with laps("selection"):
                selected = ws.select(pool, budget, seed, None)
            return Outcome(constant_accuracy(labels, ws.dataset.test.labels), "constant", selected)
        with laps("training"):
            result = ws.finetune("ft", rows, derive_seed(run.seed, round_no, _FINETUNE))
        with laps("selection"):
            probs = ws.classify(result, ws.dataset.train, pool, "pool softmax") if budget and len(pool) else None
            selected = ws.select(pool, budget, seed, probs)
        with laps("evaluation"):
            test = ws.dataset.test
            test_probs = ws.classify(result, test, np.arange(len(test)), "test ft")
        return Outcome(float(np.mean(test_probs.argmax(axis=1) == test.labels)), "ft", selected)


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (RandomMethod, ProxyMethod, AlignedProxyMethod, UngatedProxyMethod, StandardMethod)
}


# ------------------------------------------------------------------------------------------------- runner


StopHook = Callable[[str, int, int], bool]  # (method, seed, finished round) -> stop now?


class ConfigMismatchError(ValueError):
    """OUT holds rounds of a simulation with other settings: continuing would mix two experiments."""


class Simulation:
    """Run every (seed, method) to ``config.rounds``, continuing from OUT/progress where runs stopped."""

    def __init__(self, config: SimulationConfig, out: Path | str, progress: bool = True) -> None:
        self.config = config
        self.out = Path(out)
        self.progress = progress
        self.dataset: Dataset | None = None
        self.stopped = False

    @property
    def progress_dir(self) -> Path:
        return self.out / "progress"

    def _check_config(self, dataset: Dataset) -> None:
        path = self.out / "config.json"
        mine: dict[str, Any] = {**self.config.identity(), "dataset_key": dataset.key}
        if path.is_file():
            theirs: dict[str, Any] = json.loads(path.read_text()).get("identity") or {}
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise ConfigMismatchError(
                    f"{self.out} holds a simulation with other settings ({', '.join(diff)} differ); use another "
                    "--out, or delete it to start over"
                )
        atomic_write_bytes(path, json.dumps({"identity": mine, "config": self.config.to_dict()}, indent=1).encode())

    def load_run(self, method: str, seed: int) -> RunState:
        path = self.progress_dir / f"{method}-seed{seed}.json"
        if not path.is_file():
            return RunState(method, seed)
        try:
            return RunState.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable progress record ({exc}); delete it to redo that run") from None

    def _save_run(self, run: RunState) -> None:
        data = json.dumps(run.to_dict(), separators=(",", ":")).encode()
        atomic_write_bytes(self.progress_dir / f"{run.name}.json", data)

    def initial_set(self, seed: int) -> np.ndarray:
        """The seed's random initial labels: the same for every method."""
        assert self.dataset is not None
        n = len(self.dataset.train)
        rng = np.random.default_rng(derive_seed(seed, 0, _INITIAL))
        return np.sort(rng.choice(n, size=min(self.config.initial, n), replace=False)).astype(np.int64)

    def run(self, should_stop: StopHook | None = None) -> list[RunState]:
        """Play every run to the end (or until ``should_stop`` says so after a persisted round)."""
        from tqdm import tqdm

        cfg = self.config
        # an unreadable image (truncated, not an image) is left out with its reason, never a failed run
        self.dataset = dataset = load_dataset(cfg.dataset, cfg.subset, cfg.test_subset, cfg.data_seed,
                                              skip_unreadable=True)  # fmt: skip
        for image, reason in dataset.skipped:
            log.warning("skipped unreadable image %s: %s", image, reason)
        if cfg.initial > len(dataset.train):
            raise ValueError(f"--initial {cfg.initial} exceeds the {len(dataset.train)} train items")
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_config(dataset)
        ws = Workspace(cfg, dataset, self.out, self.progress)
        runs = [self.load_run(m, s) for s in range(cfg.seeds) for m in cfg.methods]
        per_run = cfg.rounds + 1
        done = sum(min(len(r.rounds), per_run) for r in runs)
        self.stopped = False
        with tqdm(total=len(runs) * per_run, initial=done, desc="rounds", unit="round", dynamic_ncols=True,
                  disable=not self.progress) as bar:  # fmt: skip
            for run in runs:
                method = METHODS[run.method](ws)
                while len(run.rounds) < per_run and not self._exhausted(run):
                    self._play_round(method, run, ws)
                    bar.update(1)
                    bar.set_postfix_str(f"{run.name} labels={len(run.labelled)} "
                                        f"acc={run.rounds[-1]['accuracy']:.3f}")  # fmt: skip
                    if should_stop is not None and should_stop(run.method, run.seed, run.rounds[-1]["round"]):
                        self.stopped = True
                        return runs
        return runs

    def _exhausted(self, run: RunState) -> bool:
        """The pool ran out before the last round."""
        return bool(run.rounds) and bool(run.rounds[-1].get("exhausted"))

    def _play_round(self, method: Method, run: RunState, ws: Workspace) -> None:
        round_no = len(run.rounds)
        added = self.initial_set(run.seed) if round_no == 0 else np.asarray(run.rounds[-1]["selected"], np.int64)
        rows = np.concatenate([np.asarray(run.labelled, dtype=np.int64), added])
        budget = self.config.budget_per_round if round_no < self.config.rounds else 0
        laps = Laps()
        generation = run.generation
        outcome = method.play(run, round_no, rows, budget, laps)
        run.labelled = [int(i) for i in rows]
        run.device = ws.device.type
        run.rounds.append({
            "round": round_no,
            "labels": len(rows),
            "accuracy": outcome.accuracy,
            "evaluated_by": outcome.evaluated_by,
            "generation": generation,
            "added": [int(i) for i in added],
            "selected": [int(i) for i in outcome.selected],
            "exhausted": budget > 0 and len(outcome.selected) == 0,
            "seconds": {k: round(v, 4) for k, v in laps.seconds.items()},
            **outcome.extra,
        })  # fmt: skip
        self._save_run(run)
