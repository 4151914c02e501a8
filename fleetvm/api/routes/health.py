"""Readiness of this API node, its database and the workers."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from fleetvm.api.deps import State
from fleetvm.api.schemas import Health
from fleetvm.db.models import Worker, utcnow

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def read_health(state: State) -> JSONResponse:
    """Return 200 when the database responds and at least one worker is live."""
    alive_since = utcnow() - timedelta(
        seconds=state.settings.multinode.dead_after_seconds
    )
    try:
        with state.database.session() as db:
            db.execute(text("SELECT 1"))
            live = db.scalar(
                select(func.count())
                .select_from(Worker)
                .where(Worker.state == "up", Worker.last_heartbeat >= alive_since)
            )
        database_ok = True
    except SQLAlchemyError:
        database_ok, live = False, 0
    ready = database_ok and bool(live)
    body = Health(
        status="ok" if ready else "degraded",
        database=database_ok,
        live_workers=live or 0,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
