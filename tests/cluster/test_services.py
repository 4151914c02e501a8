"""A missing server skips the cluster tests, and fails them under CI=true."""

from __future__ import annotations

import pytest

from tests.cluster import services
from tests.harness import free_port


@pytest.fixture
def closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(services.PORTS, "Redis", free_port())


def test_missing_server_skips(closed_port, monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.skip.Exception, match="Redis is not running"):
        services.require("Redis")


def test_missing_server_fails_under_ci(closed_port, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        services.require("Redis")
