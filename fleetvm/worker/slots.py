"""Limits on the worker threads that run user code.

A command occupies its thread for up to its timeout, so without a bound one user
could occupy every thread and delay everyone's kills. Some threads are kept
for spawns and kills, and each user gets a fixed share of the rest.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from fleetvm.errors import TooManyRequests, WorkerBusy


class CommandSlots:
    """Counts running commands per worker and per user, rejecting any over limit."""

    def __init__(self, worker_id: str, total: int, per_user: int) -> None:
        self.worker_id = worker_id
        self.total = total
        self.per_user = per_user
        self._running: Counter[int] = Counter()
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, user_id: int) -> Iterator[None]:
        self._acquire(user_id)
        try:
            yield
        finally:
            with self._guard:
                self._running[user_id] -= 1

    def _acquire(self, user_id: int) -> None:
        with self._guard:
            if self._running[user_id] >= self.per_user:
                raise TooManyRequests(
                    f"You already have {self.per_user} commands running on worker "
                    f"{self.worker_id}, the maximum "
                    "(multinode.max_commands_per_user); wait for one to finish."
                )
            if self._running.total() >= self.total:
                raise WorkerBusy(
                    f"Worker {self.worker_id} is running {self.total} commands, its "
                    "maximum; retry shortly."
                )
            self._running[user_id] += 1
