"""The `ping` job: proves that a worker listens and reports progress (`asvp-backend status`, operators, tests)."""

from __future__ import annotations

import time
from typing import Any

from asvp_backend.jobs.context import JobContext


def ping(ctx: JobContext) -> dict[str, Any]:
    """Answer from a worker: proves a worker listens and can report progress (`asvp-backend status`).
    `seconds` keeps it busy that long (operators and tests use it to watch leases and time limits)."""
    import os
    import socket

    steps = max(3, int(float(ctx.params.get("seconds", 0)) * 10))
    for step in range(steps):
        if step:
            time.sleep(float(ctx.params.get("seconds", 0)) / steps)
        ctx.progress(step + 1, steps, stage="ping", force=step < 3 or step == steps - 1)
    return {"pid": os.getpid(), "host": socket.gethostname(), "project": ctx.project_id}
