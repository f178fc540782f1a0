"""The egress enforcer in the real kernel: processes in sandboxed cgroups, loopback listeners.

Each test makes its own cgroups in the v2 hierarchy and pins its maps in its own bpffs folder, and
removes both. A probe (a child Python process started inside a cgroup) tries a list of
destinations and reports ``ok`` or the errno name: EPERM is the enforcer, ECONNREFUSED is the
kernel finding no listener after the enforcer let the attempt through.
"""

import itertools
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal

import pytest
from egress_harness import loaded_enforcer

from berth.operator.api import EgressRule
from berth.runtime.agent.dns import Answer, DnsError
from berth.runtime.agent.egress import (
    EgressEnforcer,
    EgressError,
    cgroup2_root,
    cgroup_id,
    find_pod_cgroup,
)
from berth.runtime.agent.egress_policy import GRACE_S, EgressPolicy

PROBE = r"""
import errno, json, socket, sys
results = []
for kind, host, port in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    sock.settimeout(2)
    try:
        if kind == "sendto":
            sock.sendto(b"x", (host, port))
        else:
            sock.connect((host, port))
        results.append("ok")
    except OSError as error:
        results.append(errno.errorcode[error.errno])
    finally:
        sock.close()
print(json.dumps(results))
"""
Protocol = Literal["TCP", "UDP"]
Attempt = tuple[str, str, int]  # ("tcp" | "udp" | "sendto", address, port)
_names = itertools.count()


def probe(cgroup: Path, attempts: list[Attempt]) -> list[str]:
    """What a process in ``cgroup`` gets for each attempt."""

    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PROBE, json.dumps(attempts)],
        preexec_fn=enter,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return list(json.loads(done.stdout))


@pytest.fixture(scope="module")
def enforcer() -> Iterator[EgressEnforcer]:
    with loaded_enforcer("berth-test", resolve=resolver, clock=lambda: clock[0]) as loaded:
        yield loaded


# Host names the tests allow, answered by the table instead of a DNS server; the clock is theirs.
answers: dict[str, list[Answer]] = {}
clock = [1000.0]


def resolver(name: str) -> list[Answer]:
    if name not in answers:
        raise DnsError(f"no such name in the test's table: {name}")
    return answers[name]


@pytest.fixture
def cgroups() -> Iterator[Path]:
    """A folder of this test's cgroups in the v2 hierarchy (removed deepest first)."""
    root = cgroup2_root() / f"berth-test-{os.getpid()}-{next(_names)}"
    root.mkdir()
    yield root
    for directory in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir():
            directory.rmdir()
    root.rmdir()


@pytest.fixture
def listeners() -> Iterator[tuple[int, int]]:
    """Two TCP listeners on 127.0.0.1 (and UDP sockets on the same ports): allowed, other."""
    socks = []
    ports = []
    for _ in range(2):
        tcp = socket.create_server(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", tcp.getsockname()[1]))
        socks += [tcp, udp]
        ports.append(tcp.getsockname()[1])
    yield ports[0], ports[1]
    for sock in socks:
        sock.close()


def only(cidr: str, port: int, protocols: tuple[Protocol, ...] = ("TCP", "UDP")) -> EgressPolicy:
    rule = EgressRule(cidrs=[cidr], ports=[port], protocols=list(protocols))
    return EgressPolicy(rules=(rule,))


def test_a_sandboxed_process_reaches_its_allowlist_and_nothing_else(
    enforcer: EgressEnforcer, cgroups: Path, listeners: tuple[int, int]
) -> None:
    allowed, other = listeners
    attachment = enforcer.attach(cgroups, only("127.0.0.1/32", allowed))
    try:
        got = probe(
            cgroups,
            [
                ("tcp", "127.0.0.1", allowed),
                ("tcp", "127.0.0.1", other),  # another port
                ("tcp", "127.0.0.2", allowed),  # another address
                ("tcp", "::1", allowed),  # IPv6 is not in the list
                ("tcp", "::ffff:127.0.0.1", allowed),  # IPv4-mapped: judged as 127.0.0.1
                ("tcp", "::ffff:127.0.0.1", other),
                ("udp", "127.0.0.2", allowed),  # connected UDP
                ("sendto", "127.0.0.1", allowed),  # UDP without connect
                ("sendto", "127.0.0.1", other),
                ("sendto", "::ffff:127.0.0.2", allowed),  # the kernel sends it the v4 way
            ],
        )
        assert got == [
            "ok",
            "EPERM",
            "EPERM",
            "EPERM",
            "ok",
            "EPERM",
            "EPERM",
            "ok",
            "EPERM",
            "EPERM",
        ]
        assert attachment.denials() == {"connect4": 3, "connect6": 2, "sendmsg4": 2, "sendmsg6": 0}
    finally:
        attachment.detach()


def test_ports_are_allowed_per_protocol(
    enforcer: EgressEnforcer, cgroups: Path, listeners: tuple[int, int]
) -> None:
    allowed, _ = listeners
    attachment = enforcer.attach(cgroups, only("127.0.0.0/8", allowed, ("TCP",)))
    try:
        got = probe(cgroups, [("tcp", "127.0.0.1", allowed), ("sendto", "127.0.0.1", allowed)])
        assert got == ["ok", "EPERM"]
    finally:
        attachment.detach()


def test_processes_in_cgroups_below_the_sandbox_are_held_and_siblings_are_not(
    enforcer: EgressEnforcer, cgroups: Path, listeners: tuple[int, int]
) -> None:
    """The pod is sandboxed; its containers (and exec'd processes) sit below it."""
    allowed, other = listeners
    pod, neighbour = cgroups / "pod", cgroups / "neighbour"
    container = pod / "container"
    container.mkdir(parents=True)
    neighbour.mkdir()
    attachment = enforcer.attach(pod, only("127.0.0.1/32", allowed))
    attempts: list[Attempt] = [("tcp", "127.0.0.1", allowed), ("tcp", "127.0.0.1", other)]
    try:
        assert probe(container, attempts) == ["ok", "EPERM"]
        assert probe(neighbour, [*attempts, ("tcp", "127.0.0.2", allowed)]) == [
            "ok",
            "ok",
            "ECONNREFUSED",  # let through: no listener there
        ]
        assert attachment.denials()["connect4"] == 1
    finally:
        attachment.detach()


def test_detaching_restores_access_and_removes_the_sandbox_entries(
    enforcer: EgressEnforcer, cgroups: Path, listeners: tuple[int, int]
) -> None:
    allowed, other = listeners
    attachment = enforcer.attach(cgroups, only("127.0.0.1/32", allowed))
    assert probe(cgroups, [("tcp", "127.0.0.1", other)]) == ["EPERM"]
    attachment.detach()
    assert probe(cgroups, [("tcp", "127.0.0.1", other), ("sendto", "127.0.0.2", other)]) == [
        "ok",
        "ok",
    ]
    assert all(not m.keys_of(cgroup_id(cgroups)) for m in enforcer.maps.values())
    assert not (enforcer.pin_dir / "links" / str(cgroup_id(cgroups))).exists()


def test_an_update_swaps_the_allowlist_and_leaves_no_stale_entries(
    enforcer: EgressEnforcer, cgroups: Path, listeners: tuple[int, int]
) -> None:
    allowed, other = listeners
    attachment = enforcer.attach(cgroups, only("127.0.0.1/32", allowed))
    try:
        attachment.update(only("127.0.0.0/8", other))
        assert probe(cgroups, [("tcp", "127.0.0.1", allowed), ("tcp", "127.0.0.1", other)]) == [
            "EPERM",
            "ok",
        ]
        assert len(enforcer.maps["allow4"].keys_of(attachment.cgroup_id)) == 1
        assert len(enforcer.maps["ports"].keys_of(attachment.cgroup_id)) == 2  # TCP and UDP
    finally:
        attachment.detach()


def test_host_names_are_allowed_at_their_addresses_for_their_ttl(
    enforcer: EgressEnforcer, cgroups: Path, listeners: tuple[int, int]
) -> None:
    allowed, _ = listeners
    name = f"api-{uuid.uuid4().hex[:8]}.example.test"
    answers[name] = [Answer(IPv4Address("127.0.0.1"), 30.0)]
    rule = EgressRule(hosts=[name, "*.wild.example.test"], ports=[allowed])
    attachment = enforcer.attach(cgroups, EgressPolicy(rules=(rule,)))
    try:
        assert attachment.unresolvable == ("*.wild.example.test",)
        assert probe(cgroups, [("tcp", "127.0.0.1", allowed)]) == ["ok"]
        # The name moves: the old address holds until its TTL and the grace are over.
        answers[name] = [Answer(IPv4Address("127.0.0.3"), 30.0)]
        clock[0] += 31
        assert attachment.refresh() == clock[0] + 30
        assert probe(cgroups, [("tcp", "127.0.0.1", allowed), ("tcp", "127.0.0.3", allowed)]) == [
            "ok",
            "ECONNREFUSED",
        ]
        clock[0] += GRACE_S
        attachment.refresh()
        assert probe(cgroups, [("tcp", "127.0.0.1", allowed)]) == ["EPERM"]
    finally:
        attachment.detach()


def test_pinned_links_keep_enforcing_after_the_agent_lets_go_and_a_new_one_adopts_them(
    enforcer: EgressEnforcer, cgroups: Path, listeners: tuple[int, int]
) -> None:
    allowed, other = listeners
    before = EgressEnforcer(pin_dir=enforcer.pin_dir, resolve=resolver)
    before.attach(cgroups, only("127.0.0.1/32", allowed))
    before.close()  # the agent exits: its process's handles go, the pins stay
    assert probe(cgroups, [("tcp", "127.0.0.1", other)]) == ["EPERM"]
    adopted = enforcer.attach(cgroups, only("127.0.0.1/32", allowed))
    assert adopted.denials()["connect4"] == 1  # the counters survived too
    adopted.detach()
    assert probe(cgroups, [("tcp", "127.0.0.1", other)]) == ["ok"]


def test_attach_pod_finds_the_pod_cgroup_runc_makes_in_the_v2_hierarchy(
    enforcer: EgressEnforcer, cgroups: Path, listeners: tuple[int, int]
) -> None:
    allowed, other = listeners
    pod_uid = str(uuid.uuid4())
    container = cgroups / "kubepods" / "burstable" / f"pod{pod_uid}" / "0123abcd"
    container.mkdir(parents=True)
    attachment = enforcer.attach_pod(pod_uid, only("127.0.0.1/32", allowed))
    try:
        assert attachment.cgroup_path == container.parent
        assert probe(container, [("tcp", "127.0.0.1", other)]) == ["EPERM"]
    finally:
        attachment.detach()


def test_a_pod_slice_of_the_systemd_driver_is_found_and_a_missing_pod_is_named(
    tmp_path: Path,
) -> None:
    pod_uid = str(uuid.uuid4())
    slice_name = f"kubepods-besteffort-pod{pod_uid.replace('-', '_')}.slice"
    pod = tmp_path / "kubepods.slice" / "kubepods-besteffort.slice" / slice_name
    pod.mkdir(parents=True)
    assert find_pod_cgroup(pod_uid, root=tmp_path) == pod
    with pytest.raises(EgressError, match="has no cgroup in the v2 hierarchy"):
        find_pod_cgroup(str(uuid.uuid4()), root=tmp_path)


def test_attaching_an_attached_cgroup_updates_it_and_prune_removes_what_no_one_attached(
    enforcer: EgressEnforcer, cgroups: Path, listeners: tuple[int, int]
) -> None:
    allowed, other = listeners
    kept, left = cgroups / "kept", cgroups / "left"
    kept.mkdir()
    left.mkdir()
    earlier = EgressEnforcer(pin_dir=enforcer.pin_dir, resolve=resolver)
    earlier.attach(left, only("127.0.0.1/32", allowed))  # an earlier agent's pod, now gone
    earlier.close()
    attachment = enforcer.attach(kept, only("127.0.0.1/32", allowed))
    try:
        assert enforcer.attach(kept, only("127.0.0.1/32", other)) is attachment
        assert probe(kept, [("tcp", "127.0.0.1", allowed), ("tcp", "127.0.0.1", other)]) == [
            "EPERM",
            "ok",
        ]
        assert enforcer.prune() == [cgroup_id(left)]
        assert probe(left, [("tcp", "127.0.0.1", other)]) == ["ok"]
        assert probe(kept, [("tcp", "127.0.0.1", allowed)]) == ["EPERM"]
        assert not enforcer.maps["allow4"].keys_of(cgroup_id(left))
    finally:
        attachment.detach()
    assert enforcer.attachments == {}


def test_an_ipv6_entry_lets_its_address_through_and_dns_goes_only_where_the_policy_says(
    enforcer: EgressEnforcer, cgroups: Path
) -> None:
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as server:
        port = server.getsockname()[1]
        rule = EgressRule(cidrs=["::1/128"], ports=[port])
        policy = EgressPolicy(rules=(rule,), dns_servers=(IPv4Address("127.0.0.1"),))
        attachment = enforcer.attach(cgroups, policy)
        try:
            got = probe(
                cgroups,
                [
                    ("tcp", "::1", port),
                    ("tcp", "127.0.0.1", port),  # the v4 loopback is another address
                    ("sendto", "127.0.0.1", 53),  # the resolver, over UDP
                    ("tcp", "127.0.0.1", 53),  # and TCP: let through, nothing listens
                    ("sendto", "127.0.0.2", 53),  # another resolver
                ],
            )
            assert got == ["ok", "EPERM", "ok", "ECONNREFUSED", "EPERM"]
            attachment.update(EgressPolicy(rules=(rule,)))
            assert probe(cgroups, [("sendto", "127.0.0.1", 53)]) == ["EPERM"]
        finally:
            attachment.detach()
