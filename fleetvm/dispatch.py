"""Client side of VM operations: one function per task, sent to the VM's owner.

Every operation on a VM travels as a Celery task to ``vm_queue_<worker_id>`` of
the worker that owns the VM; nothing goes over HTTP between nodes. The queue is
derived in one place (``queue_name``), and each function states whether it waits
for the result (``_call``) or only sends (``_cast``).

A worker returns ``{"ok": true, ...}`` or ``{"ok": false, "error": code,
"message": ...}``; the second is raised here as the matching
``fleetvm.errors`` exception.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from amqp.exceptions import AMQPError
from celery import Celery
from celery.exceptions import BackendError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from fleetvm.celery_app import (
    TASK_DOWNLOAD,
    TASK_EXECUTE,
    TASK_EXECUTE_ASYNC,
    TASK_KILL,
    TASK_SPAWN,
    TASK_UPLOAD,
)
from fleetvm.errors import Unavailable, WorkerTimeout, error_from_code
from fleetvm.replies import BACKEND_PATH, ReplyListener
from fleetvm.settings import queue_name

logger = logging.getLogger(__name__)

#: Extra seconds an execute waits beyond the command's own timeout, for the
#: round trip through the broker and the guest agent.
EXECUTE_MARGIN_SECONDS = 10.0
FILE_TIMEOUT_SECONDS = 60.0
#: Exceptions raised by sending a task or reading its result while the broker
#: or the result backend is down or restarting.
CONNECTION_ERRORS = (KombuError, AMQPError, RedisError, BackendError, OSError)


class Dispatcher:
    """Sends VM tasks to owner workers through one Celery app."""

    def __init__(self, app: Celery, spawn_timeout: float) -> None:
        self.app = app
        self.spawn_timeout = spawn_timeout
        self._replies: ReplyListener | None = None
        self._replies_lock = threading.Lock()

    def _reply_listener(self) -> ReplyListener | None:
        """Return this process's reply listener when results travel as messages."""
        if self.app.conf.result_backend != BACKEND_PATH:
            return None
        with self._replies_lock:
            if self._replies is None:
                self._replies = ReplyListener(self.app)
        return self._replies

    def close(self) -> None:
        """Stop the reply listener, if this dispatcher started one."""
        if self._replies is not None:
            self._replies.stop()

    def spawn(self, worker_id: str, vm_id: str) -> dict[str, Any]:
        return self._call(
            TASK_SPAWN, worker_id, {"vm_id": vm_id}, self.spawn_timeout + 5.0
        )

    def execute(
        self, worker_id: str, vm_id: str, language: str, code: str, timeout: float
    ) -> dict[str, Any]:
        kwargs = {"vm_id": vm_id, "language": language, "code": code}
        kwargs["timeout"] = timeout
        return self._call(
            TASK_EXECUTE, worker_id, kwargs, timeout + EXECUTE_MARGIN_SECONDS
        )

    def execute_async(
        self,
        worker_id: str,
        execution_id: str,
        vm_id: str,
        language: str,
        code: str,
        timeout: float,
        start_timeout: float,
    ) -> str:
        """Send an execution without waiting and return the Celery task id.

        The worker writes the result to the execution's row. It discards the
        task if it reaches it more than ``start_timeout`` seconds after sending.
        """
        kwargs = {
            "execution_id": execution_id,
            "vm_id": vm_id,
            "language": language,
            "code": code,
            "timeout": timeout,
        }
        result = self._send(
            TASK_EXECUTE_ASYNC, worker_id, kwargs, start_timeout, wait=False
        )
        logger.info(
            "sent %s[%s] for execution %s to worker %s",
            TASK_EXECUTE_ASYNC,
            result.id,
            execution_id,
            worker_id,
            extra={"vm_id": vm_id, "worker_id": worker_id},
        )
        return result.id

    def upload(
        self, worker_id: str, vm_id: str, remote_path: str, content_b64: str
    ) -> dict[str, Any]:
        kwargs = {"vm_id": vm_id, "remote_path": remote_path}
        kwargs["content_b64"] = content_b64
        return self._call(TASK_UPLOAD, worker_id, kwargs, FILE_TIMEOUT_SECONDS)

    def download(self, worker_id: str, vm_id: str, remote_path: str) -> dict[str, Any]:
        kwargs = {"vm_id": vm_id, "remote_path": remote_path}
        return self._call(TASK_DOWNLOAD, worker_id, kwargs, FILE_TIMEOUT_SECONDS)

    def kill(
        self,
        worker_id: str,
        vm_id: str,
        kill_record_id: int,
        wait_seconds: float | None,
        redispatched: bool = False,
    ) -> dict[str, Any] | None:
        """Send a kill; with ``wait_seconds``, return the result or None on timeout.

        A timeout is not a failure: the kill intent is already in the database
        and the owner carries it out when it gets to it.
        """
        kwargs = {"vm_id": vm_id, "kill_record_id": kill_record_id}
        kwargs["redispatched"] = redispatched
        if wait_seconds is None:
            self._cast(TASK_KILL, worker_id, kwargs)
            return None
        try:
            # A kill never expires: it is carried out however late it arrives.
            return self._call(TASK_KILL, worker_id, kwargs, wait_seconds, expires=False)
        except WorkerTimeout:
            return None

    def _send(
        self,
        task: str,
        worker_id: str,
        kwargs: dict[str, Any],
        expires: float | None = None,
        wait: bool = True,
        **options: Any,
    ):
        # A task that no caller waits for requests no result, so no worker sends one.
        try:
            return self.app.send_task(
                task,
                kwargs=kwargs,
                queue=queue_name(worker_id),
                expires=expires,
                ignore_result=not wait,
                **options,
            )
        except CONNECTION_ERRORS as exc:
            raise Unavailable(
                f"Could not send {task} for VM {kwargs.get('vm_id')} to worker "
                f"{worker_id!r}: the broker is unreachable ({exc}). Try again."
            ) from exc

    def _cast(self, task: str, worker_id: str, kwargs: dict[str, Any]) -> str:
        result = self._send(task, worker_id, kwargs, wait=False)
        logger.info(
            "sent %s[%s] to worker %s",
            task,
            result.id,
            worker_id,
            extra={"vm_id": kwargs.get("vm_id"), "worker_id": worker_id},
        )
        return result.id

    def _call(
        self,
        task: str,
        worker_id: str,
        kwargs: dict[str, Any],
        timeout: float,
        expires: bool = True,
    ) -> dict[str, Any]:
        """Send a task and wait up to ``timeout`` seconds for its result.

        With ``expires``, a worker discards the task if it reaches it after the
        caller stopped waiting, so no command runs after its caller gave up.
        """
        replies = self._reply_listener()
        if replies is not None:
            answer = self._call_through_listener(
                replies, task, worker_id, kwargs, timeout, expires
            )
        else:
            answer = self._call_through_backend(
                task, worker_id, kwargs, timeout, expires
            )
        if not answer.get("ok"):
            raise error_from_code(answer.get("error", ""), answer.get("message", ""))
        return answer

    def _call_through_listener(
        self,
        replies: ReplyListener,
        task: str,
        worker_id: str,
        kwargs: dict[str, Any],
        timeout: float,
        expires: bool,
    ) -> dict[str, Any]:
        if not replies.wait_ready(timeout):
            raise Unavailable(
                f"Could not send {task} for VM {kwargs.get('vm_id')}: no reply "
                "queue on the broker. Try again."
            )
        task_id = str(uuid.uuid4())
        replies.expect(task_id)
        try:
            self._send(
                task,
                worker_id,
                kwargs,
                timeout if expires else None,
                task_id=task_id,
                reply_to=replies.queue_name,
            )
        except Unavailable:
            replies.cancel(task_id)
            raise
        meta = replies.wait(task_id, timeout)
        if meta is None:
            raise WorkerTimeout(
                _timeout_message(worker_id, task, task_id, kwargs, timeout)
            )
        if meta.get("status") != "SUCCESS" or not isinstance(meta.get("result"), dict):
            raise Unavailable(
                f"{task}[{task_id}] for VM {kwargs.get('vm_id')} failed on worker "
                f"{worker_id!r}; its log has the details."
            )
        return meta["result"]

    def _call_through_backend(
        self,
        task: str,
        worker_id: str,
        kwargs: dict[str, Any],
        timeout: float,
        expires: bool,
    ) -> dict[str, Any]:
        result = self._send(task, worker_id, kwargs, timeout if expires else None)
        try:
            return result.get(
                timeout=timeout, propagate=True, disable_sync_subtasks=False
            )
        except CeleryTimeoutError as exc:
            raise WorkerTimeout(
                _timeout_message(worker_id, task, result.id, kwargs, timeout)
            ) from exc
        except CONNECTION_ERRORS as exc:
            raise Unavailable(
                f"Lost the result of worker {worker_id!r} for {task}[{result.id}] for "
                f"VM {kwargs.get('vm_id')}: the result backend is unreachable "
                f"({exc}). Try again."
            ) from exc
        except RuntimeError as exc:
            # Celery's result consumer raises RuntimeError once it gives up
            # reconnecting, and stays broken; this thread gets a new one.
            self._discard_result_backend()
            raise Unavailable(
                f"Lost the result of worker {worker_id!r} for {task}[{result.id}] for "
                f"VM {kwargs.get('vm_id')}: the result backend stayed unreachable "
                f"({exc}). Try again."
            ) from exc
        finally:
            _forget(result)

    def _discard_result_backend(self) -> None:
        # NOTE: Celery keeps one result backend per thread in the private
        # app._local, and offers no public call to replace a broken one.
        self.app._local.__dict__.pop("backend", None)


def _forget(result) -> None:
    """Drop a task's stored result; a backend that is down keeps it until expiry."""
    try:
        result.forget()
    except (*CONNECTION_ERRORS, RuntimeError):
        logger.debug("could not forget result of task %s", result.id)


def _timeout_message(
    worker_id: str, task: str, task_id: str, kwargs: dict[str, Any], timeout: float
) -> str:
    return (
        f"Worker {worker_id!r} did not respond to {task}[{task_id}] for VM "
        f"{kwargs.get('vm_id')} within {timeout:.0f} s. It may be down or busy; "
        "try again later."
    )
