"""The session's real control plane, shared by every end-to-end test."""

import json
from collections.abc import Iterator

import pytest

from berth.cluster.cluster import LocalCluster


@pytest.fixture(scope="session")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[LocalCluster]:
    """etcd, kube-apiserver, controller-manager, scheduler and kwok on loopback, with the default
    inventory (4 nodes x 8 GPUs + 1 CPU node). Torn down at the end even when tests fail; the
    components also die with the pytest process if it is killed."""
    local = LocalCluster(state_dir=tmp_path_factory.mktemp("cluster"), attach=True)
    local.up(timeout=120)
    try:
        version = json.loads(local.kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"]
        nodes = local.kubectl("get", "nodes", "-o", "name").split()
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        assert capture is not None
        with capture.global_and_fixture_disabled():
            print(
                f"\ne2e: real kube-apiserver {version} at {local.server}, {len(nodes)} kwok nodes, "
                f"logs in {local.logs}"
            )
        yield local
    finally:
        local.down()
