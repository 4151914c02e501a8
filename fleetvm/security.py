"""Credentials: password hashes, API keys and signed bearer tokens."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetvm.db.models import ApiKey, User, utcnow
from fleetvm.errors import AlreadyExists, InvalidRequest, NotAuthenticated
from fleetvm.settings import Settings

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "fvm_"
# last_used_at is refreshed at most this often, so most requests write nothing.
LAST_USED_RESOLUTION = timedelta(minutes=1)
_password_hasher = PasswordHasher()
# Verifying against this keeps the time of a login for an unknown user close to
# the time for a known one.
_DUMMY_HASH = _password_hasher.hash("fleetvm-dummy-password")


def hash_password(password: str) -> str:
    return _password_hasher.hash(password)


def verify_password(password: str, password_hash: str | None) -> bool:
    try:
        matches = _password_hasher.verify(password_hash or _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return False
    return matches and password_hash is not None


def hash_api_key(key: str) -> str:
    # API keys carry 256 random bits, so a fast hash is enough: no one can
    # brute-force the key from its digest, and every request can check one.
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def load_secret_key(settings: Settings) -> str:
    """Return the token signing key, creating ``<data dir>/secret-key`` once."""
    if settings.auth.secret_key:
        return settings.auth.secret_key
    path = settings.resolved_data_dir / "secret-key"
    if not path.exists():
        write_private_file(path, secrets.token_urlsafe(48))
    return path.read_text().strip()


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to a new file readable only by this user (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text + "\n")


def create_token(user: User, secret_key: str, ttl_seconds: int) -> str:
    expires = datetime.now(UTC) + timedelta(seconds=ttl_seconds)
    claims = {"sub": str(user.id), "name": user.username, "exp": expires}
    return jwt.encode(claims, secret_key, algorithm="HS256")


#: Largest id a database integer primary key holds.
MAX_ROW_ID = 2**31 - 1


def user_from_token(db: Session, token: str, secret_key: str) -> User:
    try:
        claims = jwt.decode(token, secret_key, algorithms=["HS256"])
        user_id = int(claims["sub"])
        if not 1 <= user_id <= MAX_ROW_ID:
            raise ValueError(f"user id {user_id} out of range")
    except (jwt.PyJWTError, KeyError, ValueError, TypeError) as exc:
        raise NotAuthenticated(
            "Invalid or expired bearer token: request a new one from POST /token."
        ) from exc
    user = db.get(User, user_id)
    if user is None:
        raise NotAuthenticated("The bearer token's user no longer exists.")
    return user


def user_from_api_key(db: Session, key: str) -> User:
    row = db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if row is None or row.revoked_at is not None:
        raise NotAuthenticated("Invalid or revoked API key.")
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now
    user = db.get(User, row.user_id)
    if user is None:
        raise NotAuthenticated("The API key's user no longer exists.")
    return user


def authenticate_password(db: Session, username: str, password: str) -> User:
    # A name no account can have is not looked up: PostgreSQL rejects some of
    # them, such as one with a NUL character, and the response is 401 anyway.
    user = None
    if is_valid_username(username):
        user = db.scalar(select(User).where(User.username == username))
    password_hash = user.password_hash if user is not None else None
    if not verify_password(password, password_hash) or user is None:
        raise NotAuthenticated("Incorrect username or password.")
    return user


def is_valid_username(username: str) -> bool:
    return 1 <= len(username) <= 64 and all(c.isalnum() or c in "-_." for c in username)


def validate_username(username: str) -> None:
    if not is_valid_username(username):
        raise InvalidRequest(
            f"Invalid username {username!r}: use 1 to 64 letters, digits, '-', '_'"
            " or '.'."
        )


MIN_PASSWORD_CHARS = 8


def create_user(
    db: Session, username: str, password: str | None, is_admin: bool = False
) -> User:
    """Store a new user; ``password`` None makes an account usable by API key only."""
    validate_username(username)
    if password is not None and len(password) < MIN_PASSWORD_CHARS:
        raise InvalidRequest(
            f"Password for {username!r} is too short: use at least "
            f"{MIN_PASSWORD_CHARS} characters."
        )
    if db.scalar(select(User).where(User.username == username)) is not None:
        raise AlreadyExists(f"User {username!r} already exists.")
    user = User(
        username=username,
        password_hash=hash_password(password) if password else None,
        is_admin=is_admin,
    )
    db.add(user)
    db.flush()
    return user


def create_api_key(db: Session, user: User, name: str) -> tuple[ApiKey, str]:
    """Store a new key for ``user`` and return its row and the key itself.

    Only the key's hash is stored, so the caller must show the key now.
    """
    key = new_api_key()
    row = ApiKey(
        user_id=user.id,
        name=name,
        key_hash=hash_api_key(key),
        prefix=key[: len(API_KEY_PREFIX) + 6],
    )
    db.add(row)
    db.flush()
    return row, key
