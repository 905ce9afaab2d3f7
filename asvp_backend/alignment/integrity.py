"""Is a checkpoint folder whole? The checks `problems`, `/projects/N/model`, `export` and loading share.

Invariant: a checkpoint whose weights do not match what was recorded when it was written is never current,
never exported and never loaded. `save_checkpoint` records the weights file's size and SHA-256 in model.json;
`checkpoint_problem` checks the size and the safetensors header (cheap: a few bytes, for every status refresh)
and, with `full=True`, the hash (one read of the file: before an export or a load). A checkpoint written before
sizes were recorded is checked by its header alone. No torch here: the API imports it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_META = "model.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def weights_record(path: Path) -> dict[str, Any]:
    """What model.json records of a weights file when it is written: its size in bytes and its SHA-256."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(directory: Path, full: bool = False) -> str | None:
    """What is wrong with the checkpoint folder `directory`, in words naming the file; None when it is whole.
    `full` also compares the weights' SHA-256 with the one recorded at writing."""
    directory = Path(directory)
    meta_path, weights = directory / CHECKPOINT_META, directory / CHECKPOINT_WEIGHTS
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{meta_path} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{meta_path} is not readable JSON ({type(exc).__name__})"
    if not isinstance(meta, dict):
        return f"{meta_path} is not a JSON object"
    if not weights.is_file():
        return f"{weights} is missing"
    size = weights.stat().st_size
    recorded: dict[str, Any] = meta["weights"] if isinstance(meta.get("weights"), dict) else {}
    if "bytes" in recorded and recorded["bytes"] != size:
        return f"{weights} has {size} bytes, {recorded['bytes']} were written (truncated or replaced)"
    header = _safetensors_problem(weights, size)
    if header:
        return f"{weights}: {header}"
    if full and "sha256" in recorded and file_sha256(weights) != recorded["sha256"]:
        return f"{weights} does not match the SHA-256 recorded when it was written"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    """The safetensors layout: an 8-byte little-endian header length, a JSON header whose tensors' data
    offsets are contiguous from 0, and exactly that much data after it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                return "header length runs past the end of the file"
            header = json.loads(fh.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable safetensors header ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"tensor {str(name)[:80]!r} has no valid data_offsets"
        ends.append(offsets[1])
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"header describes {expected} bytes, the file has {size} (truncated or padded)"
    return None
