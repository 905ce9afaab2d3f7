"""`asvp-backend status` for a person: the report `--json` prints, as plain-text tables.

It reads only the report dict (what `status --json` prints), so the two outputs can never disagree. A
project's `learning` entry (project_summary.py's `learning_summary`, what `GET /projects/N/learning` returns) adds
the title, the accuracy's interval and what it is measured on, the pre-annotations accepted and any
fine-tune in progress; jobs are folded one row per kind, as on the status page.
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


def _interval(values: Any) -> str:
    return f"{values[0]:.2f}-{values[1]:.2f}" if values else "-"


def _learning_facts(learning: dict[str, Any]) -> list[tuple[str, str]]:
    """The accuracy with its interval and what it is measured on, and the pre-annotations accepted."""
    latest = (learning.get("accuracy") or {}).get("latest")
    overall = (learning.get("pre_annotations") or {}).get("overall") or {}
    accuracy = (f"{_num(latest['cv_accuracy'])} (95% interval {_interval(latest.get('cv_interval'))}), "
                f"{learning['accuracy'].get('measured_on')}" if latest else "not measured yet")
    accepted = (f"{overall['rate'] * 100:.0f}% ({overall['accepted']} of {overall['reviewed']}; "
                f"{overall['corrected']} corrected)" if overall.get("reviewed") else "none reviewed yet")
    audit = (learning.get("audit") or {}).get("latest")
    audit_line = (f"{_num(audit['accuracy'])} (95% interval {_interval(audit['interval'])}), "
                  f"{learning['audit'].get('measured_on')}" if audit else "not measured yet (no audit label)")
    facts = [("audit accuracy", audit_line), ("accuracy", accuracy), ("accepted as-is", accepted)]
    refreshes = learning.get("refreshes") or []
    if refreshes:
        last = refreshes[-1]
        facts.append(("last refresh", f"generation {last.get('generation')} {last.get('decision')}: "
                                      f"{last.get('reason')}"))
    changes = learning.get("config_changes") or []
    if changes:
        last = changes[-1]
        facts.append(("config changed", f"{_ago(last.get('at'))} ({len(changes)} change(s)): added "
                                        f"{', '.join(last.get('added') or []) or '-'}, removed "
                                        f"{', '.join(last.get('removed') or []) or '-'}"))
    return facts


def _project(p: dict[str, Any]) -> list[str]:
    if "model_version" not in p:  # a project whose state cannot be read
        return [f"project {p['project']}: " + "; ".join(str(x) for x in p.get("problems", []))]
    sync = p.get("last_sync") or {}
    model = p.get("model")
    alignment = p.get("alignment") or {}
    decision = alignment.get("last_decision") or {}
    stopping = p.get("stopping") or {}
    pre = p.get("pre_annotations") or {}
    learning = p.get("learning") or {}
    training = (learning.get("deliverable") or {}).get("training")
    why = (learning.get("deliverable") or {}).get("reason") or "none yet (Start Training fine-tunes one)"
    model_line = (f"{model['id']} ({model.get('method')}, {model.get('labelled')} labels, held-out accuracy "
                  f"{_num(model.get('holdout_accuracy'))})" if model else "none yet" if training else f"none: {why}")
    if training:
        model_line += f"; {'a newer one: ' if model else ''}{training['text']} ({training['kind']} job)"
    facts = [
        ("version", f"{p['model_version']} ({p['rounds']} rounds; labels: {', '.join(p.get('labels', []))})"),
        ("last sync", f"{_ago(sync.get('at'))}: {sync.get('tasks', '-')} tasks, {sync.get('labelled', '-')} labelled, "
                      f"{sync.get('image_problems', 0)} image problems" if sync else "never"),
        ("pre-annotations", f"{pre.get('source')} ({pre.get('reason')})" if pre else "-"),
        *(_learning_facts(learning) if learning else []),
        ("model", model_line),
        ("alignment", f"{'on' if alignment.get('enabled') else 'off'}, {alignment.get('updates', 0)} update(s); last: "
                      f"{decision.get('decision', '-')} ({decision.get('reason', 'no decision yet')})"),
        ("stopping", stopping.get("reason", "-")),
    ]
    title = f": {learning['title']}" if learning.get("title") else ""
    lines = [f"project {p['project']}{title}"] + [f"  {name:<16} {value}" for name, value in facts]
    history = (stopping.get("history") or [])[-ROUNDS_SHOWN:]
    if history:
        lines += table(["round", "labels", "cv accuracy", "kappa"],
                       [[h["version"], h["labelled"], _num(h["cv_accuracy"]), _num(h["kappa"], 4)] for h in history])
    lines += [f"  problem: {problem}" for problem in p.get("problems", [])]
    return lines


def fold_jobs(jobs: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], int, bool]]:
    """One (job, count, is_head) row per kind, newest kind first, each the kind's newest job with how many
    of that kind were listed; every older failed job follows its kind's row (a failure never folds away).
    The status page folds the same way."""
    def queued_at(job: dict[str, Any]) -> float:
        return float(job.get("enqueued_at") or job.get("started_at") or job.get("ended_at") or 0)

    groups: dict[str, list[dict[str, Any]]] = {}
    for job in sorted(jobs, key=queued_at, reverse=True):
        groups.setdefault(str(job.get("kind")), []).append(job)
    rows: list[tuple[dict[str, Any], int, bool]] = []
    for group in groups.values():
        rows.append((group[0], len(group), True))
        rows += [(job, 1, False) for job in group[1:] if job.get("status") == "failed"]
    return rows


def _jobs(jobs: Any) -> list[str]:
    if isinstance(jobs, str):
        return [f"jobs: {jobs}"]
    if not jobs:
        return ["jobs: none"]
    rows = []
    for job, count, head in fold_jobs(jobs)[:JOBS_SHOWN]:
        progress = job.get("progress") or {}
        done = f"{progress.get('done')}/{progress.get('total')} {progress.get('stage', '')}".strip() if progress else ""
        when = _ago(job.get("ended_at") or job.get("started_at") or job.get("enqueued_at"))
        kind = f"{job.get('kind')} x{count}" if head else "  (older)"
        rows.append([kind, job["id"], job["status"], done, when, (job.get("error") or job.get("reason") or "")[:80]])
    return [f"jobs (newest first, one row per kind, of the last {len(jobs)})"] + table(
        ["kind", "newest job", "status", "progress", "when", "reason / error"], rows)


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
