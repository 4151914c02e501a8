"""Task results over RabbitMQ: one reply queue and one listener per process.

With ``rpc://`` results, a worker publishes each task's result as a message to
the queue named in the task's ``reply_to``. Celery's own client keeps one such
queue and consumer per thread, and under concurrent requests some replies
never reached their waiting thread (seen with Celery 5.7.0 and RabbitMQ
3.10.8, after workers restarted). This module does what RPC clients such as
OpenStack's messaging library do instead: each process owns one reply queue,
one thread consumes it, and callers wait on an event keyed by task id. The
worker side is unchanged: Celery's rpc backend publishes to ``reply_to``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.backends.rpc import RPCBackend
from kombu import Consumer, Queue

logger = logging.getLogger(__name__)

#: Seconds the listener blocks reading the connection before it checks
#: whether it should stop.
POLL_SECONDS = 1.0
RECONNECT_DELAY_SECONDS = 0.5


@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    meta: dict[str, Any] | None = None


class ReplyListener:
    """Receives the results of tasks this process sent, for ``wait``."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.queue_name = f"fleetvm.reply.{uuid.uuid4()}"
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="fleetvm-replies", daemon=True
        )
        self._thread.start()

    def expect(self, task_id: str) -> None:
        """Register interest in a task's result; call it before sending the task."""
        with self._lock:
            self._waiters[task_id] = _Waiter()

    def wait(self, task_id: str, timeout: float) -> dict[str, Any] | None:
        """Return the task's result message, or None after ``timeout`` seconds."""
        with self._lock:
            waiter = self._waiters[task_id]
        try:
            waiter.done.wait(timeout)
            return waiter.meta
        finally:
            with self._lock:
                self._waiters.pop(task_id, None)

    def cancel(self, task_id: str) -> None:
        """Drop interest in a task, for example because sending it failed."""
        with self._lock:
            self._waiters.pop(task_id, None)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the reply queue exists, so replies to it are not dropped."""
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=POLL_SECONDS * 3)

    def _on_message(self, body: dict[str, Any], message: Any) -> None:
        task_id = message.properties.get("correlation_id") or body.get("task_id")
        with self._lock:
            waiter = self._waiters.get(task_id)
        if waiter is None:
            # A late reply to a call that timed out, or a second run's reply.
            logger.debug("ignored reply for task %s: no caller waits for it", task_id)
            return
        if body.get("status") not in ("SUCCESS", "FAILURE"):
            return  # an intermediate state, such as STARTED
        waiter.meta = body
        waiter.done.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except Exception as exc:  # noqa: BLE001 - any broker error: reconnect
                self._ready.clear()
                logger.warning(
                    "reply queue %s lost its broker connection (%s); reconnecting",
                    self.queue_name,
                    exc,
                )
                self._stop.wait(RECONNECT_DELAY_SECONDS)

    def _consume(self) -> None:
        # Deleted by the broker when this process's connection closes.
        queue = Queue(self.queue_name, durable=False, auto_delete=True, exclusive=True)
        with self.app.connection_for_read() as connection:
            consumer = Consumer(
                connection.default_channel,
                [queue],
                callbacks=[self._on_message],
                no_ack=True,
                accept=["json"],
            )
            with consumer:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        connection.drain_events(timeout=POLL_SECONDS)
                    except TimeoutError:
                        continue


class ReplyQueueBackend(RPCBackend):
    """Celery's rpc backend, minus the per-thread reply queue on the sending side.

    Workers publish results with it unchanged. Senders wait through a
    ``ReplyListener``, so declaring a reply queue per thread before each send,
    as the stock backend does, would only leave unused queues behind.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        pass


#: Value of Celery's ``result_backend`` that selects ``ReplyQueueBackend``.
BACKEND_PATH = "fleetvm.replies:ReplyQueueBackend"
