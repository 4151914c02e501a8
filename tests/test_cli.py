"""The `fleetvm users` and `fleetvm keys` commands, on a private data dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness import base_env, fleetvm_command, free_port


def fleetvm(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleetvm_command(*args),
        env=base_env(data_dir, 0),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_creates_user_and_key(tmp_path: Path) -> None:
    created = fleetvm(tmp_path, "users", "create", "erin", "--password", "long-pass-1")
    key = fleetvm(tmp_path, "keys", "create", "erin")

    assert created.returncode == 0
    assert "created user 'erin'" in created.stdout
    assert key.returncode == 0
    assert key.stdout.startswith("fvm_")
    assert key.stdout.strip() not in key.stderr


def test_cli_rejects_short_password(tmp_path: Path) -> None:
    result = fleetvm(tmp_path, "users", "create", "erin", "--password", "")

    assert result.returncode == 2
    assert "too short" in result.stderr


def test_cli_rejects_duplicate_user(tmp_path: Path) -> None:
    fleetvm(tmp_path, "users", "create", "erin", "--password", "long-pass-1")

    again = fleetvm(tmp_path, "users", "create", "erin", "--password", "long-pass-2")

    assert again.returncode == 2
    assert "already exists" in again.stderr


def test_cli_key_for_unknown_user(tmp_path: Path) -> None:
    result = fleetvm(tmp_path, "keys", "create", "ghost")

    assert result.returncode != 0
    assert "no user named 'ghost'" in result.stderr


def test_cli_invalid_worker_id(tmp_path: Path) -> None:
    result = fleetvm(tmp_path, "worker", "--worker-id", "bad id")

    assert result.returncode != 0
    assert "invalid worker_id" in result.stderr


def test_cli_empty_worker_id(tmp_path: Path) -> None:
    result = fleetvm(tmp_path, "worker", "--worker-id", "")

    assert result.returncode != 0
    assert "invalid worker_id ''" in result.stderr


def test_cli_worker_needs_id(tmp_path: Path) -> None:
    result = fleetvm(tmp_path, "worker")

    assert result.returncode != 0
    assert "needs the id of this node" in result.stderr


@pytest.mark.parametrize(
    "url, message",
    [
        pytest.param(
            "postgres://u@127.0.0.1/x", "use postgresql+psycopg://", id="old-scheme"
        ),
        pytest.param(
            f"postgresql+psycopg://u:secret@127.0.0.1:{free_port()}/x",
            "cannot use the database at postgresql+psycopg://u:***@",
            id="unreachable",
        ),
    ],
)
def test_cli_bad_database_url(tmp_path: Path, url: str, message: str) -> None:
    result = subprocess.run(
        fleetvm_command("workers"),
        env={**base_env(tmp_path, 0), "FLEETVM_DATABASE__URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "secret" not in result.stderr
