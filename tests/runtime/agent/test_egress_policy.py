"""The allowlist as map entries: a reading of the entries the way egress.c reads them must allow
exactly what the policy's rules allow, for any overlap of CIDRs, ports and protocols."""

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from berth.operator.api import EgressRule
from berth.runtime.agent.egress_policy import (
    GRACE_S,
    MAX_TTL_S,
    MIN_TTL_S,
    PROTOCOLS,
    RETRY_S,
    Address,
    EgressPolicy,
    HostAddresses,
    MapEntries,
    allowlist,
    key_cgroup_id,
    map_entries,
    nameservers,
    prefix_key,
)

CGROUP = 0x1234_0000_ABCD  # above 32 bits, so both halves of the key matter
V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address


def kernel_allows(
    entries: MapEntries, cgroup: int, address: Address, protocol: int, port: int
) -> bool:
    """egress.c's decision: the longest prefix of this cgroup, then its port set."""
    if isinstance(address, V6) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    trie, name = (entries.allow4, "allow4") if address.version == 4 else (entries.allow6, "allow6")
    best: tuple[int, bytes] | None = None
    for key, value in trie.items():
        prefixlen = struct.unpack_from("=I", key)[0] - 64
        network = ipaddress.ip_network((key[12:], prefixlen))
        mine = key_cgroup_id(name, key) == cgroup and address in network
        if mine and (best is None or prefixlen > best[0]):
            best = (prefixlen, value)
    if best is None:
        return False
    port_set = struct.unpack("=I", best[1])[0]
    return any(
        struct.pack("=QIHBx", cgroup, port_set, wanted, protocol) in entries.ports
        for wanted in (port, 0)
    )


def policy_allows(policy: EgressPolicy, address: Address, protocol: int, port: int) -> bool:
    if isinstance(address, V6) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for rule in policy.rules:
        cidrs = rule.cidrs or ["0.0.0.0/0", "::/0"]
        protocol_ok = protocol in {PROTOCOLS[name] for name in rule.protocols}
        port_ok = not rule.ports or port in rule.ports
        if protocol_ok and port_ok and any(address in ipaddress.ip_network(c) for c in cidrs):
            return True
    return address in policy.dns_servers and port == 53


cidrs = st.builds(
    lambda a, b, prefixlen: str(ipaddress.ip_network(f"10.{a}.{b}.0/{prefixlen}", strict=False)),
    st.integers(0, 1),
    st.integers(0, 1),
    st.sampled_from([8, 16, 24, 32]),
)
rules = st.builds(
    EgressRule,
    cidrs=st.lists(cidrs, max_size=3),
    ports=st.lists(st.sampled_from([53, 80, 443]), max_size=2, unique=True),
    protocols=st.sampled_from([["TCP"], ["UDP"], ["TCP", "UDP"]]),
)
destinations = st.tuples(
    st.builds(lambda a, b, c: V4(f"10.{a}.{b}.{c}"), *[st.integers(0, 1)] * 3)
    | st.sampled_from([V6("::ffff:10.0.0.0"), V6("::ffff:10.1.0.1"), V6("fd00::1")]),
    st.sampled_from(list(PROTOCOLS.values())),
    st.sampled_from([53, 80, 443, 8080]),
)


@given(st.lists(rules, max_size=4), st.lists(destinations, min_size=1, max_size=8), st.booleans())
def test_the_kernels_reading_of_the_entries_allows_exactly_what_the_rules_allow(
    rule_list: list[EgressRule], tries: list[tuple[Address, int, int]], dns: bool
) -> None:
    policy = EgressPolicy(rules=tuple(rule_list), dns_servers=(V4("10.0.0.10"),) if dns else ())
    entries = map_entries(allowlist(policy, {}), CGROUP)
    for address, protocol, port in tries:
        expected = policy_allows(policy, address, protocol, port)
        assert kernel_allows(entries, CGROUP, address, protocol, port) == expected
        assert not kernel_allows(entries, CGROUP + 1, address, protocol, port)  # another pod


def test_a_narrower_prefix_inherits_the_ports_of_a_wider_one() -> None:
    wide = EgressRule(cidrs=["10.0.0.0/8"], ports=[443])
    narrow = EgressRule(cidrs=["10.1.0.0/16"], ports=[80], protocols=["UDP"])
    allowed = allowlist(EgressPolicy(rules=(wide, narrow)), {})
    assert allowed.prefixes[ipaddress.ip_network("10.1.0.0/16")] == {(6, 443), (17, 80)}


def test_a_rule_without_destinations_allows_its_ports_everywhere_and_dns_goes_to_its_servers() -> (
    None
):
    policy = EgressPolicy(rules=(EgressRule(ports=[443]),), dns_servers=(V4("10.96.0.10"),))
    prefixes = allowlist(policy, {}).prefixes
    assert prefixes[ipaddress.ip_network("0.0.0.0/0")] == {(6, 443)}
    assert prefixes[ipaddress.ip_network("::/0")] == {(6, 443)}
    assert prefixes[ipaddress.ip_network("10.96.0.10/32")] == {(6, 53), (17, 53), (6, 443)}


def test_host_addresses_land_in_their_family_and_wildcards_are_reported() -> None:
    rule = EgressRule(hosts=["api.example.com", "*.cdn.example.com"], ports=[443])
    resolved: dict[str, list[Address]] = {
        "api.example.com": [V6("::ffff:192.0.2.7"), V6("2001:db8::7")]
    }
    allowed = allowlist(EgressPolicy(rules=(rule,)), resolved)
    assert set(allowed.prefixes) == {
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::7/128"),
    }
    assert allowed.unresolvable == ("*.cdn.example.com",)


def test_prefix_keys_carry_the_cgroup_id_then_the_prefix() -> None:
    key = prefix_key(CGROUP, ipaddress.ip_network("10.1.0.0/16"))
    assert len(key) == 16
    assert struct.unpack_from("=I", key)[0] == 64 + 16
    assert key_cgroup_id("allow4", key) == CGROUP
    assert key[12:] == bytes([10, 1, 0, 0])
    assert len(prefix_key(CGROUP, ipaddress.ip_network("2001:db8::/32"))) == 28


def test_prefixes_with_the_same_grants_share_one_port_set() -> None:
    rule = EgressRule(cidrs=["10.0.0.0/24", "10.0.1.0/24"], ports=[443])
    entries = map_entries(allowlist(EgressPolicy(rules=(rule,)), {}), CGROUP)
    assert len(set(entries.allow4.values())) == 1
    assert len(entries.ports) == 1


def test_an_address_holds_for_its_ttl_and_a_grace_and_a_new_answer_does_not_cut_it_short() -> None:
    hosts = HostAddresses()
    name = "api.example.com"
    assert hosts.due([name], now=0.0) == [name]
    hosts.record(name, [(V4("192.0.2.1"), 60.0)], now=0.0)
    assert hosts.due([name], now=59.0) == [] and hosts.due([name], now=60.0) == [name]
    hosts.record(name, [(V4("192.0.2.2"), 60.0)], now=60.0)
    assert hosts.current(now=60.0 + GRACE_S - 1)[name] == {V4("192.0.2.1"), V4("192.0.2.2")}
    assert hosts.current(now=60.0 + GRACE_S)[name] == {V4("192.0.2.2")}


def test_ttls_are_clamped_failures_retry_and_dropped_names_are_forgotten() -> None:
    hosts = HostAddresses()
    hosts.record("a.example", [(V4("192.0.2.1"), 0.0)], now=0.0)
    hosts.record("b.example", [(V4("192.0.2.2"), 10**9)], now=0.0)
    assert hosts.next_lookup == {"a.example": MIN_TTL_S, "b.example": MAX_TTL_S}
    hosts.failed("b.example", now=100.0)
    assert hosts.next_due(["a.example", "b.example"]) == MIN_TTL_S
    assert hosts.next_lookup["b.example"] == 100.0 + RETRY_S
    assert hosts.current(now=100.0)["b.example"] == {V4("192.0.2.2")}  # still within its TTL
    hosts.forget(["a.example"])
    assert set(hosts.expires) == set(hosts.next_lookup) == {"a.example"}


def test_nameservers_are_read_from_resolv_conf() -> None:
    text = (
        "search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver x\n"
    )
    assert nameservers(text) == (V4("10.96.0.10"), V6("fe80::1"))
