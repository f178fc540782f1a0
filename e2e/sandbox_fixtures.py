"""What the sandbox tests share: a sandboxed service on the real node, listeners on the node's
address for it to reach or be refused, and the probe its container runs."""

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.cluster.pki import NODE_IP
from berth.e2e.real_node import real_service

PYTHON = "/usr/bin/python3.11"  # the runtime image's interpreter
# Run in the container with (address, port) pairs: what each connection attempt met.
CONNECT = """
import errno, json, socket, sys

def attempt(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error))
    return "ok"

print(" ".join(attempt(host, port) for host, port in json.loads(sys.argv[1])))
"""


@pytest.fixture
def node_listeners() -> Iterator[tuple[int, int]]:
    """Two TCP listeners on the node's address, which pods reach over the bridge: the port the
    sandbox allows, and another."""
    socks = [socket.create_server((NODE_IP, 0)) for _ in range(2)]
    try:
        yield socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for sock in socks:
            sock.close()


def sealed_service(
    name: str, namespace: str, model: Path, port: int = 9, **sandbox: Any
) -> dict[str, Any]:
    service = real_service(name, namespace, model)
    service["spec"]["sandbox"] = {
        "enabled": True,
        "egress": [{"cidrs": [f"{NODE_IP}/32"], "ports": [port]}],
        "ingress": [{"namespaceLabels": {"kubernetes.io/metadata.name": namespace}}],
        "deniedSyscalls": ["mknod", "mknodat"],
        "maxRequestSeconds": 60,
        **sandbox,
    }
    return service
