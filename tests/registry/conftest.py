from __future__ import annotations

import itertools

import pytest

from tests.etcd_server import EtcdServer, etcd_binary

_prefixes = itertools.count()


def _run_etcd():  # type: ignore[no-untyped-def]
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    server = EtcdServer()
    server.start()
    yield server
    server.close()


# One real etcd per module; tests that stop it take their own (`own_etcd`).
etcd = pytest.fixture(scope="module", name="etcd")(_run_etcd)
own_etcd = pytest.fixture(name="own_etcd")(_run_etcd)


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests sharing one etcd do not see each other."""
    return f"/meshgate-test-{next(_prefixes)}/"


