"""A lease in Redis: "this piece of work is alive", for training runs and pre-annotation chunks alike.

A lease is a key holding the holder's token with a time to live. While the work runs, a heartbeat thread
refreshes the TTL every quarter of it; when the work ends the key is deleted. A holder killed without warning
(an OOM kill, a lost machine) stops refreshing, and the key expires within one TTL, so whoever watches the
work (`RQJobs.status`, the pre-annotation runner) sees it stopped. Refreshing and releasing act only while
the key still holds our token: a stalled holder whose lease expired and was taken over cannot extend or
delete the new holder's lease.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..core.env import environ, get_int

# s: how long a killed worker's work still looks alive (AXX_HEARTBEAT_TTL; read once, when the module loads)
HEARTBEAT_TTL = get_int(environ(), "AXX_HEARTBEAT_TTL", 60, minimum=1)

# Refresh or release a lease only while it is still ours.
REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class Lease:
    """The lease `key` for the holder `token`, with a time to live of `ttl` seconds."""

    def __init__(self, redis: Any, key: str, token: str, ttl: int = HEARTBEAT_TTL) -> None:
        self.redis, self.key, self.token, self.ttl = redis, key, token, int(ttl)

    def take(self) -> None:
        """Hold the lease, whoever held it (the work's own bookkeeping guarantees one holder)."""
        self.redis.set(self.key, self.token, ex=self.ttl)

    def acquire(self, wait: float = 0.0, poll: float = 1.0) -> bool:
        """Hold the lease if nobody does, waiting up to `wait` s for another holder's lease to end."""
        deadline = time.monotonic() + wait
        while not self.redis.set(self.key, self.token, nx=True, ex=self.ttl):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def held(self) -> bool:
        """Still ours (not expired, not taken over)."""
        return (self.redis.get(self.key) or b"").decode() == self.token

    def refresh(self) -> bool:
        return bool(self.redis.eval(REFRESH, 1, self.key, self.token, self.ttl))

    def release(self) -> None:
        self.redis.eval(RELEASE, 1, self.key, self.token)

    @contextmanager
    def heartbeat(self, name: str = "lease") -> Iterator[Lease]:
        """Refresh the lease every `ttl / 4` s while the block runs; release it when the block ends."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl / 4):
                self.refresh()

        thread = threading.Thread(target=beat, name=f"heartbeat-{name}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            self.release()
