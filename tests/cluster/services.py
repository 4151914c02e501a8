"""The servers cluster tests run against: PostgreSQL, Redis and RabbitMQ on
127.0.0.1, as installed on the machine (see .ci/run).

A missing server skips the tests that need it, except with ``CI=true``, where
it fails them: CI must never pass by testing less.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
PORTS = {"PostgreSQL": 5432, "Redis": 6379, "RabbitMQ": 5672}


def require(service: str) -> None:
    """Skip, or under CI fail, unless ``service`` accepts connections."""
    try:
        with socket.create_connection(("127.0.0.1", PORTS[service]), timeout=2):
            return
    except OSError as exc:
        message = f"{service} is not running on 127.0.0.1:{PORTS[service]} ({exc})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true, so this fails instead of skipping")
    pytest.skip(message)


@contextmanager
def postgres_database() -> Iterator[str]:
    """Create an empty database for one test run and drop it afterwards."""
    require("PostgreSQL")
    with new_postgres_database("fleetvm_test") as url:
        yield url


@contextmanager
def new_postgres_database(prefix: str) -> Iterator[str]:
    """Create an empty database named prefix_<random> and drop it afterwards."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def broker_url(kind: str) -> str:
    if kind == "redis":
        require("Redis")
        return REDIS_URL
    require("RabbitMQ")
    return RABBITMQ_URL
