"""Job leases: at most one running job per (project, kind), and a dead holder frees it within seconds.

Why a lease and not a plain lock: a worker killed with `kill -9` never releases anything. A lease is held
only while its holder proves it is alive. On Redis it is a key with a short TTL (LEASE_SECONDS) that a
heartbeat thread renews; in the embedded mode it is an flock, which the kernel drops when the process
dies. Acquiring never blocks: a job that finds the lease taken is re-queued with a delay by the runner, so
a waiting job never occupies a worker that other projects need.

A lease is not a lock a paused process can trust: a holder stopped for longer than LEASE_SECONDS (a VM
pause, CPU starvation, SIGSTOP) loses it while it does not run, and another job takes it. So every tenure
carries a fencing token, a number that grows each time the lease is taken (Redis INCR on a per-(project,
lease) counter, stored in the lease's value beside the holder), and a job checks, right before each write
that matters, that the lease's value in Redis is still its own (`Lease.check`, raising `LeaseLost`;
jobs/fencing.py wires the checks into the job's Label Studio client and state store). In the embedded
mode the flock cannot be lost while its process lives (and a dead process writes nothing), so the check
is local; the token there is a counter in the lease file, kept for the logs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0  # the default of the LEASE_SECONDS setting

# take the lease if free, with the next fencing token: the value is "<holder>|<token>"
_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local token = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
"""

_RENEW_IF_MINE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_IF_MINE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def lease_key(project_id: int, kind: str) -> str:
    return f"asvp:lease:{int(project_id)}:{kind}"


def fence_key(project_id: int, kind: str) -> str:
    """The counter the fencing tokens of one (project, lease) come from; it only grows."""
    return f"asvp:fence:{int(project_id)}:{kind}"


class LeaseLost(Exception):
    """The job no longer holds its lease (it expired while the job was paused or starved, and possibly
    another job took it over): it must write nothing more. The message says who holds it now."""


class Lease(ABC):
    """Try to take, hold and give back the right to run one (project, kind)."""

    token: int | None = None  # the fencing token of the current tenure, once acquired

    @abstractmethod
    def acquire(self) -> bool:
        """Take the lease if it is free; never blocks."""

    @abstractmethod
    def release(self) -> None: ...

    @abstractmethod
    def check(self) -> None:
        """Raise LeaseLost unless this tenure still holds the lease. Called right before each write that
        matters (a Redis round trip on Redis)."""

    def raise_if_lost(self) -> None:  # noqa: B027  (only a lease that can be lost overrides it)
        """Raise LeaseLost if the loss is already known (no I/O: cheap enough for every progress report)."""

    def superseded(self) -> bool:
        """Whether a later tenure (a higher fencing token) began after this one: another job took over."""
        return False

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RedisLease(Lease):
    """A Redis key holding "<job id>|<fencing token>", with a TTL renewed every third of LEASE_SECONDS."""

    def __init__(self, redis: Any, project_id: int, kind: str, holder: str, seconds: float = LEASE_SECONDS) -> None:
        self.redis = redis
        self.project_id, self.kind = int(project_id), kind
        self.key = lease_key(project_id, kind)
        self.holder = holder
        self.ttl_ms = int(seconds * 1000)
        self.value: str | None = None  # "<holder>|<token>" while held
        self.lost: str | None = None  # why the lease was lost, once known
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        token = int(self.redis.eval(_ACQUIRE, 2, self.key, fence_key(self.project_id, self.kind), self.holder,
                                    self.ttl_ms))
        if not token:
            return False
        self.token, self.value, self.lost = token, f"{self.holder}|{token}", None
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.redis.eval(_RENEW_IF_MINE, 1, self.key, self.value, self.ttl_ms):
                    self.lost = self._why_lost(self.redis.get(self.key))
                    log.warning("lease %s was lost (expired or taken over): %s", self.key, self.lost)
                    return
            except Exception as exc:  # Redis hiccup: try again at the next beat, the TTL leaves room
                log.warning("lease %s: renewal failed: %s", self.key, exc)

    def raise_if_lost(self) -> None:
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def check(self) -> None:
        """One GET: the lease's value must still be this tenure's "<holder>|<token>". A Redis error is
        raised as it is (the write does not happen either way)."""
        self.raise_if_lost()
        if self.value is None:
            raise LeaseLost(f"lease lost: the {self.kind} lease of project {self.project_id} is not held by "
                            f"{self.holder} (never taken, or released)")
        current = self.redis.get(self.key)
        if current is not None and _text(current) == self.value:
            return
        self.lost = self._why_lost(current)
        raise LeaseLost(self.lost)

    def superseded(self) -> bool:
        latest = self.redis.get(fence_key(self.project_id, self.kind))
        return self.token is not None and latest is not None and int(latest) > self.token

    def _why_lost(self, current: bytes | str | None) -> str:
        where = f"the {self.kind} lease of project {self.project_id}"
        mine = f"this job's token was {self.token}"
        if current is not None:
            holder, token = parse_lease_value(current)
            return (f"lease lost: another worker took over {where} ({holder}, token {token}; {mine}) after "
                    f"{self.holder} did not renew it; this job writes nothing more")
        try:
            latest = self.redis.get(fence_key(self.project_id, self.kind))
        except Exception:  # only the wording depends on it
            latest = None
        if latest is not None and self.token is not None and int(latest) > self.token:
            return (f"lease lost: another worker took over {where} (token {int(latest)}; {mine}) after "
                    f"{self.holder} did not renew it, and has released it since; this job writes nothing more")
        return (f"lease lost: {where} expired while {self.holder} (token {self.token}) did not renew it "
                f"(paused or starved for over {self.ttl_ms / 1000:g} s) and nobody took it over; this job "
                f"writes nothing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            try:
                self.redis.eval(_RELEASE_IF_MINE, 1, self.key, self.value)
            except Exception as exc:  # the TTL frees it anyway
                log.warning("lease %s: release failed: %s", self.key, exc)
        self.value = None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_lease_value(value: bytes | str) -> tuple[str, int | None]:
    """(holder, fencing token) of a lease's value; a value without a token (written before tokens
    existed) is all holder."""
    holder, sep, token = _text(value).rpartition("|")
    if not sep or not token.isdigit():
        return _text(value), None
    return holder, int(token)


def lease_holder(redis: Any, project_id: int, kind: str) -> str | None:
    """The job id holding the lease, if any (alive within the last LEASE_SECONDS)."""
    value = redis.get(lease_key(project_id, kind))
    return None if value is None else parse_lease_value(value)[0]


class FileLease(Lease):
    """An flock on a file: exclusive across threads and processes, dropped by the kernel when the holder dies.

    It cannot be lost while its process lives, so `check` needs no I/O; the fencing token is a counter kept
    in the lease file itself (read and bumped under the flock), for the logs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        self.token = self._next_token(fd)
        return True

    def _next_token(self, fd: int) -> int:
        try:
            previous = int(os.pread(fd, 32, 0).strip() or 0)
        except ValueError:
            previous = 0
        token = previous + 1
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{token}\n".encode(), 0)
        except OSError as exc:  # a full disk must not stop a job: the token is only informative here
            log.warning("lease file %s: could not record the token: %s", self.path, exc)
        return token

    def check(self) -> None:
        if self._fd is None:
            raise LeaseLost(f"lease lost: {self.path.name} is not held (never taken, or released)")

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
