"""`asvp-backend export`: a project's fine-tuned model as a self-contained folder a person can ship.

The folder holds `model.safetensors` (backbone + head, timm layout), `model.json` (backbone name, label
list, preprocessing, recipe, metrics, the project's model version) and `labels.txt`; it is what
`asvp-backend predict --model DIR` reads. Like every artefact, it is complete before it is visible: built
in a hidden folder beside the target, then renamed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from asvp_backend.fsutil import published_dir

WEIGHTS, META = "model.safetensors", "model.json"


def export_model(source: Path, out: Path, extra: dict[str, Any], overwrite: bool = False) -> Path:
    """Copy the checkpoint in `source` to `out`, adding `extra` (project, model version) to its metadata."""
    if not (source / WEIGHTS).is_file() or not (source / META).is_file():
        raise FileNotFoundError(f"{source} holds no complete checkpoint ({WEIGHTS} and {META})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not an empty folder (use --force to replace it)")
    meta = json.loads((source / META).read_text())
    meta.update(extra)
    with published_dir(out) as tmp:
        shutil.copyfile(source / WEIGHTS, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        (tmp / "labels.txt").write_text("".join(f"{label}\n" for label in meta.get("classes", [])))
    return out
