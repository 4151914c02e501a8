"""Concurrent placements on PostgreSQL respect every worker's capacity."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from fleetvm.db.engine import Database
from fleetvm.db.models import Session, User, Worker
from fleetvm.errors import NoWorkerAvailable
from fleetvm.services.vms import VmService
from fleetvm.settings import Settings
from tests.cluster.services import postgres_database


@pytest.fixture(scope="module")
def database() -> Iterator[Database]:
    with postgres_database() as url:
        instance = Database(Settings(database={"url": url, "pool_size": 10}))
        instance.create_all()
        yield instance
        instance.dispose()


def test_concurrent_placement_respects_capacity(database: Database) -> None:
    settings = Settings()
    service = VmService(database, dispatcher=None, settings=settings)  # type: ignore[arg-type]
    with database.session() as db:
        db.add(User(id=1, username="alice"))
        for name in ("a", "b"):
            db.add(
                Worker(
                    id=name, queue=f"vm_queue_{name}", host="t", capacity=2, state="up"
                )
            )
        db.flush()
        sessions = [str(uuid.uuid4()) for _ in range(12)]
        for session_id in sessions:
            db.add(
                Session(
                    id=session_id,
                    user_id=1,
                    vm_lifetime_seconds=60,
                    memory_mb=256,
                    vcpu_count=1,
                )
            )

    outcomes: list[str] = []
    start = threading.Barrier(len(sessions))

    def place(session_id: str) -> None:
        start.wait()
        try:
            with database.session() as db:
                vm = service._assign_new_vm(db, db.get(Session, session_id))
                outcomes.append(vm.worker_id)
        except NoWorkerAvailable:
            outcomes.append("none")

    threads = [threading.Thread(target=place, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert Counter(outcomes) == {"a": 2, "b": 2, "none": 8}
