"""The job kinds, declared in one table: name, queue, time limit, lease, and the function that runs a job of the
kind, named as "module:function" and imported only when a worker runs one (as rq names its job functions).

Why a table of names and not decorators: importing the registry registers nothing by side effect and loads no
job body, so the API process (which submits jobs and reports them) never imports torch or the job code; a
worker imports every body once before it forks (`preload`). A contract test checks every name resolves.

A kind declared with `slots=True` runs as several independent jobs per project, one per slot, named
`<kind>:<slot>` (`extract_part:0`, `extract_part:1`): each slot has its own pending marker and lease, so the
queue's rule (one running and one waiting job per project and kind) holds per slot, and slots run at once on
different workers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asvp_backend.jobs.context import JobContext

JobFunction = Callable[["JobContext"], Any]
QUEUES = ("cpu", "gpu")
HOUR = 3600


@dataclass(frozen=True)
class JobKind:
    name: str
    queue: str  # "cpu" or "gpu"
    target: str  # "module:function" of the job body
    time_limit: int | None = None  # seconds; None = JOB_TIMEOUT (the long GPU jobs)
    lease: str | None = None  # kinds sharing a lease never run at once on a project (extract, finetune, align)
    slots: bool = False  # submitted as `<name>:<slot>`, one lease per slot

    def function(self) -> JobFunction:
        module, _, name = self.target.partition(":")
        function: JobFunction = getattr(importlib.import_module(module), name)
        return function

    def lease_for(self, kind: str) -> str:
        """The lease a job submitted as `kind` takes: the kind's lease, per slot for a slotted kind."""
        lease, slot = self.lease or self.name, kind.partition(":")[2]
        return f"{lease}:{slot}" if slot else lease

    def limit(self, job_timeout: int) -> int:
        return min(self.time_limit, job_timeout) if self.time_limit is not None else job_timeout


JOB_KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("sync", "cpu", "asvp_backend.jobs.sync:sync", time_limit=HOUR),
    JobKind("train", "cpu", "asvp_backend.jobs.sync:train", time_limit=HOUR),
    JobKind("round", "cpu", "asvp_backend.jobs.rounds:selection_round", time_limit=2 * HOUR),
    JobKind("rescore", "cpu", "asvp_backend.jobs.rounds:rescore", time_limit=HOUR),
    JobKind("ping", "cpu", "asvp_backend.jobs.ping:ping", time_limit=600),
    JobKind("extract", "gpu", "asvp_backend.jobs.extraction:extract", lease="gpu"),
    JobKind("extract_part", "gpu", "asvp_backend.jobs.extraction:extract_part", slots=True),
    JobKind("finetune", "gpu", "asvp_backend.jobs.finetune:finetune", lease="gpu"),
    JobKind("align", "gpu", "asvp_backend.jobs.finetune:align", lease="gpu"),
)}


# What the job bodies import inside their functions (to keep the API process light). rq runs each job in a
# work-horse forked from the worker: whatever the worker has not imported, every job imports again. Measured:
# the client of label_studio_sdk (which the package imports lazily, on first use) took about 0.7 s of each
# 1.3 s targeted sync (bench_load.py scale, 5,000 tasks, profiled with py-spy).
HEAVY_IMPORTS = ("label_studio_sdk.client", "torch", "torchvision", "timm", "sklearn", "PIL.Image",
                 "asvp_backend.features", "asvp_backend.selection", "asvp_backend.alignment.finetune")


def preload() -> list[str]:
    """Import every job body and HEAVY_IMPORTS once (a worker does before it forks, so that its work-horses do
    not each pay for them). Importing runs no torch operation, so no thread pool exists yet to break a fork.
    Returns what could not be imported (a light worker image may lack a library its queue never needs)."""
    for kind in JOB_KINDS.values():
        kind.function()
    missing = []
    for name in HEAVY_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class UnknownJobKind(KeyError):
    pass


def job_kind(name: str) -> JobKind:
    """The kind a job submitted as `name` runs: `name` itself, or `<kind>:<slot>` of a slotted kind."""
    base, _, slot = name.partition(":")
    spec = JOB_KINDS.get(base)
    if spec is None or spec.slots != bool(slot) or (slot and not slot.isdigit()):
        raise UnknownJobKind(f"unknown job kind {name!r}; known: {', '.join(sorted(JOB_KINDS))}")
    return spec


def slot_of(kind: str) -> int:
    """The slot of a slotted kind's job (`extract_part:3` -> 3)."""
    return int(kind.partition(":")[2])


def slotted(name: str, slot: int) -> str:
    return f"{name}:{int(slot)}"


def queueable_kinds() -> list[str]:
    """The kinds a person may queue by name (the status page's Retry): slotted kinds are queued by their
    coordinating job, with the parameters it computes."""
    return sorted(name for name, spec in JOB_KINDS.items() if not spec.slots)
