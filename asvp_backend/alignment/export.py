"""`asvp-backend export`: a project's fine-tuned model as a self-contained folder a person can ship.

The folder holds `model.safetensors` (backbone + head, timm layout), `model.json` (backbone name, label
list, preprocessing, recipe, metrics, the project's model version) and `labels.txt`; it is what
`asvp-backend predict --model DIR` reads. Like every artefact, it is complete before it is visible: built
in a hidden folder beside the target, then renamed.

A model that lost to the proxy on the same audit labels (its `verdict` is "proxy", see jobs/alignment.py
judge_on_audit, and judge_against_proxy while the audit labels are too few) is not written unless the caller
asks for it (`even_if_worse`, the CLI's --even-if-worse): shipping it would ship something worse than what the
backend already has. Such an export says so in its model.json (`exported_even_if_worse`).

Invariant: an export replaces nothing but an earlier export. The folder it writes holds a marker file
(`.asvp-export`); `overwrite` (--force) replaces a non-empty folder only when that marker is there, and never
the working directory, one of its parents, `/`, the home folder, or a path through a symbolic link: a mistyped
`--out .` must not delete a person's files. A checkpoint that fails its integrity check (alignment/integrity.py,
hash included) is not exported, and the copy is checked again before it becomes visible.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asvp_backend.alignment.integrity import CHECKPOINT_META as META
from asvp_backend.alignment.integrity import CHECKPOINT_WEIGHTS as WEIGHTS
from asvp_backend.alignment.integrity import checkpoint_problem
from asvp_backend.fsutil import published_dir

EXPORT_MARKER = ".asvp-export"


class WorseThanProxy(ValueError):
    """The model lost to the proxy on the same audit (or held-out) labels; the message gives both figures."""


class ExportRefused(ValueError):
    """The target folder may not be written (or replaced); the message says why. Nothing was touched."""


class DamagedCheckpoint(ValueError):
    """The checkpoint's files are not what was written; the message names the file."""


def check_target(out: Path, overwrite: bool) -> None:
    """Raise ExportRefused (or FileExistsError) unless writing `out` can only replace an earlier export."""
    if out.is_symlink():
        raise ExportRefused(f"{out} is a symbolic link: give the folder it points to, or a new folder")
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved in {cwd, *cwd.parents, Path(resolved.anchor), Path.home().resolve()}:
        raise ExportRefused(f"{out} is the current folder, one of its parents, / or the home folder: export "
                            "into a folder of its own (e.g. --out ./model)")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportRefused(f"{out} is a file, not a folder: nothing replaced")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not an empty folder (use --force to replace an earlier export)")
    if not (out / EXPORT_MARKER).is_file():
        raise ExportRefused(f"{out} holds files that are not an earlier export (no {EXPORT_MARKER} marker): "
                            "--force replaces only an earlier export; nothing touched")


def export_model(
    source: Path, out: Path, extra: dict[str, Any], overwrite: bool = False, even_if_worse: bool = False
) -> Path:
    """Copy the checkpoint in `source` to `out`, adding `extra` (project, model version) to its metadata.
    Raises WorseThanProxy for a model the proxy beat, unless `even_if_worse`."""
    if not (source / WEIGHTS).is_file() or not (source / META).is_file():
        raise FileNotFoundError(f"{source} holds no complete checkpoint ({WEIGHTS} and {META})")
    out = Path(out)
    check_target(out, overwrite)
    problem = checkpoint_problem(source, full=True)
    if problem:
        raise DamagedCheckpoint(f"not exporting a damaged checkpoint: {problem}")
    meta = json.loads((source / META).read_text())
    worse = meta.get("verdict") == "proxy"
    if worse and not even_if_worse:
        comparison = meta.get("comparison") or {}
        raise WorseThanProxy(
            f"not exporting {meta.get('id', source.name)}: "
            f"{comparison.get('reason', 'the proxy is the better model')}. Label more and press "
            "Start Training again, or pass --even-if-worse to write it anyway"
        )
    meta.update(extra)
    if worse:
        meta["exported_even_if_worse"] = True
    with published_dir(out) as tmp:
        shutil.copyfile(source / WEIGHTS, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        (tmp / "labels.txt").write_text("".join(f"{label}\n" for label in meta.get("classes", [])))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"model": meta.get("id", source.name), "exported_at":
                                                     datetime.now(UTC).isoformat(timespec="seconds")}))
        copied = checkpoint_problem(tmp, full=True)
        if copied:  # the disk changed it under us: nothing becomes visible
            raise DamagedCheckpoint(f"the exported copy is damaged: {copied}")
    return out
