"""What a job function gets: its project, the runtime, and a way to report progress."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asvp_backend.runtime import Runtime


@dataclass
class JobContext:
    kind: str
    project_id: int
    job_id: str
    params: dict[str, Any]
    runtime: Runtime
    _reporter: Any = None
    _last_report: float = field(default=0.0)

    def progress(self, done: int, total: int, stage: str = "", force: bool = False) -> None:
        """Record progress; throttled to two writes a second so a fast loop does not hammer Redis."""
        now = time.monotonic()
        if not force and done < total and now - self._last_report < 0.5:
            return
        self._last_report = now
        if self._reporter is not None:
            self._reporter({"done": int(done), "total": int(total), "stage": stage, "at": time.time()})
