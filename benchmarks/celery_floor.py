"""A bare Celery app for the round-trip floor: fleetvm's Celery settings and
broker, one task that does nothing, no fleetvm code around it.

Its worker runs as ``celery -A benchmarks.celery_floor worker``, with the broker
URL in ``FLEETVM_BENCH_BROKER_URL``.
"""

from __future__ import annotations

import os

from celery import Celery

from fleetvm.celery_app import make_celery
from fleetvm.settings import Settings

NOOP_TASK = "fleetvm_bench.noop"


def noop(vm_id: str = "") -> dict[str, str]:
    """Return at once, so a round trip measures only the broker and Celery."""
    return {"vm_id": vm_id}


def make_floor_app(broker_url: str) -> Celery:
    floor_app = make_celery(Settings(broker={"url": broker_url}))
    floor_app.task(name=NOOP_TASK)(noop)
    return floor_app


app = make_floor_app(
    os.environ.get("FLEETVM_BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")
)
