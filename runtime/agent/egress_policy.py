"""A sandbox's egress allowlist as the eBPF enforcer's map entries (``policies/ebpf/egress.h``).

Pure: :func:`allowlist` turns ``spec.sandbox.egress`` rules, the addresses its host names resolved
to and the DNS servers into prefixes with the ports each allows; :func:`map_entries` lays them out
as the bytes of the BPF maps' keys and values for one cgroup id. :class:`HostAddresses` keeps
resolved addresses for their DNS TTL, since a plain NetworkPolicy cannot express host names and
the enforcer is the only layer that can on a cluster without Cilium.

Invariants the kernel side relies on:
- The LPM trie answers with the longest matching prefix only, so a prefix also allows every
  (protocol, port) that a shorter prefix covering it allows (inherited here, not looked up there).
- IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are IPv4 entries: the v6 hooks judge them by
  the v4 trie, so a resolver's mapped answer must land there.
- A rule with neither CIDRs nor hosts allows its ports to every destination, as an egress rule
  without ``to`` does in a NetworkPolicy. A wildcard host (``*.example.com``) cannot be resolved
  ahead of time: it allows nothing here and is reported in :attr:`Allowlist.unresolvable`.
"""

import ipaddress
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from berth.operator.api import EgressRule

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# What a prefix allows: (IP protocol number, port) pairs; port ANY_PORT means every port.
Grants = frozenset[tuple[int, int]]

PROTOCOLS = {"TCP": 6, "UDP": 17}  # IPPROTO_TCP, IPPROTO_UDP
ANY_PORT = 0
DNS_PORT = 53
HOOKS = ("connect4", "connect6", "sendmsg4", "sendmsg6")  # enum berth_hook's order
# A resolved address stays allowed for its TTL, clamped to this range (seconds), plus a grace
# for connections the pod starts from an answer its own resolver cached a little longer.
MIN_TTL_S = 5.0
MAX_TTL_S = 3600.0
GRACE_S = 30.0
RETRY_S = 10.0  # a failed lookup is retried after this long; its old addresses keep their TTL


class EgressPolicy(BaseModel):
    """What one sandboxed pod may reach: the node agent's input (from ``spec.sandbox``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[EgressRule, ...] = ()
    dns_servers: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = Field(
        default=(),
        description="Resolvers the pod may query on port 53 (TCP and UDP): the cluster DNS, "
        "or a loopback resolver; empty means no DNS.",
    )

    def hosts(self) -> frozenset[str]:
        return frozenset(host for rule in self.rules for host in rule.hosts)


@dataclass(frozen=True)
class Allowlist:
    prefixes: Mapping[Network, Grants]
    unresolvable: tuple[str, ...] = ()


@dataclass(frozen=True)
class MapEntries:
    """Keys and values, as bytes, of the maps ``allow4``, ``allow6`` and ``ports``."""

    allow4: Mapping[bytes, bytes]
    allow6: Mapping[bytes, bytes]
    ports: Mapping[bytes, bytes]


def _as_v4(network: Network) -> Network:
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _grants(rule: EgressRule) -> Grants:
    ports = rule.ports or [ANY_PORT]
    return frozenset((PROTOCOLS[protocol], port) for protocol in rule.protocols for port in ports)


def allowlist(policy: EgressPolicy, resolved: Mapping[str, Iterable[Address]]) -> Allowlist:
    """The prefixes ``policy`` allows, given the current addresses of its host names."""
    wanted: list[tuple[Network, Grants]] = []
    for rule in policy.rules:
        ports = _grants(rule)
        if not rule.cidrs and not rule.hosts:
            wanted += [
                (ipaddress.ip_network("0.0.0.0/0"), ports),
                (ipaddress.ip_network("::/0"), ports),
            ]
        wanted += [(ipaddress.ip_network(cidr), ports) for cidr in rule.cidrs]
        for host in rule.hosts:
            wanted += [(ipaddress.ip_network(address), ports) for address in resolved.get(host, ())]
    dns = frozenset((protocol, DNS_PORT) for protocol in PROTOCOLS.values())
    wanted += [(ipaddress.ip_network(server), dns) for server in policy.dns_servers]

    merged: dict[Network, Grants] = {}
    for network, ports in wanted:
        network = _as_v4(network)
        merged[network] = merged.get(network, frozenset()) | ports
    inherited: dict[Network, Grants] = {}
    for network, ports in merged.items():
        for prefixlen in range(network.prefixlen):
            wider = network.supernet(new_prefix=prefixlen)
            if wider in merged:
                ports = ports | merged[wider]
        inherited[network] = ports
    unresolvable = sorted(host for host in policy.hosts() if host.startswith("*."))
    return Allowlist(inherited, tuple(unresolvable))


def _cgroup_words(cgroup_id: int) -> tuple[int, int]:
    return cgroup_id & 0xFFFFFFFF, cgroup_id >> 32


def sandbox_key(cgroup_id: int) -> bytes:
    return struct.pack("=Q", cgroup_id)


def prefix_key(cgroup_id: int, network: Network) -> bytes:
    """``struct allow4_key`` / ``allow6_key``: the id's 64 bits then the CIDR's prefix."""
    low, high = _cgroup_words(cgroup_id)
    return struct.pack("=III", 64 + network.prefixlen, low, high) + network.network_address.packed


def key_cgroup_id(map_name: str, key: bytes) -> int:
    """The cgroup id in a key of ``sandboxes``, ``ports`` (first) or ``allow4/6`` (after the
    prefix length)."""
    if map_name in ("allow4", "allow6"):
        low, high = struct.unpack_from("=II", key, 4)
        return int(low | high << 32)
    return int(struct.unpack_from("=Q", key, 0)[0])


def map_entries(allowed: Allowlist, cgroup_id: int) -> MapEntries:
    """The map contents of one sandbox; prefixes with the same grants share a port set,
    numbered in a stable order."""
    number = {
        grants: index
        for index, grants in enumerate(sorted(set(allowed.prefixes.values()), key=sorted))
    }
    allow4: dict[bytes, bytes] = {}
    allow6: dict[bytes, bytes] = {}
    for network, grants in allowed.prefixes.items():
        target = allow4 if network.version == 4 else allow6
        target[prefix_key(cgroup_id, network)] = struct.pack("=I", number[grants])
    ports = {
        struct.pack("=QIHBx", cgroup_id, index, port, protocol): b"\x01"
        for grants, index in number.items()
        for protocol, port in grants
    }
    return MapEntries(allow4, allow6, ports)


def denial_counts(value: bytes) -> dict[str, int]:
    """``struct sandbox`` as counts per hook."""
    return dict(zip(HOOKS, struct.unpack("=4Q", value), strict=True))


def nameservers(resolv_conf: str) -> tuple[Address, ...]:
    """The ``nameserver`` addresses of a resolv.conf (scoped IPv6 ones lose their zone)."""
    found: list[Address] = []
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(ipaddress.ip_address(words[1].split("%")[0]))
            except ValueError:
                continue
    return tuple(found)


@dataclass
class HostAddresses:
    """Each allowed host name's addresses, each kept until its TTL (plus a grace) runs out.

    A fresh answer extends the addresses it names and never drops the others early: the pod's
    resolver may still hold an older answer (round-robin DNS, CDNs), and it may use it for as
    long as that answer's TTL.
    """

    expires: dict[str, dict[Address, float]] = field(default_factory=dict)
    next_lookup: dict[str, float] = field(default_factory=dict)

    def record(self, name: str, answers: Sequence[tuple[Address, float]], now: float) -> None:
        known = self.expires.setdefault(name, {})
        soonest = math.inf
        for address, ttl in answers:
            ttl = min(max(ttl, MIN_TTL_S), MAX_TTL_S)
            known[address] = max(known.get(address, 0.0), now + ttl + GRACE_S)
            soonest = min(soonest, ttl)
        self.next_lookup[name] = now + (soonest if answers else RETRY_S)

    def failed(self, name: str, now: float) -> None:
        self.next_lookup[name] = now + RETRY_S

    def due(self, names: Iterable[str], now: float) -> list[str]:
        """The names to look up now: never looked up, or their soonest TTL has passed."""
        return sorted(name for name in names if self.next_lookup.get(name, -math.inf) <= now)

    def current(self, now: float) -> dict[str, frozenset[Address]]:
        return {
            name: frozenset(address for address, until in known.items() if until > now)
            for name, known in self.expires.items()
        }

    def next_due(self, names: Iterable[str]) -> float:
        return min((self.next_lookup.get(name, -math.inf) for name in names), default=math.inf)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop names the policy no longer allows."""
        kept = set(keep)
        for table in (self.expires, self.next_lookup):
            for name in [name for name in table if name not in kept]:
                del table[name]
