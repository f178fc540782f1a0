"""The session's real cluster, shared by every end-to-end test: a loopback control plane, kwok
GPU nodes and one real kubelet node that runs Berth's images."""

import json
import os
import re
from collections.abc import Iterator

import pytest

from berth.cluster.cluster import LocalCluster
from berth.cluster.realnode import HostSnapshot, leftovers, unavailable_reason

# The operator process and a namespace per test, for every e2e module.
from berth.e2e.operator_fixtures import namespace, operator  # noqa: F401

# The real node's models (hostPath folders) and a guard for tests that need the node.
from berth.e2e.real_node import needs_real_node, smollm2_model, tiny_model  # noqa: F401

# Listeners on the node's address that a sandboxed pod may or may not reach.
from berth.e2e.sandbox_fixtures import node_listeners  # noqa: F401


def _comparable(snapshot: HostSnapshot) -> dict[str, object]:
    """The host state that teardown must put back; iptables packet counters move on their own."""
    counters = re.compile(r"\[\d+:\d+\]")

    def rules(saved: str) -> list[str]:  # without the dated comment lines
        return [counters.sub("", line) for line in saved.splitlines() if not line.startswith("#")]

    return {
        "sysctls": snapshot.sysctls,
        "iptables": rules(snapshot.iptables),
        "ip6tables": rules(snapshot.ip6tables),
        "missing_paths": snapshot.missing_paths,
    }


@pytest.fixture(scope="session")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[LocalCluster]:
    """etcd, kube-apiserver, controller-manager, scheduler and kwok on loopback, with the default
    inventory (4 nodes x 8 GPUs + 1 CPU node), plus the real node. Torn down at the end even when
    tests fail (and checked to leave nothing behind); the components also die with the pytest
    process if it is killed."""
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    assert capture is not None

    def say(message: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"\ne2e: {message}", flush=True)

    # `make test` (and so CI) requires the real node; a developer's pytest run beside another
    # cluster that holds it runs the kwok tests and skips the real-node ones, saying why.
    required = os.environ.get("BERTH_E2E_REAL_NODE", "auto") == "required"
    reason = unavailable_reason()
    if reason and required:
        pytest.fail(f"BERTH_E2E_REAL_NODE=required but {reason}")
    if reason:
        say(f"no real node in this run: {reason}; its tests will skip")
    before = HostSnapshot.take()
    local = LocalCluster(
        state_dir=tmp_path_factory.mktemp("cluster"), attach=True, real_node=reason is None, say=say
    )
    local.up(timeout=180)
    node = None
    try:
        version = json.loads(local.kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"]
        nodes = local.kubectl("get", "nodes", "-o", "name").split()
        say(f"real kube-apiserver {version} at {local.server}, {len(nodes)} nodes "
            f"(one real), logs in {local.logs}")  # fmt: skip
        yield local
    finally:
        node = local.node
        local.down()
    if node is not None:
        left = leftovers(node)
        assert not left, f"cluster down left {left} on the host"
        after = _comparable(HostSnapshot.take())
        assert after == _comparable(before), "cluster down did not restore the host's settings"
