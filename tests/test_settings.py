"""Settings: sections from the environment and from a TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fleetvm.settings import Settings, queue_name


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETVM_API__PORT", "9123")
    monkeypatch.setenv("FLEETVM_MULTINODE__STRICT_KILL_OWNERSHIP", "false")

    settings = Settings()

    assert settings.api.port == 9123
    assert settings.api.host == "127.0.0.1"
    assert settings.multinode.strict_kill_ownership is False


def test_settings_from_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "fleetvm.toml"
    config.write_text("[api]\nport = 9200\n[kill]\nwait_seconds = 3.5\n")
    monkeypatch.setenv("FLEETVM_CONFIG", str(config))
    monkeypatch.setenv("FLEETVM_API__PORT", "9300")

    settings = Settings()

    assert settings.api.port == 9300
    assert settings.kill.wait_seconds == 3.5


def test_settings_embedded_defaults(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)

    assert settings.database_url == f"sqlite:///{tmp_path / 'fleetvm.sqlite3'}"
    assert settings.broker_url == f"redis+socket://{tmp_path / 'redis.sock'}"
    assert settings.result_url == settings.broker_url
    assert settings.worker_queue == "vm_queue_local"


def test_settings_amqp_results_default_rpc() -> None:
    settings = Settings(broker={"url": "amqp://guest:guest@127.0.0.1:5672//"})

    assert settings.result_url == "rpc://"


@pytest.mark.parametrize(
    "worker_id",
    [
        pytest.param("", id="empty"),
        pytest.param("a b", id="space"),
        pytest.param("../x", id="dot-dot"),
        pytest.param("w" * 65, id="too-long"),
    ],
)
def test_settings_invalid_worker_id(worker_id: str) -> None:
    with pytest.raises(ValidationError, match="invalid worker_id"):
        Settings(multinode={"worker_id": worker_id})


def test_queue_name_per_worker() -> None:
    assert queue_name("node-1") == "vm_queue_node-1"
