"""A minimal DNS stub resolver that keeps the TTLs (``getaddrinfo`` drops them).

The egress enforcer allows a host name's addresses for as long as DNS says they hold, so it needs
each record's TTL. Only A and AAAA questions over UDP are asked (the names come from a sandbox's
allowlist, never from the pod); :func:`query` and :func:`parse_answers` are pure, :func:`resolve`
sends them to the resolvers in ``/etc/resolv.conf``. A truncated answer is used as far as it goes.
"""

import ipaddress
import math
import secrets
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

A, CNAME, AAAA = 1, 5, 28
DNS_PORT = 53
CLASS_IN = 1
NXDOMAIN = 3
MAX_POINTERS = 32  # compression pointers followed in one name before it counts as a loop


class DnsError(RuntimeError):
    pass


@dataclass(frozen=True)
class Answer:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ttl: float  # seconds


def query(name: str, qtype: int, ident: int) -> bytes:
    """A recursion-desired question for ``name`` (an absolute name, no search domains)."""
    labels = name.rstrip(".").encode("ascii", errors="replace").split(b".")
    if any(not 0 < len(label) < 64 or b"?" in label for label in labels):
        raise DnsError(f"{name!r} is not a valid host name")
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def _skip_name(message: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) name at ``offset``."""
    for _ in range(MAX_POINTERS):
        if offset >= len(message):
            break
        length = message[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length
    raise DnsError("malformed name in DNS answer")


def parse_answers(message: bytes, ident: int) -> list[Answer]:
    """The A and AAAA records of a response to question ``ident``; [] for NXDOMAIN.

    CNAME chains are followed by the resolver: every address record in the answer section is
    for the asked name or an alias of it. An address holds no longer than the chain's CNAMEs.
    """
    if len(message) < 12:
        raise DnsError("short DNS answer")
    got, flags, questions, count = struct.unpack_from("!HHHH", message, 0)
    if got != ident or not flags & 0x8000:
        raise DnsError("DNS answer to another question")
    rcode = flags & 0x000F
    if rcode == NXDOMAIN:
        return []
    if rcode != 0:
        raise DnsError(f"DNS server answered rcode {rcode}")
    offset = 12
    for _ in range(questions):
        offset = _skip_name(message, offset) + 4
    addresses: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    chain = math.inf  # the smallest CNAME TTL seen
    for _ in range(count):
        offset = _skip_name(message, offset)
        if offset + 10 > len(message):
            raise DnsError("truncated DNS record")
        rtype, rclass, ttl, length = struct.unpack_from("!HHIH", message, offset)
        data = message[offset + 10 : offset + 10 + length]
        offset += 10 + length
        if len(data) != length or rclass != CLASS_IN:
            continue
        if rtype == CNAME:
            chain = min(chain, ttl)
        elif rtype == A and length == 4:
            addresses.append((ipaddress.IPv4Address(data), ttl))
        elif rtype == AAAA and length == 16:
            addresses.append((ipaddress.IPv6Address(data), ttl))
    return [Answer(address, float(min(ttl, chain))) for address, ttl in addresses]


def resolve(
    name: str,
    servers: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    timeout_s: float = 2.0,
    port: int = DNS_PORT,
) -> list[Answer]:
    """``name``'s A and AAAA records from the first of ``servers`` that answers both."""
    last: Exception = DnsError("no DNS servers configured")
    for server in servers:
        family = socket.AF_INET if server.version == 4 else socket.AF_INET6
        try:
            answers: list[Answer] = []
            for qtype in (A, AAAA):
                ident = secrets.randbits(16)
                with socket.socket(family, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(timeout_s)
                    sock.connect((str(server), port))
                    sock.send(query(name, qtype, ident))
                    answers += parse_answers(sock.recv(65535), ident)
            return answers
        except (OSError, DnsError) as error:
            last = error
    raise DnsError(f"cannot resolve {name!r}: {last}")
