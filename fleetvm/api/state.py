"""Objects one API process shares between requests."""

from __future__ import annotations

from dataclasses import dataclass

from fleetvm.celery_app import make_celery
from fleetvm.db.engine import Database
from fleetvm.dispatch import Dispatcher
from fleetvm.security import load_secret_key
from fleetvm.services.vms import VmService
from fleetvm.settings import Settings


@dataclass
class ApiState:
    settings: Settings
    database: Database
    dispatcher: Dispatcher
    vm_service: VmService
    secret_key: str

    @classmethod
    def create(cls, settings: Settings) -> ApiState:
        database = Database(settings)
        database.create_all()
        dispatcher = Dispatcher(
            make_celery(settings), settings.vm.spawn_timeout_seconds
        )
        return cls(
            settings=settings,
            database=database,
            dispatcher=dispatcher,
            vm_service=VmService(database, dispatcher, settings),
            secret_key=load_secret_key(settings),
        )

    def close(self) -> None:
        self.database.dispose()
