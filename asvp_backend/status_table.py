"""`asvp-backend status` for a person: the report `--json` prints, as plain-text tables.

It reads only the report dict (what `status --json` prints), so the two outputs can never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

ROUNDS_SHOWN = 8
JOBS_SHOWN = 12


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _ago(at: Any) -> str:
    if not at:
        return "never"
    seconds = max(0.0, time.time() - float(at))
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 5400 else f"{seconds / 3600:.1f} h ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Left-aligned columns, as wide as their widest cell."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def _project(p: dict[str, Any]) -> list[str]:
    if "model_version" not in p:  # a project whose state cannot be read
        return [f"project {p['project']}: " + "; ".join(str(x) for x in p.get("problems", []))]
    sync = p.get("last_sync") or {}
    model = p.get("model")
    alignment = p.get("alignment") or {}
    decision = alignment.get("last_decision") or {}
    stopping = p.get("stopping") or {}
    pre = p.get("pre_annotations") or {}
    facts = [
        ("version", f"{p['model_version']} ({p['rounds']} rounds; labels: {', '.join(p.get('labels', []))})"),
        ("last sync", f"{_ago(sync.get('at'))}: {sync.get('tasks', '-')} tasks, {sync.get('labelled', '-')} labelled, "
                      f"{sync.get('image_problems', 0)} image problems" if sync else "never"),
        ("pre-annotations", f"{pre.get('source')} ({pre.get('reason')})" if pre else "-"),
        ("model", f"{model['id']} ({model.get('method')}, {model.get('labelled')} labels, held-out accuracy "
                  f"{_num(model.get('holdout_accuracy'))})" if model else "none yet (Start Training fine-tunes one)"),
        ("alignment", f"{'on' if alignment.get('enabled') else 'off'}, {alignment.get('updates', 0)} update(s); last: "
                      f"{decision.get('decision', '-')} ({decision.get('reason', 'no decision yet')})"),
        ("stopping", stopping.get("reason", "-")),
    ]
    lines = [f"project {p['project']}"] + [f"  {name:<16} {value}" for name, value in facts]
    history = (stopping.get("history") or [])[-ROUNDS_SHOWN:]
    if history:
        lines += table(["round", "labels", "cv accuracy", "kappa"],
                       [[h["version"], h["labelled"], _num(h["cv_accuracy"]), _num(h["kappa"], 4)] for h in history])
    lines += [f"  problem: {problem}" for problem in p.get("problems", [])]
    return lines


def _jobs(jobs: Any) -> list[str]:
    if isinstance(jobs, str):
        return [f"jobs: {jobs}"]
    if not jobs:
        return ["jobs: none"]
    rows = []
    for job in jobs[:JOBS_SHOWN]:
        progress = job.get("progress") or {}
        done = f"{progress.get('done')}/{progress.get('total')} {progress.get('stage', '')}".strip() if progress else ""
        when = _ago(job.get("ended_at") or job.get("started_at") or job.get("enqueued_at"))
        rows.append([job["id"], job["status"], done, when, (job.get("error") or job.get("reason") or "")[:80]])
    return ["jobs"] + table(["job", "status", "progress", "when", "reason / error"], rows)


def format_status(report: dict[str, Any]) -> str:
    projects = report.get("projects") or []
    lines: list[str] = []
    for project in projects:
        lines += _project(project) + [""]
    if not projects:
        lines += ["no project yet: connect this backend to a Label Studio project", ""]
    lines += _jobs(report.get("jobs"))
    lines += ["", "settings and every field: asvp-backend status --json"]
    return "\n".join(lines)
