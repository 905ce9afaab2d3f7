"""Fencing: a job whose lease was lost writes nothing more. The one place where the checks are wired in.

`run_job` gives each job a runtime whose state store and Label Studio client call the job's fence (its
lease's `check`, jobs/leases.py) right before every write: each Label Studio write (delete a version,
import a batch of predictions, PATCH the project, the Data Manager tab, any non-GET `request`) and each
state write (`StateStore.update` checks under the project's lock, just before storing; `quarantine`). The
artefact writes that are plain file operations (a round folder, a ranking, a checkpoint, a generation's
activation) call `ctx.check_fence()` themselves, right before they happen.

The check is a Redis GET, then the write: not atomic against Label Studio, which knows nothing of our
tokens. A job paused between a passed check and its write still makes that one write late; the residual
window is one HTTP call (one batch of PREDICTION_BATCH predictions) or one state write, not the rest of
the job. A state write is also ordered by the state lock: a check passed under it precedes every write
of the next holder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from asvp_backend.labelstudio.client import PREDICTION_BATCH
from asvp_backend.state import ProjectState, StateStore

Fence = Callable[[], None]


class FencedLabelStudio:
    """A Label Studio client whose writes are fenced; reads pass through unchanged."""

    def __init__(self, client: Any, fence: Fence) -> None:
        self._client = client
        self._fence = fence

    def __getattr__(self, name: str) -> Any:  # reads: get_project, iter_tasks, model_versions, url, ...
        return getattr(self._client, name)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if method.upper() not in {"GET", "HEAD", "OPTIONS"}:
            self._fence()
        return self._client.request(method, path, **kwargs)

    def update_project(self, project_id: int, **fields: Any) -> Any:
        self._fence()
        return self._client.update_project(project_id, **fields)

    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> int:
        """Checked before each batch: a job that loses its lease mid-import stops at the next batch."""
        if not predictions:
            self._fence()
            return int(self._client.import_predictions(project_id, predictions) or 0)
        done = 0
        for start in range(0, len(predictions), PREDICTION_BATCH):
            self._fence()
            done += int(self._client.import_predictions(project_id, predictions[start : start + PREDICTION_BATCH]))
        return done

    def delete_model_version(self, project_id: int, version: str) -> None:
        self._fence()
        self._client.delete_model_version(project_id, version)

    def ensure_ranking_view(self, project_id: int) -> int:
        self._fence()
        return int(self._client.ensure_ranking_view(project_id))


class FencedStateStore(StateStore):
    """A state store whose writes are fenced: `update` runs the fence under the project's lock, right
    before it stores the changed state (the base class's update calls `_write` there)."""

    def __init__(self, inner: StateStore, fence: Fence) -> None:
        self.inner = inner
        self._fence = fence

    def get(self, project_id: int) -> ProjectState | None:
        return self.inner.get(project_id)

    def project_ids(self) -> list[int]:
        return self.inner.project_ids()

    def exists(self, project_id: int) -> bool:
        return self.inner.exists(project_id)

    def _lock(self, project_id: int) -> contextlib.AbstractContextManager[None]:
        return self.inner._lock(project_id)

    def _write(self, state: ProjectState) -> None:
        self._fence()
        self.inner._write(state)

    def quarantine(self, project_id: int) -> str | None:
        self._fence()
        return self.inner.quarantine(project_id)
