"""Entry point of ``fleetvm worker``: one Celery worker for one node's queue."""

from __future__ import annotations

import logging
import os

from fleetvm.celery_app import make_celery
from fleetvm.db.engine import Database
from fleetvm.dispatch import Dispatcher
from fleetvm.drivers import make_driver
from fleetvm.locks import hold_lock_file
from fleetvm.settings import RESERVED_WORKER_THREADS, Settings
from fleetvm.worker import runtime as runtime_module
from fleetvm.worker.heartbeat import Heartbeat
from fleetvm.worker.reaper import Reaper
from fleetvm.worker.reconcile import reconcile
from fleetvm.worker.runtime import WorkerRuntime
from fleetvm.worker.slots import CommandSlots
from fleetvm.worker.vms import VmManager

logger = logging.getLogger(__name__)


def lock_worker_dir(settings: Settings) -> int:
    """Take the data directory for this worker, or exit if another worker has it.

    A worker removes VMs on disk that the database does not give it, so two
    workers on one directory would kill each other's VMs.
    """
    data_dir = settings.resolved_data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    return hold_lock_file(
        data_dir / "worker.lock",
        f"error: another `fleetvm worker` is running on data directory "
        f"{data_dir}; give each worker of a host its own FLEETVM_DATA_DIR.",
    )


def build_runtime(settings: Settings) -> WorkerRuntime:
    database = Database(settings)
    database.create_all()
    app = make_celery(settings)
    driver = make_driver(settings)
    # The process driver probes its sandbox on first use. Probing here puts a
    # fallback warning at start-up and keeps the probe out of the first spawn.
    logger.info(
        "VM driver %s, sandbox %s",
        driver.name,
        getattr(driver, "sandbox", "n/a"),
        extra={"worker_id": settings.multinode.worker_id},
    )
    remove_stale = getattr(driver, "remove_stale_cgroups", None)
    if remove_stale is not None:
        removed = remove_stale()
        if removed:
            logger.info("removed %d stale VM cgroups", len(removed))
    multinode = settings.multinode
    slots = CommandSlots(
        multinode.worker_id,
        total=multinode.worker_concurrency - RESERVED_WORKER_THREADS,
        per_user=multinode.max_commands_per_user,
    )
    manager = VmManager(database, driver, multinode.worker_id, slots)
    dispatcher = Dispatcher(app, settings.vm.spawn_timeout_seconds)
    return WorkerRuntime(settings, database, manager, dispatcher)


def run_worker(settings: Settings) -> None:
    """Reconcile this node's VMs, then consume its queue until stopped."""
    lock_fd = lock_worker_dir(settings)
    rt = build_runtime(settings)
    runtime_module.install(rt)
    import fleetvm.worker.tasks  # noqa: F401  (registers the tasks)

    heartbeat = Heartbeat(rt)
    heartbeat.register()
    reconcile(rt)
    reaper = Reaper(rt)
    reaper.start()
    heartbeat.start()

    app = rt.dispatcher.app
    argv = [
        "worker",
        "--queues",
        settings.worker_queue,
        "--pool",
        "threads",
        "--concurrency",
        str(settings.multinode.worker_concurrency),
        "--hostname",
        f"{settings.multinode.worker_id}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]
    try:
        app.worker_main(argv)
    finally:
        reaper.stop()
        heartbeat.stop()
        os.close(lock_fd)
        logger.info(
            "worker %s stopped; its VMs keep running for the next start to adopt",
            settings.multinode.worker_id,
            extra={"worker_id": settings.multinode.worker_id},
        )
