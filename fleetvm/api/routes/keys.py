"""The caller's own API keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import select

from fleetvm.api.deps import CurrentUser, Db
from fleetvm.api.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic
from fleetvm.db.models import ApiKey, User, utcnow
from fleetvm.errors import ApiKeyNotFound
from fleetvm.security import create_api_key

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])


def _public(row: ApiKey) -> dict:
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "revoked": row.revoked_at is not None,
    }


@router.post("/", response_model=ApiKeyCreated, status_code=201)
def create_key(body: ApiKeyCreate, user: CurrentUser, db: Db) -> ApiKeyCreated:
    """Create an API key for the caller; the key is in this response only."""
    owner = db.get(User, user.id)
    row, key = create_api_key(db, owner or user, body.name)
    return ApiKeyCreated(**_public(row), key=key)


@router.get("/", response_model=list[ApiKeyPublic])
def list_keys(user: CurrentUser, db: Db) -> list[ApiKeyPublic]:
    """List the caller's API keys, without the keys themselves."""
    rows = db.scalars(
        select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.id)
    )
    return [ApiKeyPublic(**_public(row)) for row in rows]


@router.delete("/{key_id}", response_model=ApiKeyPublic)
def revoke_key(
    key_id: Annotated[int, Path(ge=1, le=2**31 - 1)], user: CurrentUser, db: Db
) -> ApiKeyPublic:
    """Revoke one of the caller's API keys; it stops working at once."""
    row = db.get(ApiKey, key_id)
    if row is None or row.user_id != user.id:
        raise ApiKeyNotFound(f"API key {key_id} not found among your keys.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return ApiKeyPublic(**_public(row))
