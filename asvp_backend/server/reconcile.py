"""The scheduled reconcile: every RECONCILE_EVERY seconds each project's sync reads every task again, even when
no event arrives (a lost webhook followed by silence would otherwise never be read).

The API process runs the schedule (it runs in both modes, and one per deployment answers Label Studio); it
only queues a full sync when one is due (`ProjectState.reconcile_due`, the rule the sync job applies too), and
the queue's de-duplication keeps several API processes from queueing more than one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from asvp_backend.state import StateCorrupt

log = logging.getLogger(__name__)

CHECK_EVERY_S = 60.0


def submit_due_reconciles(runtime: Any, now: float | None = None) -> list[int]:
    """Queue a full sync for every connected project whose last full read is older than RECONCILE_EVERY."""
    every = runtime.settings.reconcile_every
    if not every:
        return []
    now = time.time() if now is None else now
    due = []
    for project_id in runtime.store.project_ids():
        try:
            state = runtime.store.get(project_id)
        except StateCorrupt:
            continue  # the page shows it; the next sync rebuilds it
        if state is None or not state.reconcile_due(every, now) or not runtime.has_label_studio(project_id):
            continue
        reason = f"scheduled reconcile (RECONCILE_EVERY={every} s)"
        runtime.queue.submit("sync", project_id, reason=reason, full=True, full_reason=reason)
        due.append(project_id)
    return due


async def reconcile_schedule(runtime: Any, interval: float = CHECK_EVERY_S) -> None:
    """Look for due reconciles every `interval` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await run_in_threadpool(submit_due_reconciles, runtime)
        except Exception as exc:  # Redis away for a moment: the next look tries again
            log.warning("could not queue the scheduled reconciles: %s", exc)
