from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.cluster.harness import Cluster
from tests.cluster.services import broker_url, postgres_database


@pytest.fixture(scope="module", params=["redis", "amqp"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three workers and two API nodes on PostgreSQL and the given broker."""
    url = broker_url(request.param)
    with postgres_database() as database_url:
        instance = Cluster(database_url, url)
        try:
            instance.start(apis=2)
            yield instance
        finally:
            instance.close()


@pytest.fixture(scope="module")
def keys(cluster: Cluster) -> dict[str, str]:
    return {
        "alice": cluster.create_user("alice"),
        "bob": cluster.create_user("bob"),
        "admin": cluster.create_user("root", admin=True),
    }


@pytest.fixture
def alice(cluster: Cluster, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with cluster.client(keys["alice"]) as client:
        yield client


@pytest.fixture
def bob(cluster: Cluster, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with cluster.client(keys["bob"], api=1) as client:
        yield client


@pytest.fixture
def admin(cluster: Cluster, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with cluster.client(keys["admin"]) as client:
        yield client


@pytest.fixture(scope="module", params=["redis", "amqp"])
def lenient_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Two workers with multinode.strict_kill_ownership off."""
    url = broker_url(request.param)
    with postgres_database() as database_url:
        instance = Cluster(
            database_url,
            url,
            workers=2,
            FLEETVM_MULTINODE__STRICT_KILL_OWNERSHIP="false",
        )
        try:
            instance.start()
            yield instance
        finally:
            instance.close()
