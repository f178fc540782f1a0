"""A sandbox that names host names, in a cluster with Cilium's CRD (Cilium's own, from its Go
module): the operator finds the CRD at start, renders the hosts as a ``CiliumNetworkPolicy``
with ``toFQDNs``, the API server accepts it under Cilium's real schema, and the service carries
no "hosts not enforced" condition. The CRD goes again when the module ends, so the other
modules' operators see a cluster without Cilium.
"""

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from berth.cluster.cluster import ClusterError, LocalCluster
from berth.e2e.cilium import CRD_NAME, cilium_network_policy_crd
from berth.e2e.operator_fixtures import (
    OperatorProcess,
    apply_docs,
    condition,
    get_json,
    service_manifest,
    wait_for,
)


@pytest.fixture(scope="module")
def cilium_crd(cluster: LocalCluster) -> Iterator[dict[str, Any]]:
    path = cilium_network_policy_crd()
    # Server-side: the CRD is larger than client-side apply's last-applied annotation may be.
    cluster.kubectl("apply", "--server-side", "-f", str(path))
    wait_for(
        "Cilium's CRD established",
        lambda: (
            condition(get_json(cluster, "crd", CRD_NAME), "Established").get("status") == "True"
        ),
    )
    try:
        yield yaml.safe_load(path.read_text())
    finally:
        cluster.kubectl("delete", "crd", CRD_NAME, "--wait=true", check=False)


@pytest.fixture(scope="module")
def cilium_operator(cilium_crd: dict[str, Any], operator: OperatorProcess) -> OperatorProcess:
    """The operator, started after the CRD (it looks for policy engines at start)."""
    return operator


def test_hosts_become_a_cilium_policy_that_cilium_s_schema_accepts(
    cluster: LocalCluster, cilium_operator: OperatorProcess, namespace: str
) -> None:
    sandbox = {
        "enabled": True,
        "egress": [
            {"hosts": ["api.example.com", "*.pypi.org"], "ports": [443]},
            {"hosts": ["ntp.example.com"], "protocols": ["UDP"]},
            {"cidrs": ["10.20.0.0/16"], "ports": [5432]},
        ],
    }
    apply_docs(cluster, [service_manifest("agent", namespace, 0.25, sandbox=sandbox)])

    def policy() -> dict[str, Any] | None:
        found = get_json(cluster, "ciliumnetworkpolicies", "-n", namespace)["items"]
        return found[0] if found else None

    created = wait_for("the CiliumNetworkPolicy", policy, timeout=60)
    assert created["metadata"]["name"] == "agent"
    assert created["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    rules = created["spec"]["egress"]
    fqdns = [f for rule in rules for f in rule.get("toFQDNs", [])]
    assert {"matchName": "api.example.com"} in fqdns and {"matchPattern": "*.pypi.org"} in fqdns
    ntp = next(r for r in rules if {"matchName": "ntp.example.com"} in r.get("toFQDNs", []))
    assert ntp["toPorts"] == [{"ports": [{"port": "0", "protocol": "UDP"}]}]
    # DNS through Cilium's proxy, which is how it learns the names' addresses.
    assert any("dns" in p.get("rules", {}) for r in rules for p in r.get("toPorts", []))
    # The CIDR rule stays in the NetworkPolicy; the hosts are held, so no condition says not.
    assert get_json(cluster, "networkpolicy", "agent", "-n", namespace)["spec"]["egress"]

    def settled() -> dict[str, Any] | None:
        service = get_json(cluster, "inferenceservice", "agent", "-n", namespace)
        return service if condition(service, "Ready") else None

    service = wait_for("the service's conditions", settled, timeout=60)
    assert not condition(service, "HostsNotInNetworkPolicy"), service["status"]["conditions"]

    # The schema is Cilium's and it is enforced: a protocol it does not know is refused by name.
    broken = copy.deepcopy(created)
    broken["metadata"] = {"name": "broken", "namespace": namespace}
    broken["spec"]["egress"][-1]["toPorts"][0]["ports"][0]["protocol"] = "XTP"
    with pytest.raises(ClusterError, match=r"toPorts\[0\]\.ports\[0\]\.protocol"):
        cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(broken))
