"""The objects one worker process shares between its task threads."""

from __future__ import annotations

from dataclasses import dataclass

from fleetvm.db.engine import Database
from fleetvm.dispatch import Dispatcher
from fleetvm.settings import Settings
from fleetvm.worker.vms import VmManager


@dataclass
class WorkerRuntime:
    settings: Settings
    database: Database
    vms: VmManager
    dispatcher: Dispatcher

    @property
    def worker_id(self) -> str:
        return self.settings.multinode.worker_id


_runtime: WorkerRuntime | None = None


def install(value: WorkerRuntime) -> None:
    global _runtime
    _runtime = value


def runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError(
            "fleetvm worker tasks run only inside `fleetvm worker`, which sets up "
            "the worker runtime first."
        )
    return _runtime
