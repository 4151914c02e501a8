"""Dispatch sends each VM operation to the owner's queue, waiting or not.

A real Celery worker on the embedded Redis consumes ``vm_queue_w1`` with
stand-in tasks under the real task names, which return the queue they
were delivered on, so each dispatch function's target queue and mode are
checked end to end through the broker.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from fleetvm.celery_app import (
    TASK_DOWNLOAD,
    TASK_EXECUTE,
    TASK_EXECUTE_ASYNC,
    TASK_KILL,
    TASK_SPAWN,
    TASK_UPLOAD,
    make_celery,
)
from fleetvm.dispatch import Dispatcher
from fleetvm.embedded import start_embedded_redis
from fleetvm.errors import VmNotRunning, WorkerTimeout
from fleetvm.settings import Settings
from tests.harness import short_data_dir, stop_process

received: list[tuple[str, str, dict]] = []
expirations: list[str | None] = []
received_event = threading.Event()


def register_echo_tasks(app: Celery) -> None:
    names = (TASK_SPAWN, TASK_EXECUTE, TASK_UPLOAD, TASK_DOWNLOAD, TASK_KILL)
    for name in (*names, TASK_EXECUTE_ASYNC):

        def echo(self, _name: str = name, **kwargs: object) -> dict:
            queue = self.request.delivery_info["routing_key"]
            received.append((_name, queue, kwargs))
            expirations.append(self.request.expires)
            received_event.set()
            if kwargs.get("vm_id") == "vm-gone":
                return {"ok": False, "error": "vm_not_running", "message": "gone"}
            return {"ok": True, "queue": queue, "outcome": "killed", **kwargs}

        app.task(name=name, bind=True)(echo)


@pytest.fixture(scope="module")
def dispatcher() -> Iterator[Dispatcher]:
    data_dir = short_data_dir()
    settings = Settings(data_dir=data_dir)
    redis = start_embedded_redis(settings)
    app = make_celery(settings)
    register_echo_tasks(app)
    with start_worker(
        app,
        pool="threads",
        concurrency=2,
        queues=["vm_queue_w1"],
        perform_ping_check=False,
        shutdown_timeout=10,
    ):
        yield Dispatcher(app, spawn_timeout=1.0)
    stop_process(redis)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.parametrize(
    ("task", "call"),
    [
        pytest.param(TASK_SPAWN, lambda d: d.spawn("w1", "vm-1"), id="spawn"),
        pytest.param(
            TASK_EXECUTE,
            lambda d: d.execute("w1", "vm-1", "python", "print(1)", 5),
            id="execute",
        ),
        pytest.param(
            TASK_UPLOAD, lambda d: d.upload("w1", "vm-1", "a.txt", "aGk="), id="upload"
        ),
        pytest.param(
            TASK_DOWNLOAD, lambda d: d.download("w1", "vm-1", "a.txt"), id="download"
        ),
        pytest.param(TASK_KILL, lambda d: d.kill("w1", "vm-1", 7, 5.0), id="kill-wait"),
    ],
)
def test_dispatch_call_waits_on_owner_queue(dispatcher, task, call) -> None:
    received.clear()

    answer = call(dispatcher)

    assert answer["queue"] == "vm_queue_w1"
    assert answer["vm_id"] == "vm-1"
    assert [(name, queue) for name, queue, _ in received] == [(task, "vm_queue_w1")]


def test_dispatch_kill_without_wait_only_sends(dispatcher) -> None:
    received.clear()
    received_event.clear()

    answer = dispatcher.kill("w1", "vm-2", 9, wait_seconds=None)

    assert answer is None
    assert received_event.wait(10)
    name, queue, kwargs = received[0]
    assert (name, queue) == (TASK_KILL, "vm_queue_w1")
    assert kwargs == {"vm_id": "vm-2", "kill_record_id": 9, "redispatched": False}


def test_dispatch_error_answer_raises(dispatcher) -> None:
    with pytest.raises(VmNotRunning, match="gone"):
        dispatcher.execute("w1", "vm-gone", "python", "1", 5)


def test_dispatch_no_consumer_times_out(dispatcher) -> None:
    started = time.monotonic()

    with pytest.raises(WorkerTimeout, match="nobody"):
        dispatcher._call(TASK_DOWNLOAD, "nobody", {"vm_id": "vm-3"}, 0.5)

    assert time.monotonic() - started < 5


def test_dispatch_kill_timeout_is_pending(dispatcher) -> None:
    answer = dispatcher.kill("nobody", "vm-4", 11, wait_seconds=0.5)

    assert answer is None


def test_dispatch_execute_async_only_sends(dispatcher) -> None:
    received.clear()
    received_event.clear()
    expirations.clear()

    task_id = dispatcher.execute_async(
        "w1", "execution-1", "vm-5", "bash", "echo hi", 30, start_timeout=60
    )

    assert task_id
    assert received_event.wait(10)
    name, queue, kwargs = received[0]
    assert (name, queue) == (TASK_EXECUTE_ASYNC, "vm_queue_w1")
    assert kwargs == {
        "execution_id": "execution-1",
        "vm_id": "vm-5",
        "language": "bash",
        "code": "echo hi",
        "timeout": 30,
    }
    assert expirations[0] is not None
