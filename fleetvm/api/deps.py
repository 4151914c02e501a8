"""Dependencies shared by the routes: database session, services, current user."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, OAuth2PasswordBearer
from sqlalchemy.orm import Session as DbSession

from fleetvm.api.state import ApiState
from fleetvm.db.models import User
from fleetvm.errors import NotAuthenticated, PermissionDenied
from fleetvm.security import user_from_api_key, user_from_token
from fleetvm.services.vms import VmService

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/token", auto_error=False)
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def get_state(request: Request) -> ApiState:
    return request.app.state.fleetvm


def get_db(state: Annotated[ApiState, Depends(get_state)]) -> Iterator[DbSession]:
    with state.database.session() as db:
        yield db


def get_vm_service(state: Annotated[ApiState, Depends(get_state)]) -> VmService:
    return state.vm_service


def resolve_user(
    db: DbSession, state: ApiState, token: str | None, api_key: str | None
) -> User:
    if api_key:
        return user_from_api_key(db, api_key)
    if token:
        return user_from_token(db, token, state.secret_key)
    raise NotAuthenticated(
        "Not authenticated: send 'Authorization: Bearer <token>' (from POST /token) "
        "or 'X-API-Key: <key>'."
    )


# The session commits when the route function returns, before the response is
# sent. A client may send its next request, to any API node, as soon as it
# reads the response, and that request must see what this one wrote.
Db = Annotated[DbSession, Depends(get_db, scope="function")]


def get_current_user(
    db: Db,
    state: Annotated[ApiState, Depends(get_state)],
    token: Annotated[str | None, Depends(oauth2_scheme)],
    api_key: Annotated[str | None, Depends(api_key_header)],
) -> User:
    user = resolve_user(db, state, token, api_key)
    # Commit now: on SQLite an open write (last_used_at) would block the
    # service's own transactions for the rest of the request.
    db.commit()
    db.expunge(user)
    return user


def get_admin_user(user: Annotated[User, Depends(get_current_user)]) -> User:
    if not user.is_admin:
        raise PermissionDenied(
            f"User {user.username!r} is not an administrator, and only "
            "administrators may use this route."
        )
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]
AdminUser = Annotated[User, Depends(get_admin_user)]
Vms = Annotated[VmService, Depends(get_vm_service)]
State = Annotated[ApiState, Depends(get_state)]
