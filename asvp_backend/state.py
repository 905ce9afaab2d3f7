"""Per-project state: label config, version counters, last sync, score history, rounds, and what the
status page shows of them (the project's title, how labellers treated the pre-annotations, config changes).

Two interchangeable stores behind one small interface: Redis when REDIS_URL is set (the API and every
worker see the same state), otherwise JSON files under MODEL_DIR (the embedded default). Every change is a
read-modify-write under a per-project lock, so a webhook burst or two workers cannot lose an update, and
files are replaced atomically, so a crash never leaves half a state behind.

The synced task list (ids, image URLs, labels) is bigger than the state and lives next to the feature
store on the shared volume (`TaskSnapshot`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from asvp_backend.alignment.policy import deliverable_rank
from asvp_backend.fsutil import atomic_write_bytes, flocked
from asvp_backend.labelstudio.label_config import ClassificationSpec
from asvp_backend.layout import ProjectLayout, projects_root
from asvp_backend.versioning import ModelVersion

log = logging.getLogger(__name__)

MAX_VERSIONS = 50
MAX_ROUNDS = 200
MAX_SCORES = 1000  # LogME-PED scores kept: the trend over ALIGN_WINDOW labels needs one per round
MAX_JOB_IDS = 100


MAX_DECISIONS = 200
MAX_MODELS = 50
MAX_CONFIG_CHANGES = 50


class PendingStage(StrEnum):
    """Where a feature update stands (`AlignmentState.pending["stage"]`); stored as its text."""

    FINETUNE = "finetune"  # the `align` job fine-tunes the backbone
    EXTRACT = "extract"  # its backbone extracts the next generation
    JUDGE = "judge"  # the complete generation waits for enough audit labels to be judged


@dataclass
class AlignmentState:
    """Feature and training alignment of one project (alignment/policy.py makes the decisions).

    `scores` holds each round's LogME and LogME-PED with its generation: the policy compares a round with
    the previous round of the same generation, so an update starts a fresh history. `pending` is set from
    the moment an update fires until its generation serves, so that two updates never overlap. `models`
    are the fine-tuned models on disk (MODEL_DIR/projects/<id>/models/<model id>/), and
    `generation_models` says which of them extracted each refreshed generation (its head can then score
    the cached features directly).
    """

    updates: int = 0
    labels_at_last_update: int = 0
    scores: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Any] | None = None
    feature_model: str | None = None  # the model whose backbone extracts the next or current generation
    generation_models: dict[str, str] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)

    def record_score(self, score: dict[str, Any]) -> None:
        self.scores.append(score)
        del self.scores[:-MAX_SCORES]

    def record_decision(self, decision: dict[str, Any]) -> None:
        self.decisions.append(decision)
        del self.decisions[:-MAX_DECISIONS]

    def record_model(self, model: dict[str, Any]) -> None:
        self.models.append(model)
        del self.models[:-MAX_MODELS]

    def score_history(self, generation: int) -> list[tuple[int, float]]:
        """(labels, LogME-PED) of the scored rounds on `generation`, oldest first: the policy's trend input."""
        return [(int(s["labelled"]), float(s["logme_ped"])) for s in self.scores
                if s.get("generation") == generation and s.get("logme_ped") is not None
                and s.get("labelled") is not None]

    def current_model(self, damaged: Collection[str] = ()) -> dict[str, Any] | None:
        """The deliverable: the best-ranked model (alignment/policy.py `deliverable_rank`: the one trained on
        the most labels; on a tie, one the proxy did not beat, then the more accurate on the audit labels).
        None when no model exists, or when that model lost to the proxy on the same labels (`verdict` "proxy",
        jobs/alignment.py): the proxy is then the better model, and no worse model is named as the
        deliverable. `damaged`: ids of models whose checkpoint files are not whole
        (alignment/integrity.py); they are passed over."""
        newest = self.newest_model(damaged)
        return None if newest is None or newest.get("verdict") == "proxy" else newest

    def newest_model(self, damaged: Collection[str] = ()) -> dict[str, Any] | None:
        """The best-ranked model, whatever its verdict (`export --even-if-worse` writes it),
        among those not `damaged`."""
        whole = [m for m in self.models if m.get("id") not in damaged]
        if not whole:
            return None
        return max(whole, key=deliverable_rank)


@dataclass
class AcceptanceState:
    """How labellers treated the served pre-annotations (the definition: learning.py), counted by the sync.

    `by_version` holds, per model version that served them, how many were accepted as-is and how many
    corrected; `accepted` and `corrected` are the totals (kept when old versions are trimmed). Each Label
    Studio annotation counts once: `last_annotation` is the highest annotation id counted, and only higher
    ids count. Annotation ids only grow, so two syncs that see the same annotations (a sync and Start
    Training's sync at once, a retried sync) cannot count one twice; the price is that an annotation whose
    id is below one already counted when it first appears (a transaction committed late) is not counted.
    """

    by_version: dict[str, dict[str, int]] = field(default_factory=dict)
    accepted: int = 0
    corrected: int = 0
    last_annotation: int | None = None

    def record(self, reviews: Iterable[tuple[int, str, bool]]) -> int:
        """Count (annotation id, model version, accepted as-is) reviews not counted yet; returns how many."""
        floor = self.last_annotation if self.last_annotation is not None else -1
        fresh = sorted(r for r in reviews if r[0] > floor)
        for _, version, accepted in fresh:
            counts = self.by_version.setdefault(version, {"accepted": 0, "corrected": 0})
            key = "accepted" if accepted else "corrected"
            counts[key] += 1
            setattr(self, key, getattr(self, key) + 1)
        if fresh:
            self.last_annotation = fresh[-1][0]
        for version in list(self.by_version)[:-MAX_ROUNDS]:  # the oldest first: insertion order
            del self.by_version[version]
        return len(fresh)


@dataclass
class AuditState:
    """The audit sample of one project (selection/audit.py draws it, alignment/gate.py judges with it).

    `started_labelled` is the number of labels when the first audited round ran: labels given before it are
    not audit labels (how they were chosen is unknown), unless AUDIT_EXISTING=random says they were drawn at
    random. `tasks` are the audit tasks: those labelled while
    they were audit picks, and the unlabelled picks of the latest round; a pick a later round no longer places
    leaves the list, so a task the strategy chose later is never counted as an audit label.
    """

    started_labelled: int | None = None
    tasks: list[int] = field(default_factory=list)

    def started(self, labelled_now: Iterable[int], labelled_total: int, existing_random: bool) -> AuditState:
        """The audit as the first round starts it (itself once started): the labels given before it are audit
        labels only when the user says they were drawn at random (AUDIT_EXISTING=random)."""
        if self.started_labelled is not None:
            return self
        return AuditState(labelled_total, sorted({int(t) for t in labelled_now}) if existing_random else [])

    def labelled(self, tasks: Mapping[int, Any]) -> list[int]:
        """The audit labels: audit tasks that are labelled now."""
        return [tid for tid in self.tasks if tid in tasks and tasks[tid].label is not None]

    def placed(self, tasks: Mapping[int, Any], picks: Iterable[int]) -> None:
        """A round placed `picks`: keep the labelled audit tasks and these picks."""
        self.tasks = sorted(set(self.labelled(tasks)) | {int(t) for t in picks})


@dataclass
class ProjectState:
    project_id: int
    label_config: str
    spec: ClassificationSpec
    generation: int = 0
    round: int = 0
    versions: list[str] = field(default_factory=list)  # oldest first
    last_sync: dict[str, Any] | None = None
    labels_at_last_round: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    alignment: AlignmentState = field(default_factory=AlignmentState)
    updated_at: float = field(default_factory=time.time)
    title: str | None = None  # the Label Studio project's title, as the last sync read it
    acceptance: AcceptanceState = field(default_factory=AcceptanceState)
    config_changes: list[dict[str, Any]] = field(default_factory=list)  # oldest first (config_change)
    audit: AuditState = field(default_factory=AuditState)
    last_full_sync: float | None = None  # when the last complete read of every task started (jobs/tasks.py)
    reconcile: dict[str, Any] | None = None  # a reconcile under way: its start, reason and the last task id read

    @property
    def version(self) -> ModelVersion:
        return ModelVersion(self.generation, self.round)

    def reconcile_due(self, every: int, now: float) -> bool:
        """RECONCILE_EVERY: a full read is due when none was made or the last is `every` seconds old (0: never
        on a schedule). The sync job and the API's schedule (server/reconcile.py) both ask this."""
        return bool(every) and (self.last_full_sync is None or now - self.last_full_sync >= every)

    def advance_round(self) -> ModelVersion:
        """Move to the next round of the same generation and record the version."""
        return self.advance_to(self.version.next_round())

    def advance_to(self, version: ModelVersion) -> ModelVersion:
        """The only way a version moves: forward, never back (a stale job cannot rewind a project)."""
        if version.round <= self.round or version.generation < self.generation:
            raise ValueError(f"version {version} does not move forward from {self.version}")
        self.generation, self.round = version.generation, version.round
        self._record_version(version)
        return version

    def _record_version(self, version: ModelVersion) -> None:
        text = str(version)
        if text not in self.versions:
            self.versions.append(text)
        del self.versions[:-MAX_VERSIONS]

    def record_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        del self.rounds[:-MAX_ROUNDS]

    def record_job(self, job_id: str) -> None:
        self.job_ids.append(job_id)
        del self.job_ids[:-MAX_JOB_IDS]

    def record_config_change(self, change: dict[str, Any] | None) -> None:
        """Keep an entry made by `config_change` (None: nothing changed, nothing kept)."""
        if change is not None:
            self.config_changes.append(change)
            del self.config_changes[:-MAX_CONFIG_CHANGES]

    def to_json(self) -> str:
        data = asdict(self)
        data["spec"]["labels"] = list(self.spec.labels)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "state") -> ProjectState:
        """Parse a stored state; anything unreadable is a StateCorrupt that names `where` and the problem."""
        try:
            data = json.loads(text)
            data.pop("score_history", None)  # an unused field of states written before alignment existed
            spec = data.pop("spec")
            spec["labels"] = tuple(spec["labels"])
            alignment = AlignmentState(**data.pop("alignment", None) or {})
            acceptance = AcceptanceState(**data.pop("acceptance", None) or {})  # absent in older states
            audit = AuditState(**data.pop("audit", None) or {})  # absent in older states
            return cls(spec=ClassificationSpec(**spec), alignment=alignment, acceptance=acceptance, audit=audit,
                       **data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateCorrupt(where, f"{type(exc).__name__}: {str(exc)[:200]}") from None

    @classmethod
    def new(cls, project_id: int, label_config: str, spec: ClassificationSpec) -> ProjectState:
        state = cls(project_id=project_id, label_config=label_config, spec=spec)
        state._record_version(state.version)
        return state

    @classmethod
    def recovered(cls, project_id: int, label_config: str, spec: ClassificationSpec,
                  versions_on_disk: list[str]) -> ProjectState:
        """A fresh state for a project whose stored state was lost or corrupt. It resumes from the newest
        round folder on disk, so the version never moves backwards behind what Label Studio follows."""
        state = cls.new(project_id, label_config, spec)
        parsed = []
        for text in versions_on_disk:
            try:
                parsed.append(ModelVersion.parse(text))
            except ValueError:
                continue
        if parsed:
            newest = max(parsed)
            if newest.round > 0:
                state.advance_to(newest)
        return state


def config_change(old_spec: ClassificationSpec | None, new_spec: ClassificationSpec, *, source: str = "sync",
                  at: float | None = None) -> dict[str, Any] | None:
    """The entry `ProjectState.record_config_change` keeps when a sync or /setup sees a label config that
    serves differently: when, from where, the classes added and removed, the classes now, and which other
    parts of the spec changed (`other`: from_name, to_name, image_key; "aliases" when a kept class is written
    differently; "order" when the same classes are listed in another order). None when the spec is the same:
    an edit of the layout or of whitespace changes nothing the backend does."""
    if old_spec is None or old_spec == new_spec:
        return None
    old, new = list(old_spec.labels), list(new_spec.labels)
    other = [name for name in ("from_name", "to_name", "image_key")
             if getattr(old_spec, name) != getattr(new_spec, name)]
    old_written = dict(zip(old, old_spec.result_values, strict=True))
    new_written = dict(zip(new, new_spec.result_values, strict=True))
    if any(old_written[c] != new_written[c] for c in old if c in new_written):
        other.append("aliases")
    if set(old) == set(new) and old != new:
        other.append("order")
    return {"at": time.time() if at is None else at, "source": source,
            "added": [c for c in new if c not in old], "removed": [c for c in old if c not in new],
            "classes": new, "other": other}


class ProjectNotFound(KeyError):
    """No state for this project: it was never set up through /setup."""


class StateCorrupt(ValueError):
    """A stored state (or task snapshot) cannot be read. It names the file and what is wrong; the project
    is repaired by `/setup` or by the next sync (both rebuild it from Label Studio), and no other project is
    affected."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where} is corrupt: {problem}")
        self.where, self.problem = where, problem


class StateStore(ABC):
    """Where project state lives. `update` is the only way to change a project."""

    @abstractmethod
    def get(self, project_id: int) -> ProjectState | None: ...

    @abstractmethod
    def project_ids(self) -> list[int]: ...

    @abstractmethod
    def exists(self, project_id: int) -> bool:
        """Cheap check for hot paths (the webhook) that must not parse the whole state."""

    @abstractmethod
    def _lock(self, project_id: int) -> contextlib.AbstractContextManager[None]: ...

    @abstractmethod
    def _write(self, state: ProjectState) -> None: ...

    def update(
        self,
        project_id: int,
        change: Callable[[ProjectState | None], ProjectState | None],
    ) -> ProjectState | None:
        """Apply `change` to the current state under the project's lock and store what it returns."""
        with self._lock(project_id):
            new = change(self.get(project_id))
            if new is not None:
                new.updated_at = time.time()
                self._write(new)
            return new

    def require(self, project_id: int) -> ProjectState:
        state = self.get(project_id)
        if state is None:
            raise ProjectNotFound(project_id)
        return state

    def readable(self) -> tuple[list[ProjectState], dict[int, str]]:
        """Every project's state, and the problem of each one that cannot be read: one corrupt project
        must never make a listing fail for the others."""
        states, problems = [], {}
        for pid in self.project_ids():
            try:
                state = self.get(pid)
            except StateCorrupt as exc:
                problems[pid] = str(exc)
                continue
            if state is not None:
                states.append(state)
        return states, problems

    @abstractmethod
    def quarantine(self, project_id: int) -> str | None:
        """Move a corrupt state aside (kept for a person to inspect); returns where it went."""


class FileStateStore(StateStore):
    """JSON per project (`ProjectLayout.state_file`), locked with flock."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)

    def _path(self, project_id: int) -> Path:
        return ProjectLayout(self.model_dir, project_id).state_file

    def get(self, project_id: int) -> ProjectState | None:
        path = self._path(project_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return ProjectState.from_json(raw, where=str(path))

    def quarantine(self, project_id: int) -> str | None:
        path = self._path(project_id)
        if not path.exists():
            return None
        target = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        path.rename(target)
        log.warning("project %s: moved the corrupt %s aside to %s", project_id, path, target.name)
        return str(target)

    def exists(self, project_id: int) -> bool:
        return self._path(project_id).exists()

    def project_ids(self) -> list[int]:
        root = projects_root(self.model_dir)
        if not root.is_dir():
            return []
        return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and self._path(int(p.name)).exists())

    def _lock(self, project_id: int) -> contextlib.AbstractContextManager[None]:
        return flocked(ProjectLayout(self.model_dir, project_id).state_lock)

    def _write(self, state: ProjectState) -> None:
        atomic_write_bytes(self._path(state.project_id), state.to_json().encode())


class RedisStateStore(StateStore):
    """One JSON string per project in Redis; a Redis lock serialises writers across processes."""

    PREFIX = "asvp:project:"

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def get(self, project_id: int) -> ProjectState | None:
        key = f"{self.PREFIX}{int(project_id)}"
        raw = self.redis.get(key)
        return None if raw is None else ProjectState.from_json(raw, where=f"Redis key {key}")

    def quarantine(self, project_id: int) -> str | None:
        key = f"{self.PREFIX}{int(project_id)}"
        target = f"asvp:corrupt:{int(project_id)}:{int(time.time())}"
        if not self.redis.exists(key):
            return None
        self.redis.rename(key, target)
        log.warning("project %s: moved the corrupt state %s aside to %s", project_id, key, target)
        return target

    def exists(self, project_id: int) -> bool:
        return bool(self.redis.exists(f"{self.PREFIX}{int(project_id)}"))

    def project_ids(self) -> list[int]:
        ids = []
        for key in self.redis.scan_iter(match=f"{self.PREFIX}*", count=500):
            key = key.decode() if isinstance(key, bytes) else key
            suffix = key[len(self.PREFIX) :]
            if suffix.isdigit():
                ids.append(int(suffix))
        return sorted(ids)

    @contextlib.contextmanager
    def _lock(self, project_id: int) -> Iterator[None]:
        with self.redis.lock(f"asvp:lock:project:{int(project_id)}", timeout=30, blocking_timeout=30):
            yield

    def _write(self, state: ProjectState) -> None:
        self.redis.set(f"{self.PREFIX}{state.project_id}", state.to_json())


@dataclass
class SyncedTask:
    image: str | None
    label: str | None
    problem: str | None = None  # why the task's image value cannot be used (the extract job records it)
    annotations: tuple[int, ...] = ()  # its annotations' ids: a deletion event names only those (jobs/changes.py)


class TaskSnapshot:
    """The project's tasks as Label Studio last reported them: id -> image URL and label (or None).

    Stored as one JSON file on the shared volume and replaced atomically by each sync. An unreadable
    snapshot raises StateCorrupt rather than reading as "no tasks" (which would make the extract job drop
    every cached vector); the sync rebuilds it from Label Studio.
    """

    def __init__(self, model_dir: Path, project_id: int) -> None:
        self.path = ProjectLayout(model_dir, project_id).tasks_file

    def load(self) -> dict[int, SyncedTask]:
        try:
            raw = json.loads(self.path.read_bytes())
            return {int(k): SyncedTask(v[0], v[1], v[2] if len(v) > 2 else None, tuple(v[3]) if len(v) > 3 else ())
                    for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            raise StateCorrupt(str(self.path), f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def save(self, tasks: dict[int, SyncedTask]) -> None:
        payload = {str(k): [t.image, t.label] + ([t.problem, list(t.annotations)] if t.annotations else
                                                 [t.problem] if t.problem else []) for k, t in tasks.items()}
        atomic_write_bytes(self.path, json.dumps(payload, separators=(",", ":")).encode())


def create_state_store(model_dir: Path, redis: Any | None) -> StateStore:
    return FileStateStore(model_dir) if redis is None else RedisStateStore(redis)
