"""Job leases: at most one running job per (project, kind), and a dead holder frees it within seconds.

Why a lease and not a plain lock: a worker killed with `kill -9` never releases anything. A lease is held
only while its holder proves it is alive. On Redis it is a key with a short TTL (LEASE_SECONDS) that a
heartbeat thread renews; in the embedded mode it is an flock, which the kernel drops when the process
dies. Acquiring never blocks: a job that finds the lease taken is re-queued with a delay by the runner, so
a waiting job never occupies a worker that other projects need.
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

LEASE_SECONDS = 30.0

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


class Lease(ABC):
    """Try to take, hold and give back the right to run one (project, kind)."""

    @abstractmethod
    def acquire(self) -> bool:
        """Take the lease if it is free; never blocks."""

    @abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RedisLease(Lease):
    """A Redis key holding the job id, with a TTL renewed every third of LEASE_SECONDS."""

    def __init__(self, redis: Any, project_id: int, kind: str, holder: str, seconds: float = LEASE_SECONDS) -> None:
        self.redis = redis
        self.key = lease_key(project_id, kind)
        self.holder = holder
        self.ttl_ms = int(seconds * 1000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms):
            return False
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.redis.eval(_RENEW_IF_MINE, 1, self.key, self.holder, self.ttl_ms):
                    log.warning("lease %s was lost (expired or taken over)", self.key)
                    return
            except Exception as exc:  # Redis hiccup: try again at the next beat, the TTL leaves room
                log.warning("lease %s: renewal failed: %s", self.key, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            try:
                self.redis.eval(_RELEASE_IF_MINE, 1, self.key, self.holder)
            except Exception as exc:  # the TTL frees it anyway
                log.warning("lease %s: release failed: %s", self.key, exc)


def lease_holder(redis: Any, project_id: int, kind: str) -> str | None:
    """The job id holding the lease, if any (alive within the last LEASE_SECONDS)."""
    value = redis.get(lease_key(project_id, kind))
    return None if value is None else (value.decode() if isinstance(value, bytes) else str(value))


class FileLease(Lease):
    """An flock on a file: exclusive across threads and processes, dropped by the kernel when the holder dies."""

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
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
