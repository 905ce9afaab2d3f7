"""The embedded engine: one worker thread per queue name inside the API process, same job functions.

Invariants: a record that is waiting or running is never evicted (only ended ones are, oldest first), and
every unfinished job is in a journal file (MODEL_DIR/queue.json, replaced atomically), so a restart
re-queues what the last process had queued or was running instead of waiting for the next webhook.
"""

from __future__ import annotations

import json
import logging
import queue as stdlib_queue
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asvp_backend.fsutil import atomic_write_bytes
from asvp_backend.jobs.context import Reporter
from asvp_backend.jobs.queue import JobInfo, JobQueue, Submitted, marked_job_waits, new_job_id
from asvp_backend.jobs.registry import QUEUES, job_kind
from asvp_backend.jobs.status import JobStatus

log = logging.getLogger(__name__)

MAX_RESUMES = 3
Execute = Callable[[str, int, str, dict[str, Any], Reporter], Any]


@dataclass
class _Record:
    info: JobInfo
    params: dict[str, Any] = field(default_factory=dict)


THREADS = {"cpu": 2, "gpu": 1}  # two cpu threads: a long sync or round of one project leaves room for others;
# one gpu thread: two backbones at once would double the memory, and extraction yields in time slices instead


class InProcessJobQueue(JobQueue):
    """Worker threads per queue; the same dedup rule as rq; a journal for restarts."""

    MAX_ENDED_RECORDS = 1000

    def __init__(self, journal: Path | None = None, threads: dict[str, int] | None = None) -> None:
        self._thread_counts = dict(THREADS if threads is None else threads)
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], str] = {}
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._inboxes: dict[str, stdlib_queue.Queue[str | None]] = {name: stdlib_queue.Queue() for name in QUEUES}
        self._threads: list[threading.Thread] = []
        self._timers: list[threading.Timer] = []
        self._counters: dict[str, int] = {}
        self._journal = journal
        self._execute: Execute | None = None

    def start(self, execute: Execute) -> list[str]:
        """Start the worker threads, running each job through `execute`, and re-queue the journal's jobs.
        Returns the ids of the resumed jobs. (Tests may leave a queue unstarted to observe deduplication.)"""
        self._execute = execute
        for name, inbox in self._inboxes.items():
            for number in range(self._thread_counts.get(name, 1)):
                thread = threading.Thread(target=self._loop, args=(inbox,), name=f"asvp-{name}-{number}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
        return self._resume()

    # ------------------------------------------------------------------ submitting
    def submit(self, kind: str, project_id: int, reason: str = "", **params: Any) -> Submitted:
        spec = job_kind(kind)
        with self._lock:
            existing = self._waiting_locked(kind, project_id)
            if existing is not None:
                self._count_locked("deduplicated", kind)
                return Submitted(existing, deduplicated=True)
            job_id = new_job_id(kind, project_id)
            self._add_locked(job_id, kind, project_id, spec.queue, reason, params, JobStatus.QUEUED)
            self._count_locked("submitted", kind)
        self._inboxes[spec.queue].put(job_id)
        return Submitted(job_id, deduplicated=False)

    def defer(self, kind: str, project_id: int, job_id: str, params: dict[str, Any], delay: float) -> str | None:
        spec = job_kind(kind)
        with self._lock:
            if self._pending.get((kind, project_id)) != job_id:
                return None
            new_id = new_job_id(kind, project_id)
            reason = f"waiting for the running {kind} job of project {project_id}"
            self._add_locked(new_id, kind, project_id, spec.queue, reason, params, JobStatus.SCHEDULED)
            self._records.pop(job_id, None)  # one record per logical job
            self._count_locked("deferred", kind)
        timer = threading.Timer(delay, self._release_scheduled, args=(new_id, spec.queue))
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()
        return new_id

    def _release_scheduled(self, job_id: str, queue_name: str) -> None:
        with self._lock:
            record = self._records.get(job_id)
            if record is None or record.info.status is not JobStatus.SCHEDULED:
                return
            record.info.status = JobStatus.QUEUED
        self._inboxes[queue_name].put(job_id)

    def _add_locked(self, job_id: str, kind: str, project_id: int, queue_name: str, reason: str,
                    params: dict[str, Any], status: JobStatus) -> None:
        info = JobInfo(job_id, kind, int(project_id), queue_name, status, reason, enqueued_at=time.time())
        self._records[job_id] = _Record(info, dict(params))
        self._pending[(kind, project_id)] = job_id
        self._evict_locked()
        self._write_journal_locked()

    def _evict_locked(self) -> None:
        """Forget the oldest ended jobs beyond MAX_ENDED_RECORDS; waiting and running ones always stay."""
        ended = [jid for jid, r in self._records.items() if r.info.status.ended]
        for jid in ended[: max(0, len(ended) - self.MAX_ENDED_RECORDS)]:
            del self._records[jid]

    async def waiting_job(self, kind: str, project_id: int) -> str | None:
        with self._lock:
            return self._waiting_locked(kind, project_id)

    def _waiting_locked(self, kind: str, project_id: int) -> str | None:
        job_id = self._pending.get((kind, project_id))
        record = self._records.get(job_id) if job_id else None
        if record is None or not marked_job_waits(record.info.status, record.info.started_at, time.time()):
            return None
        return job_id

    def clear_pending(self, kind: str, project_id: int, job_id: str) -> None:
        with self._lock:
            if self._pending.get((kind, project_id)) == job_id:
                del self._pending[(kind, project_id)]

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        with self._lock:
            record = self._records.get(job_id)
            if record:
                record.info.progress = progress

    # ------------------------------------------------------------------ running
    def _loop(self, inbox: stdlib_queue.Queue[str | None]) -> None:
        while True:
            job_id = inbox.get()
            if job_id is None:
                return
            with self._lock:
                record = self._records.get(job_id)
                if record is None or record.info.status is not JobStatus.QUEUED:
                    continue
                record.info.status, record.info.started_at = JobStatus.STARTED, time.time()
            self._run(record)

    def _run(self, record: _Record) -> None:
        info = record.info
        assert self._execute is not None
        try:
            result = self._execute(
                info.kind, info.project, info.id, record.params, lambda p: self.set_progress(info.id, p)
            )
            status, error = JobStatus.FINISHED, None
        except Exception as exc:  # a failed job must never kill the worker thread
            log.error("job %s failed: %s\n%s", info.id, exc, traceback.format_exc())
            result, status, error = None, JobStatus.FAILED, f"{type(exc).__name__}: {exc}"
        with self._lock:
            info.status, info.result, info.error, info.ended_at = status, result, error, time.time()
            self._write_journal_locked()

    # ------------------------------------------------------------------ journal
    def _write_journal_locked(self) -> None:
        if self._journal is None:
            return
        unfinished = [
            {"kind": r.info.kind, "project": r.info.project, "reason": r.info.reason, "params": r.params}
            for r in self._records.values()
            if not r.info.status.ended
        ]
        try:
            atomic_write_bytes(self._journal, json.dumps(unfinished, default=str).encode())
        except OSError as exc:  # a full disk must not stop the queue; the next write tries again
            log.warning("could not write the job journal %s: %s", self._journal, exc)

    def _resume(self) -> list[str]:
        if self._journal is None or not self._journal.exists():
            return []
        try:
            entries = json.loads(self._journal.read_text())
            if not isinstance(entries, list):
                raise ValueError("not a list")
        except (OSError, ValueError) as exc:
            log.warning("job journal %s unreadable (%s); nothing to resume", self._journal, exc)
            return []
        resumed = []
        for entry in entries:
            try:
                kind, project = str(entry["kind"]), int(entry["project"])
                params = dict(entry.get("params") or {})
                params["resumed"] = int(params.get("resumed", 0)) + 1
                if params["resumed"] > MAX_RESUMES:  # it took the process down each time: stop trying
                    log.error("job %s for project %s was resumed %s times; dropped", kind, project, MAX_RESUMES)
                    continue
                submitted = self.submit(kind, project, reason=f"resumed after restart ({entry.get('reason', '')})",
                                        **params)
            except Exception as exc:  # one bad entry must not stop the others
                log.warning("job journal entry %r not resumed: %s", entry, exc)
                continue
            resumed.append(submitted.job_id)
        if resumed:
            log.info("resumed %s unfinished job(s) from %s", len(resumed), self._journal)
        return resumed

    # ------------------------------------------------------------------ reporting
    def _count_locked(self, event: str, kind: str) -> None:
        key = f"{event}:{kind}"
        self._counters[key] = self._counters.get(key, 0) + 1

    def count(self, event: str, kind: str) -> None:
        with self._lock:
            self._count_locked(event, kind)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def queue_lengths(self) -> dict[str, int]:
        return {name: inbox.qsize() for name, inbox in self._inboxes.items()}

    def jobs(self, project_id: int | None = None, limit: int = 50) -> list[JobInfo]:
        with self._lock:
            infos = [r.info for r in reversed(self._records.values())]
        if project_id is not None:
            infos = [i for i in infos if i.project == project_id]
        return infos[:limit]

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        for thread in self._threads:
            self._inboxes[thread.name.split("-")[1]].put(None)
