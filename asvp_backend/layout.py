"""Where a project's files live under MODEL_DIR: the one owner of the on-disk layout.

Every path of a project is named here and nowhere else, so a reader can never disagree with a writer about
a file name, and moving a file is a one-line change:

    MODEL_DIR/projects/<id>/state.json        project state (embedded mode; Redis holds it otherwise)
                           /state.lock        flock serialising state writers
                           /tasks.json        the last sync's snapshot of tasks and labels
                           /label-studio.json where to read the project (/setup's hostname and token, 0600)
                           /stop_set.json     the fixed stop set's task ids (stopping.py)
                           /features/         the feature store (generations of float16 shards)
                           /rounds/<version>/ one round's artefacts (ranking, proxy), see artefacts.py
                           /models/<model id>/ a fine-tuned model (model.safetensors + model.json)
                           /.<name>.lease     flock of the job lease for <name> (embedded mode)
    MODEL_DIR/queue.json                      the in-process queue's journal of unfinished jobs
    MODEL_DIR/images/<folder name>/           features of a folder of images (`asvp-backend extract --images`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectLayout:
    model_dir: Path
    project_id: int

    @property
    def root(self) -> Path:
        return Path(self.model_dir) / "projects" / str(int(self.project_id))

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def state_lock(self) -> Path:
        return self.root / "state.lock"

    @property
    def tasks_file(self) -> Path:
        return self.root / "tasks.json"

    @property
    def stop_set_file(self) -> Path:
        return self.root / "stop_set.json"

    @property
    def label_studio_file(self) -> Path:
        return self.root / "label-studio.json"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def rounds_dir(self) -> Path:
        return self.root / "rounds"

    def round_dir(self, version: object) -> Path:
        return self.rounds_dir / str(version)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def checkpoint_dir(self, model_id: str) -> Path:
        return self.models_dir / model_id

    def lease_file(self, name: str) -> Path:
        return self.root / f".{name}.lease"


def projects_root(model_dir: Path) -> Path:
    return Path(model_dir) / "projects"


def queue_journal(model_dir: Path) -> Path:
    return Path(model_dir) / "queue.json"


def image_folder_store(model_dir: Path, folder: Path) -> Path:
    """Where `asvp-backend extract --images FOLDER` keeps the folder's features when no --store is given."""
    return Path(model_dir) / "images" / Path(folder).name
