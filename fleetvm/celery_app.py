"""The Celery application shared by the API (which sends) and workers (which run).

Task names are constants here, so the API sends tasks by name and never imports
worker code.
"""

from __future__ import annotations

from celery import Celery

from fleetvm.replies import BACKEND_PATH
from fleetvm.settings import Settings

TASK_SPAWN = "fleetvm.spawn_vm"
TASK_EXECUTE = "fleetvm.execute"
TASK_UPLOAD = "fleetvm.upload"
TASK_DOWNLOAD = "fleetvm.download"
TASK_KILL = "fleetvm.kill_vm"
TASK_EXECUTE_ASYNC = "fleetvm.execute_async"


def make_celery(settings: Settings) -> Celery:
    backend = settings.result_url
    if backend == "rpc://":
        # Results come back as messages; see fleetvm.replies for why the
        # sending side does not use Celery's per-thread reply queues.
        backend = BACKEND_PATH
    app = Celery("fleetvm", broker=settings.broker_url, backend=backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A task is acknowledged only after it ran, and one a dying worker was
        # running goes back to its queue. Spawn and kill are safe to run twice;
        # the tasks that run user code opt out (see fleetvm.worker.tasks).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.broker.visibility_timeout_seconds
        },
        # A task that was running when the broker connection dropped runs to
        # its end, so a kill really happens. Its acknowledgement is lost with
        # the connection and the broker delivers it again, but a second run of
        # a kill or spawn only reports what the first one did.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # After a reconnection Celery lowers the prefetch count and raises it
        # again as tasks finish. With the threads pool those QoS calls come
        # from task threads while the main thread reads the same AMQP
        # connection, which corrupted its frames and left a worker taking no
        # tasks after a RabbitMQ restart (Celery 5.7, py-amqp 5.4).
        worker_enable_prefetch_count_reduction=False,
        task_create_missing_queues=True,
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    return app
