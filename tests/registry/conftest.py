from __future__ import annotations

import itertools

import pytest

from tests.etcd_server import EtcdServer, etcd_binary

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd():
    """One real etcd per module (tests that stop it use their own: `own_etcd`)."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    server = EtcdServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_etcd():
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    server = EtcdServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests sharing one etcd do not see each other."""
    return f"/meshgate-test-{next(_prefixes)}/"


