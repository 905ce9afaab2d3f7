"""What the webhooks say changed: pointers to task ids and annotation ids, kept per project until a sync has
re-read those tasks from Label Studio.

Invariants, and why:
- **A pointer is never data.** It only names tasks to re-read; the sync reads them from Label Studio, the
  source of truth, and keeps only tasks of the project it syncs. A forged webhook can at most cause a task to
  be read again; a lost one is caught by the next full read (the reconcile).
- **Nothing is dropped before it was read.** Every note gets the next number of a per-project counter
  (atomically with its insertion), and a sync removes only the pointers numbered at most as high as the
  highest it saw when it started. A task changed again while the sync read it is noted again with a higher
  number and stays for the next sync; a sync that dies removes nothing.
- **Events coalesce.** The pointers are a set: a burst of annotations on one project becomes one sync that
  reads the union of their tasks.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: an event that names nothing usable, or an API that just started: the next sync reads every task
FULL = "full"
#: ids one event may point at; Label Studio splits bulk events at 5,000, so more is not an event of its
MAX_POINTERS = 10_000


@dataclass(frozen=True)
class Changes:
    """Task ids to re-read, annotation ids whose task must be found (deletions name only those), or `full`."""

    tasks: frozenset[int] = frozenset()
    annotations: frozenset[int] = frozenset()
    full: bool = False

    def __bool__(self) -> bool:
        return bool(self.tasks or self.annotations or self.full)

    def members(self) -> list[str]:
        return [f"t{t}" for t in sorted(self.tasks)] + [f"a{a}" for a in sorted(self.annotations)] + \
            ([FULL] if self.full else [])

    @classmethod
    def from_members(cls, members: Iterable[str]) -> Changes:
        tasks, annotations, full = set(), set(), False
        for member in members:
            if member == FULL:
                full = True
            elif member[:1] == "t":
                tasks.add(int(member[1:]))
            elif member[:1] == "a":
                annotations.add(int(member[1:]))
        return cls(frozenset(tasks), frozenset(annotations), full)


@dataclass(frozen=True)
class Pending:
    """The changes a sync starts from, and the number up to which it may remove them when done."""

    changes: Changes = field(default_factory=Changes)
    upto: int = 0


def _ids(items: Any, key: str | None = None) -> set[int] | None:
    """Positive integer ids of a list of objects (or of ints); None when the shape is not that."""
    if not isinstance(items, list) or len(items) > MAX_POINTERS:
        return None
    out = set()
    for item in items:
        value = item.get(key) if key and isinstance(item, Mapping) else item
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return None
        out.add(value)
    return out


def changes_of(action: str, payload: Mapping[str, Any]) -> Changes:
    """The pointers a Label Studio event carries (docs/label-studio.md, *Webhooks*); `full` when it names none
    that can be used. Only which tasks to read is taken from a payload, never what they hold."""
    tasks: set[int] | None = None
    annotations: set[int] | None = None
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        annotation, task = payload.get("annotation"), payload.get("task")
        tasks = _ids([annotation], "task") if isinstance(annotation, Mapping) else None
        if tasks is None and isinstance(task, Mapping):
            tasks = _ids([task], "id")
    elif action == "ANNOTATIONS_CREATED":
        tasks = _ids(payload.get("task"), "id") or _ids(payload.get("annotation"), "task")
    elif action == "ANNOTATIONS_DELETED":
        annotations = _ids(payload.get("annotations"), "id")
    elif action in ("TASKS_CREATED", "TASKS_DELETED"):
        tasks = _ids(payload.get("tasks"), "id")
    if not tasks and not annotations:
        return Changes(full=True)
    return Changes(frozenset(tasks or ()), frozenset(annotations or ()))


class ChangeLog(ABC):
    """Where pointers wait for a sync: Redis with workers, memory in the embedded mode."""

    @abstractmethod
    async def note(self, project_id: int, changes: Changes) -> None: ...

    @abstractmethod
    def note_now(self, project_id: int, changes: Changes) -> None:
        """`note` from synchronous code (the CLI, tests)."""

    @abstractmethod
    def pending(self, project_id: int) -> Pending: ...

    @abstractmethod
    def done(self, project_id: int, upto: int) -> None:
        """Remove the pointers numbered at most `upto` (those a sync read)."""


class MemoryChangeLog(ChangeLog):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._numbers: dict[int, int] = {}
        self._members: dict[int, dict[str, int]] = {}

    async def note(self, project_id: int, changes: Changes) -> None:
        self.note_now(project_id, changes)

    def note_now(self, project_id: int, changes: Changes) -> None:
        with self._lock:
            number = self._numbers.get(project_id, 0) + 1
            self._numbers[project_id] = number
            members = self._members.setdefault(project_id, {})
            for member in changes.members():
                members[member] = number

    def pending(self, project_id: int) -> Pending:
        with self._lock:
            members = dict(self._members.get(project_id, {}))
        return Pending(Changes.from_members(members), max(members.values(), default=0))

    def done(self, project_id: int, upto: int) -> None:
        with self._lock:
            members = self._members.get(project_id, {})
            for member in [m for m, number in members.items() if number <= upto]:
                del members[member]


_NOTE = """
local number = redis.call('INCR', KEYS[1])
for i, member in ipairs(ARGV) do redis.call('ZADD', KEYS[2], number, member) end
redis.call('EXPIRE', KEYS[1], 2592000)
redis.call('EXPIRE', KEYS[2], 2592000)
return number
"""


class RedisChangeLog(ChangeLog):
    """A sorted set per project (member: "t<task id>", "a<annotation id>" or "full"; score: its note's number)
    and a counter; a note is one script, so a number is never seen before its members are."""

    def __init__(self, redis: Any, async_redis: Any = None) -> None:
        self.redis = redis
        self.async_redis = async_redis
        self._script = redis.register_script(_NOTE)
        self._async_script = async_redis.register_script(_NOTE) if async_redis is not None else None

    @staticmethod
    def keys(project_id: int) -> list[str]:
        return [f"asvp:changes:{int(project_id)}:n", f"asvp:changes:{int(project_id)}"]

    async def note(self, project_id: int, changes: Changes) -> None:
        if not changes:
            return
        if self._async_script is None:
            import asyncio

            await asyncio.to_thread(self.note_now, project_id, changes)
            return
        await self._async_script(keys=self.keys(project_id), args=changes.members())

    def note_now(self, project_id: int, changes: Changes) -> None:
        if changes:
            self._script(keys=self.keys(project_id), args=changes.members())

    def pending(self, project_id: int) -> Pending:
        scored = self.redis.zrange(self.keys(project_id)[1], 0, -1, withscores=True)
        members = [m.decode() if isinstance(m, bytes) else str(m) for m, _ in scored]
        return Pending(Changes.from_members(members), int(max((s for _, s in scored), default=0)))

    def done(self, project_id: int, upto: int) -> None:
        if upto > 0:
            self.redis.zremrangebyscore(self.keys(project_id)[1], "-inf", upto)
