"""The session's real control plane, shared by every end-to-end test."""

from collections.abc import Iterator

import pytest

from berth.e2e.cluster import LocalCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """etcd, kube-apiserver, controller-manager, scheduler and kwok on loopback, with the default
    inventory (4 nodes x 8 GPUs + 1 CPU node). Torn down at the end even when tests fail; the
    components also die with the pytest process if it is killed."""
    local = LocalCluster(state_dir=tmp_path_factory.mktemp("cluster"), attach=True)
    local.up(timeout=120)
    try:
        yield local
    finally:
        local.down()
