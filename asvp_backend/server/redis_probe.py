"""/health's view of Redis: whether it answers, asked at most once a second and never waited on for long.

/health must answer within Label Studio's 1 s at all times, so the ping runs in a thread with a short
timeout, only one at a time, and /health waits WAIT_S for it before reporting the last answer. Without the
probe /health said UP while every route that needs Redis failed.
"""

from __future__ import annotations

import asyncio
import threading
import time

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from asvp_backend.server.errors import short_reason


class RedisProbe:
    """Whether Redis answers, for /health: asked at most once per INTERVAL_S with a short timeout, in a
    thread, and /health waits at most WAIT_S for it (then reports the last answer)."""

    INTERVAL_S = 1.0
    TIMEOUT_S = 0.5
    WAIT_S = 0.25

    def __init__(self, url: str) -> None:
        self._client = Redis.from_url(
            url, socket_connect_timeout=self.TIMEOUT_S, socket_timeout=self.TIMEOUT_S, retry=Retry(NoBackoff(), 0)
        )
        self._checking = threading.Lock()
        self._checked_at = float("-inf")
        self._state = "down: no answer yet"

    async def state(self) -> str:
        """Either "ok" or "down: <short reason>"."""
        if time.monotonic() - self._checked_at < self.INTERVAL_S:
            return self._state
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._check), timeout=self.WAIT_S)
        except TimeoutError:
            return self._state if self._state != "ok" else f"down: no answer within {self.WAIT_S} s"

    def _check(self) -> str:
        if not self._checking.acquire(blocking=False):
            return self._state  # another request is asking right now
        try:
            try:
                self._client.ping()
                state = "ok"
            except (RedisError, OSError) as exc:
                state = f"down: {short_reason(exc)}"
            self._state, self._checked_at = state, time.monotonic()
            return state
        finally:
            self._checking.release()

    def close(self) -> None:
        self._client.close()
