"""The Label Studio API, as this backend uses it: read tasks and labels, write predictions and versions.

Authentication goes through label-studio-sdk, which accepts a legacy token or a personal access token
(and refreshes the PAT's short-lived access token). The calls themselves are plain HTTP on Label Studio's
documented routes: we page through tens of thousands of tasks and push predictions in batches, where the
SDK's typed models would only add parsing cost. Errors never carry the token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import requests

log = logging.getLogger(__name__)

PREDICTION_BATCH = 500  # Label Studio imports predictions in batches of 500 as well
VIEW_TITLE = "ASVP: label next"
NOT_JSON_PREVIEW = 100  # bytes of a non-JSON reply quoted in the error


class LabelStudioError(RuntimeError):
    """A Label Studio call failed; the message names the call and the status, never the token.

    `status` is the HTTP status Label Studio answered, None when no answer came (connection error,
    timeout), so callers branch on it instead of parsing the message."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LabelStudioClient:
    def __init__(self, url: str, api_key: str, timeout: float = 30.0) -> None:
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.timeout = timeout
        self._api_key = api_key  # kept only to mask it in error messages
        try:
            self._sdk = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)
        except Exception as exc:  # the SDK refuses an expired personal access token here
            raise _token_error(exc) from None
        self._session = requests.Session()

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header Label Studio expects (Token <legacy> or Bearer <access JWT>)."""
        try:
            headers = self._sdk._client_wrapper.get_headers()
        except Exception as exc:  # refreshing a personal access token failed (refused, or no answer)
            raise _token_error(exc) from None
        return {"Authorization": headers["Authorization"]}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout)
        headers = self.auth_headers()
        try:
            response = self._session.request(method, self.url + path, headers=headers, **kwargs)
        except requests.RequestException as exc:
            raise LabelStudioError(f"{method} {path}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            detail = self._quoted(response.content, 300, headers).replace("\n", " ")
            raise LabelStudioError(f"{method} {path}: HTTP {response.status_code}: {detail}", response.status_code)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:  # a proxy's login page, an HTML error page: say what came instead of JSON
            content_type = response.headers.get("content-type", "no content type")
            start = self._quoted(response.content, NOT_JSON_PREVIEW, headers)
            raise LabelStudioError(
                f"{method} {path}: HTTP {response.status_code} answered {content_type!r}, not JSON: {start!r}",
                response.status_code,
            ) from None

    def _quoted(self, content: bytes, length: int, headers: dict[str, str]) -> str:
        """The first `length` characters of a reply, without our token should the page echo it back. Masked
        before it is cut, so that no prefix of the token survives at the cut."""
        secrets = [s for s in (self._api_key, headers["Authorization"].partition(" ")[2]) if len(s) >= 4]
        text = content[: length + max((len(s) for s in secrets), default=0)].decode("utf-8", "replace")
        for secret in secrets:
            text = text.replace(secret, "***")
        return text[:length]

    # ------------------------------------------------------------------ projects
    def get_project(self, project_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/projects/{int(project_id)}/")

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        return self.request("PATCH", f"/api/projects/{int(project_id)}/", json=fields)

    # ------------------------------------------------------------------ tasks
    def iter_tasks(self, project_id: int, page_size: int = 500) -> Iterator[dict[str, Any]]:
        """Every task of the project with its annotations, page by page."""
        page = 1
        while True:
            params = {"project": int(project_id), "page": page, "page_size": page_size, "fields": "all"}
            try:
                body = self.request("GET", "/api/tasks", params=params)
            except LabelStudioError as exc:
                if exc.status == 404 and page > 1:  # past the last page
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from tasks
            if len(tasks) < page_size:
                return
            page += 1

    def get_task(self, task_id: int) -> dict[str, Any] | None:
        """One task with its annotations; None when Label Studio has no such task (deleted)."""
        try:
            return self.request("GET", f"/api/tasks/{int(task_id)}/")
        except LabelStudioError as exc:
            if exc.status == 404:
                return None
            raise

    def tasks_after(self, project_id: int, task_id: int, page_size: int = 500) -> list[dict[str, Any]]:
        """Up to `page_size` tasks with ids above `task_id`, in id order, with their annotations: keyset pages,
        which neither skip nor repeat a task while others are added or deleted (offset pages would)."""
        query = {"filters": {"conjunction": "and", "items": [{"filter": "filter:tasks:id", "operator": "greater",
                                                              "type": "Number", "value": int(task_id)}]},
                 "ordering": ["tasks:id"]}
        params = {"project": int(project_id), "page": 1, "page_size": int(page_size), "fields": "all",
                  "query": json.dumps(query)}
        body = self.request("GET", "/api/tasks", params=params)
        return list(body.get("tasks", []) if isinstance(body, dict) else body)

    def newest_task_id(self, project_id: int) -> int | None:
        """The project's highest task id (None without tasks). Label Studio numbers new tasks upwards, so one
        above the snapshot's newest was created without its webhook reaching the backend."""
        params = {"project": int(project_id), "page_size": 1, "fields": "task_only",
                  "query": json.dumps({"ordering": ["-tasks:id"]})}
        body = self.request("GET", "/api/tasks", params=params)
        tasks = body.get("tasks", []) if isinstance(body, dict) else body
        return int(tasks[0]["id"]) if tasks else None

    # ------------------------------------------------------------------ predictions and versions
    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> int:
        done = 0
        for start in range(0, len(predictions), PREDICTION_BATCH):
            batch = predictions[start : start + PREDICTION_BATCH]
            self.request(
                "POST", f"/api/projects/{int(project_id)}/import/predictions", json=batch, timeout=120
            )
            done += len(batch)
        return done

    def model_versions(self, project_id: int) -> dict[str, int]:
        body = self.request("GET", f"/api/projects/{int(project_id)}/model-versions/")
        if isinstance(body, dict):
            return {str(k): int(v) for k, v in body.items()}
        return {str(item.get("model_version")): int(item.get("count", 0)) for item in body or []}

    def delete_model_version(self, project_id: int, version: str) -> None:
        self.request(
            "DELETE", f"/api/projects/{int(project_id)}/model-versions/", json={"model_version": version}
        )

    # ------------------------------------------------------------------ Data Manager view
    def ensure_ranking_view(self, project_id: int) -> int:
        """A Data Manager tab over unlabelled tasks ordered by prediction score (lowest first)."""
        data = {"title": VIEW_TITLE, "ordering": ["tasks:predictions_score"], "filters": _UNLABELLED_FILTER}
        views = self.request("GET", "/api/dm/views/", params={"project": int(project_id)}) or []
        for view in views:
            if (view.get("data") or {}).get("title") == VIEW_TITLE:
                return int(view["id"])
        created = self.request("POST", "/api/dm/views/", json={"project": int(project_id), "data": data})
        return int(created["id"])


def _token_error(exc: Exception) -> LabelStudioError:
    """The SDK's ApiError or httpx error as ours: the status, never the body (it may quote the token)."""
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    answer = f"HTTP {status}" if status is not None else type(exc).__name__
    return LabelStudioError(f"personal access token refresh: {answer}", status)


_UNLABELLED_FILTER = {
    "conjunction": "and",
    "items": [
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
    ],
}
