"""A fake Label Studio client for fast tests of the job layer's write order and convergence.

It keeps projects, tasks and predictions in memory, records every call, and can be told to fail at the
n-th call of a method (a crash between two writes). The e2e tests cover the real Label Studio."""

from __future__ import annotations

from collections import Counter
from typing import Any


class InjectedFault(RuntimeError):
    pass


class FakeLabelStudio:
    def __init__(self, label_config: str, tasks: list[dict[str, Any]]) -> None:
        self.url = "http://ls.invalid"
        self.label_config = label_config
        self.tasks = {int(t["id"]): t for t in tasks}
        self.predictions: list[dict[str, Any]] = []
        self.project: dict[str, Any] = {"model_version": "", "sampling": "Sequential sampling"}
        self.calls: list[str] = []
        self.fail_on: tuple[str, int] | None = None  # (method, n): the n-th call of method raises
        # Label Studio's webhooks: called with the annotated task's id on every annotate/unannotate (a test
        # that drops it models lost webhooks)
        self.on_change: Any = None
        self._counts: Counter[str] = Counter()

    def _call(self, name: str) -> None:
        self._counts[name] += 1
        self.calls.append(name)
        if self.fail_on is not None and self.fail_on == (name, self._counts[name]):
            raise InjectedFault(f"injected failure in {name}")

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": "Token fake"}

    def get_project(self, pid: int) -> dict[str, Any]:
        self._call("get_project")
        return {"id": pid, "label_config": self.label_config, "task_number": len(self.tasks), **self.project}

    def update_project(self, pid: int, **fields: Any) -> dict[str, Any]:
        self._call("update_project")
        self.project.update(fields)
        return self.project

    def iter_tasks(self, pid: int, page_size: int = 500):
        self._call("iter_tasks")
        yield from (dict(t) for t in self.tasks.values())

    def tasks_after(self, pid: int, task_id: int, page_size: int = 500) -> list[dict[str, Any]]:
        self._call("tasks_after")
        return [dict(self.tasks[t]) for t in sorted(self.tasks) if t > task_id][:page_size]

    def newest_task_id(self, pid: int) -> int | None:
        self._call("newest_task_id")
        return max(self.tasks, default=None)

    def get_task(self, task_id: int) -> dict[str, Any] | None:
        self._call("get_task")
        task = self.tasks.get(int(task_id))
        return None if task is None else dict(task)

    def import_predictions(self, pid: int, predictions: list[dict[str, Any]]) -> int:
        self._call("import_predictions")
        self.predictions.extend(predictions)
        return len(predictions)

    def model_versions(self, pid: int) -> dict[str, int]:
        self._call("model_versions")
        return dict(Counter(p["model_version"] for p in self.predictions))

    def delete_model_version(self, pid: int, version: str) -> None:
        self._call("delete_model_version")
        self.predictions = [p for p in self.predictions if p["model_version"] != version]

    def ensure_ranking_view(self, pid: int) -> int:
        self._call("ensure_ranking_view")
        return 1

    # helpers for tests
    def annotate(self, task_id: int, label: str, from_name: str = "label") -> None:
        result = [{"from_name": from_name, "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
        self.tasks[task_id]["annotations"] = [{"id": task_id, "result": result, "was_cancelled": False,
                                               "updated_at": "2026-01-01T00:00:00Z"}]
        if self.on_change is not None:
            self.on_change(task_id)

    def unannotate(self, task_id: int) -> None:
        self.tasks[task_id]["annotations"] = []
        if self.on_change is not None:
            self.on_change(task_id)

    def versions_with_predictions(self) -> set[str]:
        return {p["model_version"] for p in self.predictions}
