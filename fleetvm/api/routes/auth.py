"""Bearer tokens and the caller's own profile."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import OAuth2PasswordRequestForm

from fleetvm.api.deps import CurrentUser, Db, State
from fleetvm.api.schemas import Token, UserPublic
from fleetvm.security import authenticate_password, create_token

router = APIRouter()


@router.post("/token", response_model=Token, tags=["auth"])
def login_for_token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], db: Db, state: State
) -> Token:
    """Exchange a username and password for a bearer token (OAuth2 password flow)."""
    user = authenticate_password(db, form.username, form.password)
    token = create_token(user, state.secret_key, state.settings.auth.token_ttl_seconds)
    return Token(access_token=token)


@router.get("/v1/users/me", response_model=UserPublic, tags=["users"])
def read_current_user(user: CurrentUser) -> UserPublic:
    """Return the authenticated user's profile."""
    return UserPublic.model_validate(user, from_attributes=True)
