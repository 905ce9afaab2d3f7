"""The resources of one project as the job bodies reach them: its tasks, features, state, layout, Label Studio,
image fetcher and backbone, through one handle (`Project`, `ctx.project`).

Why one place: the job bodies used to open the snapshot, the feature store and the backbone each its own way and
imported each other's helpers to do it; now they import this module and no other job body. Heavy imports (torch,
timm, PIL) stay inside the functions, so importing it costs nothing to the API process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asvp_backend.config import Settings
from asvp_backend.features.store import FeatureGeneration, FeatureStore
from asvp_backend.layout import ProjectLayout
from asvp_backend.state import AlignmentState, ProjectState, SyncedTask, TaskSnapshot

if TYPE_CHECKING:
    from asvp_backend.runtime import Runtime

MAX_LOADED_BACKBONES = 3
_backbones: dict[tuple, Any] = {}
_backbones_lock = threading.Lock()


@dataclass(frozen=True)
class Project:
    """One project's resources, opened one way. Cheap to make: it holds the runtime and the id, and opens
    files only when asked (every call reads the current files again: other jobs may have replaced them)."""

    runtime: Runtime
    id: int

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def layout(self) -> ProjectLayout:
        return self.runtime.layout(self.id)

    @property
    def snapshot(self) -> TaskSnapshot:
        return TaskSnapshot(self.settings.model_dir, self.id)

    def tasks(self) -> dict[int, SyncedTask]:
        """The synced tasks; StateCorrupt when the snapshot is unreadable (never "no tasks")."""
        return self.snapshot.load()

    def features(self) -> FeatureStore:
        return feature_store(self.settings.model_dir, self.id)

    def serving_generation(self) -> FeatureGeneration | None:
        """The generation that serves now, verified (and the store repaired when it is not)."""
        return self.features().current(repair=True)

    def state(self) -> ProjectState:
        return self.runtime.store.require(self.id)

    def update_state(self, change: Callable[[ProjectState | None], ProjectState | None]) -> ProjectState | None:
        return self.runtime.store.update(self.id, change)

    def label_studio(self) -> Any:
        return self.runtime.label_studio(self.id)

    def image_fetcher(self) -> Any:
        """Images of this project's tasks, with its Label Studio's credentials when it has one."""
        client = self.runtime.label_studio(self.id) if self.runtime.has_label_studio(self.id) else None
        return image_fetcher(self.settings, client)

    def backbone(self, alignment: AlignmentState | None = None) -> Any:
        """The backbone that extracts this project's features: the fine-tuned one after a feature update."""
        alignment = alignment if alignment is not None else self.state().alignment
        return backbone_for(self.settings, feature_weights(self.layout, alignment))


def feature_store(model_dir: Path, project_id: int) -> FeatureStore:
    return FeatureStore(ProjectLayout(model_dir, project_id).features_dir)


def backbone_for(settings: Settings, weights: str | None = None) -> Any:
    """One backbone per process and configuration: loading weights costs seconds, a job should not pay it
    twice. `weights` overrides BACKBONE_WEIGHTS (a project's fine-tuned checkpoint after a feature update);
    only the last few backbones stay loaded."""
    from asvp_backend.features import create_backbone

    weights = weights or settings.backbone_weights
    key = (settings.backbone, weights, settings.device, settings.image_size)
    with _backbones_lock:
        if key not in _backbones:
            while len(_backbones) >= MAX_LOADED_BACKBONES:
                _backbones.pop(next(iter(_backbones)))
            _backbones[key] = create_backbone(settings.backbone, weights, settings.device, settings.image_size)
        return _backbones[key]


def loader_workers(settings: Settings, backbone: Any) -> int:
    """Decoding processes: none on a CPU (they would fight torch's threads for the same cores, measured in
    bench/results/extract_cpu.md), several when a GPU does the model's work."""
    if settings.extract_workers is not None:
        return settings.extract_workers
    return 0 if backbone.device.type == "cpu" else min(8, os.cpu_count() or 1)


def image_fetcher(settings: Settings, client: Any) -> Any:
    from asvp_backend.labelstudio.images import ImageFetcher

    return ImageFetcher(
        label_studio_url=client.url if client is not None else settings.label_studio_url,
        auth_headers=client.auth_headers if client is not None else None,
        document_root=str(settings.local_files_document_root) if settings.local_files_document_root else None,
        allow_private_hosts=settings.allow_private_image_hosts,
        timeout=min(10.0, settings.image_timeout),
        total_timeout=settings.image_timeout,
        decode_budget_mb=settings.decode_budget_mb,
    )


def proxy_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def feature_weights(layout: ProjectLayout, alignment: AlignmentState) -> str | None:
    """The checkpoint whose backbone extracts the project's features (None: the configured pre-trained one)."""
    from asvp_backend.alignment.integrity import CHECKPOINT_WEIGHTS

    if alignment.feature_model is None:
        return None
    path = layout.checkpoint_dir(alignment.feature_model) / CHECKPOINT_WEIGHTS
    if not path.is_file():  # a refresh never silently uses other weights (docs/method.md, *The alignment policy*)
        raise FileNotFoundError(f"the feature model {alignment.feature_model} has no checkpoint at {path}")
    return str(path)
