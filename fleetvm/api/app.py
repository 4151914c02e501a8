"""The FastAPI application and its one mapping from fleetvm errors to HTTP."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError

from fleetvm import __version__
from fleetvm.api.routes import (
    auth,
    executions,
    fleet,
    health,
    keys,
    kill,
    sessions,
    vms,
)
from fleetvm.api.state import ApiState
from fleetvm.errors import FleetvmError, NotAuthenticated
from fleetvm.settings import Settings

logger = logging.getLogger(__name__)


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped.

    Escaping keeps a response valid even if it echoes a lone surrogate from a
    request, which UTF-8 cannot encode and which would otherwise turn a 422
    into a 500.
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


async def handle_validation_error(
    request: Request, exc: RequestValidationError
) -> JSONResponse:
    return AsciiJSONResponse(
        status_code=422, content={"detail": jsonable_encoder(exc.errors())}
    )


async def handle_fleetvm_error(request: Request, exc: FleetvmError) -> JSONResponse:
    headers = (
        {"WWW-Authenticate": "Bearer"} if isinstance(exc, NotAuthenticated) else None
    )
    if exc.status_code >= 500:
        logger.warning(
            "%s %s failed: %s", request.method, request.url.path, exc.message
        )
    return AsciiJSONResponse(
        status_code=exc.status_code,
        content={"detail": exc.message, "code": exc.code},
        headers=headers,
    )


async def handle_database_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s: database error: %s", request.method, request.url.path, exc)
    return AsciiJSONResponse(
        status_code=503,
        content={
            "detail": "The database is unavailable or busy; retry the request.",
            "code": "database_unavailable",
        },
    )


async def handle_unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    # PostgreSQL rejects some strings that SQLite stores, such as ones with a
    # NUL character. The request is invalid, so this is a 400, not a 500.
    logger.info(
        "%s %s: value rejected by the database: %s",
        request.method,
        request.url.path,
        exc,
    )
    return AsciiJSONResponse(
        status_code=400,
        content={
            "detail": "A value in the request cannot be stored (for example, it "
            "contains a NUL character or is too long); correct it and retry.",
            "code": "invalid_request",
        },
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.fleetvm = ApiState.create(settings)
        logger.info("API ready on database %s", settings.database_url.split("@")[-1])
        yield
        app.state.fleetvm.close()

    app = FastAPI(
        title="fleetvm",
        version=__version__,
        description="Short-lived sandbox VMs for user sessions.",
        lifespan=lifespan,
        default_response_class=AsciiJSONResponse,
    )
    app.add_exception_handler(RequestValidationError, handle_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(FleetvmError, handle_fleetvm_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, handle_database_error)
    app.add_exception_handler(DataError, handle_unstorable_value)
    for module in (auth, sessions, vms, executions, kill, keys, fleet, health):
        app.include_router(module.router)
    return app
