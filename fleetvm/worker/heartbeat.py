"""A worker's registration and heartbeat, and the checks that keep its id unique.

The workers table records which worker owns which VMs, so one id must belong to
one running worker. A second worker with a live id would consume the same
queue and, at start, remove the first one's VMs as unknown; it is rejected.
A worker that an operator retired while it was only paused stops itself when
it runs again, instead of coming back up with VMs the database calls lost.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from sqlalchemy import update

from fleetvm.db.models import Worker, utcnow
from fleetvm.services.vms import heartbeat_age, worker_is_live
from fleetvm.worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

RETIRED = "retired"


def instance_name(rt: WorkerRuntime) -> str:
    """Return the host and data directory this worker process runs on."""
    name = f"{socket.gethostname()}:{rt.settings.resolved_data_dir}"
    return name[:255]


class Heartbeat:
    """Registers the worker and refreshes its heartbeat until stopped."""

    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.instance = instance_name(rt)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="fleetvm-heartbeat", daemon=True
        )

    def register(self) -> None:
        """Record this worker as up, or exit if a live worker elsewhere has its id."""
        settings = self.rt.settings
        now = utcnow()
        with self.rt.database.session() as db:
            worker = db.get(Worker, self.rt.worker_id, with_for_update=True)
            if worker is None:
                worker = Worker(id=self.rt.worker_id)
                db.add(worker)
            elif worker.host != self.instance and worker_is_live(worker, settings):
                raise SystemExit(
                    f"error: worker id {self.rt.worker_id!r} is in use by a live "
                    f"worker on {worker.host} (heartbeat {heartbeat_age(worker):.0f} s "
                    "ago). Give each worker its own --worker-id, or stop the other "
                    f"one and wait {settings.multinode.dead_after_seconds:.0f} s."
                )
            worker.queue = settings.worker_queue
            worker.host = self.instance
            worker.capacity = settings.multinode.capacity
            worker.state = "up"
            worker.started_at = now
            worker.last_heartbeat = now
        logger.info(
            "worker %s registered on %s, consuming %s",
            self.rt.worker_id,
            self.instance,
            settings.worker_queue,
            extra={"worker_id": self.rt.worker_id},
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, state: str = "stopped") -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._set_state(state)

    def _set_state(self, state: str) -> bool:
        """Refresh this worker's row; return False if it is retired or taken."""
        with self.rt.database.session() as db:
            return (
                db.execute(
                    update(Worker)
                    .where(
                        Worker.id == self.rt.worker_id,
                        Worker.host == self.instance,
                        Worker.state != RETIRED,
                    )
                    .values(state=state, last_heartbeat=utcnow())
                    .execution_options(synchronize_session=False)
                ).rowcount
                == 1
            )

    def _run(self) -> None:
        interval = self.rt.settings.multinode.heartbeat_seconds
        while not self._stop.wait(interval):
            try:
                if not self._set_state("up"):
                    self._give_up_id()
                    return
            except Exception:
                logger.exception(
                    "heartbeat of worker %s failed",
                    self.rt.worker_id,
                    extra={"worker_id": self.rt.worker_id},
                )

    def _give_up_id(self) -> None:
        """Kill this host's VMs and stop: an operator retired this worker, or
        another worker took its id while this one was silent."""
        extra = {"worker_id": self.rt.worker_id}
        logger.error(
            "worker %s was retired or its id was taken while it was silent; "
            "killing its VMs and stopping",
            self.rt.worker_id,
            extra=extra,
        )
        driver = self.rt.vms.driver
        for vm_id in driver.list_vms():
            driver.kill(vm_id)
            logger.warning("killed VM %s of a retired worker", vm_id, extra=extra)
        # Celery's warm shutdown; run_worker's clean-up then runs as usual.
        os.kill(os.getpid(), signal.SIGTERM)
