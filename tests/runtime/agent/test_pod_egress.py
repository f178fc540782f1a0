"""The node agent holds sandboxed pods' egress to the rules their annotation carries, with the real
eBPF enforcer in the real kernel: attached once the pod's cgroup exists, updated when the rules
change, detached when the pod goes; denials reported as events and exported as a metric.

The "pod" is a cgroup ``pod<uid>`` this test makes in the v2 hierarchy (where runc puts a pod's
containers, ``egress.py``) and a child process in it; maps are pinned in the test's own folder.
"""

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from egress_harness import loaded_enforcer

from berth import wire
from berth.runtime.agent.egress import EgressEnforcer, cgroup2_root
from berth.runtime.agent.pod_egress import ATTACH_RETRY_S, DENIALS, EgressCollector, PodEgress

CONNECT = r"""
import errno, json, socket, sys
results = []
for port in json.loads(sys.argv[1]):
    sock = socket.socket()
    sock.settimeout(2)
    try:
        sock.connect(("127.0.0.1", port))
        results.append("ok")
    except OSError as error:
        results.append(errno.errorcode[error.errno])
    finally:
        sock.close()
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def enforcer() -> Iterator[EgressEnforcer]:
    with loaded_enforcer("berth-test-pods", resolve=lambda name: []) as loaded:
        yield loaded


@pytest.fixture
def listeners() -> Iterator[tuple[int, int]]:
    """Two TCP listeners on 127.0.0.1: the one the rules allow, and another."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        yield socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def uid() -> Iterator[str]:
    """A pod uid; its cgroup is made by the test and removed here."""
    pod_uid = str(uuid.uuid4())
    parent = cgroup2_root() / f"berth-test-pods-{os.getpid()}"
    yield pod_uid
    for directory in sorted(parent.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir():
            directory.rmdir()
    if parent.exists():
        parent.rmdir()


def pod_cgroup(uid: str) -> Path:
    path = cgroup2_root() / f"berth-test-pods-{os.getpid()}" / "kubepods" / f"pod{uid}"
    path.mkdir(parents=True)
    return path


def pod(uid: str, ports: list[int] | None) -> dict[str, Any]:
    annotations = {}
    if ports is not None:
        rules = [{"cidrs": ["127.0.0.1/32"], "ports": ports}]
        annotations[wire.POD_EGRESS_POLICY] = json.dumps(rules)
    meta = {"name": "agent-0", "namespace": "team", "uid": uid, "annotations": annotations}
    return {"metadata": meta}


def connect(cgroup: Path, ports: list[int]) -> list[str]:
    """What a process of the pod meets connecting to each port (ECONNREFUSED: let through)."""

    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    done = subprocess.run([sys.executable, "-I", "-S", "-c", CONNECT, json.dumps(ports)],
                          preexec_fn=enter, capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return list(json.loads(done.stdout))


def test_a_sandboxed_pod_is_held_to_its_rules_from_when_its_cgroup_exists_until_it_goes(
    enforcer: EgressEnforcer, listeners: tuple[int, int], uid: str
) -> None:
    allowed, other = listeners
    reports: list[tuple[str, str, str]] = []
    clock = [100.0]
    pods = PodEgress(enforcer, report=lambda *event: reports.append(event), clock=lambda: clock[0])
    pods.pod_seen(pod(uid, [allowed]))  # bound, not started: no cgroup yet
    assert pods.denials() == {}
    cgroup = pod_cgroup(uid)
    pods.tick()
    assert pods.denials() == {}  # not tried again before its retry is due
    clock[0] += ATTACH_RETRY_S
    pods.tick()
    assert connect(cgroup, [allowed, other]) == ["ok", "EPERM"]

    pods.tick()
    ((tenant, reason, message),) = reports
    assert (tenant, reason) == ("team/agent-0", "EgressDenied") and "1 connection" in message
    (family,) = EgressCollector(pods).collect()
    samples = {s.labels["hook"]: s.value for s in family.samples if s.name == DENIALS}
    assert samples["connect4"] == 1 and family.samples[0].labels["pod"] == "team/agent-0"

    pods.pod_seen(pod(uid, [allowed, other]))  # new rules: rewritten in place
    assert connect(cgroup, [allowed, other]) == ["ok", "ok"]
    pods.tick()
    assert len(reports) == 1  # nothing new refused, nothing reported

    pods.pod_gone(pod(uid, [allowed]))
    assert not pods.sandboxes and connect(cgroup, [other]) == ["ok"]


def test_a_pod_without_egress_rules_is_left_alone(
    enforcer: EgressEnforcer, listeners: tuple[int, int], uid: str
) -> None:
    cgroup = pod_cgroup(uid)
    pods = PodEgress(enforcer)
    pods.pod_seen(pod(uid, None))
    assert not pods.sandboxes and connect(cgroup, list(listeners)) == ["ok", "ok"]
