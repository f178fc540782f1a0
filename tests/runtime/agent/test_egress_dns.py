"""The enforcer's DNS stub: questions as RFC 1035 lays them out, answers read with their TTLs."""

import socket
import struct
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from berth.runtime.agent.dns import AAAA, A, DnsError, parse_answers, query, resolve


def name(text: str) -> bytes:
    return b"".join(bytes([len(part)]) + part.encode() for part in text.split(".")) + b"\x00"


def record(owner: bytes, rtype: int, ttl: int, data: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(data)) + data


def response(ident: int, question: bytes, records: list[bytes], rcode: int = 0) -> bytes:
    header = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, len(records), 0, 0)
    return header + question[12:] + b"".join(records)


def test_a_question_is_laid_out_as_rfc_1035_says() -> None:
    asked = query("api.example.com.", AAAA, 0xBEEF)
    assert asked[:12] == bytes.fromhex("beef 0100 0001 0000 0000 0000")
    assert asked[12:] == name("api.example.com") + b"\x00\x1c\x00\x01"
    with pytest.raises(DnsError, match="not a valid host name"):
        query("bad..name", A, 1)
    with pytest.raises(DnsError, match="not a valid host name"):
        query("bücher.example", A, 1)  # admission allows only ASCII labels


def test_answers_follow_compressed_cname_chains_and_keep_the_smallest_ttl() -> None:
    asked = query("api.example.com", A, 7)
    alias = name("edge.cdn.example")
    records = [
        record(b"\xc0\x0c", 5, 30, alias),  # api.example.com CNAME edge.cdn.example, TTL 30
        record(b"\xc0\x2d", A, 300, bytes([192, 0, 2, 7])),  # pointer to the alias in the CNAME
        record(b"\xc0\x2d", A, 20, bytes([192, 0, 2, 8])),
    ]
    message = response(7, asked, records)
    assert message[0x2D : 0x2D + len(alias)] == alias  # the pointer above points at the alias
    got = parse_answers(message, 7)
    assert [(a.address, a.ttl) for a in got] == [
        (IPv4Address("192.0.2.7"), 30.0),
        (IPv4Address("192.0.2.8"), 20.0),
    ]


def test_nxdomain_is_no_addresses_and_other_failures_are_errors() -> None:
    asked = query("gone.example.com", A, 9)
    assert parse_answers(response(9, asked, [], rcode=3), 9) == []
    with pytest.raises(DnsError, match="rcode 2"):
        parse_answers(response(9, asked, [], rcode=2), 9)
    with pytest.raises(DnsError, match="another question"):
        parse_answers(response(9, asked, []), 10)
    with pytest.raises(DnsError, match="malformed name"):
        parse_answers(response(9, asked, [b"\x3f" + b"x" * 3]), 9)


@pytest.fixture
def server() -> Iterator[tuple[IPv4Address, int]]:
    """A DNS server on loopback that answers one A and one AAAA record for any name."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            asked, peer = sock.recvfrom(512)
            qtype = struct.unpack_from("!H", asked, len(asked) - 4)[0]
            data = bytes([127, 0, 0, 9]) if qtype == A else IPv6Address("::9").packed
            ident = struct.unpack_from("!H", asked)[0]
            sock.sendto(response(ident, asked, [record(b"\xc0\x0c", qtype, 42, data)]), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield IPv4Address("127.0.0.1"), port
    thread.join(timeout=5)
    sock.close()


def test_resolve_asks_for_both_families(server: tuple[IPv4Address, int]) -> None:
    address, port = server
    got = resolve("svc.example.test", (address,), port=port)
    assert [(a.address, a.ttl) for a in got] == [
        (IPv4Address("127.0.0.9"), 42.0),
        (IPv6Address("::9"), 42.0),
    ]


def test_resolve_names_the_host_when_no_server_answers() -> None:
    with pytest.raises(DnsError, match=r"cannot resolve 'x\.example\.test'"):
        resolve("x.example.test", (), timeout_s=0.1)
