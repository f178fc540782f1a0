"""The runtime's client of the node agent: protocol v1 (``berth.agent_protocol``) over its socket.

HTTP/1.1 over a unix socket with the standard library's ``http.client`` (one short connection
per call: a call every heartbeat interval needs no pool), bodies validated with the protocol's
pydantic models. Torch-free. Every failure is an ``AgentError``: ``status`` None means the agent
could not be reached (no socket, refused, timed out), otherwise it carries the agent's error
code (``unknown_tenant``, ``request_does_not_fit``, ...).
"""

from __future__ import annotations

import http.client
import socket
from typing import TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from berth import agent_protocol as proto

M = TypeVar("M", bound=BaseModel)


class AgentError(Exception):
    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def unreachable(self) -> bool:
        return self.status is None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    """Typed calls to one node agent."""

    def __init__(self, socket_path: str, timeout_s: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def _call(
        self,
        method: str,
        path: str,
        body: BaseModel | None,
        reply: type[M] | None,
        timeout_s: float | None = None,
    ) -> M | None:
        conn = _UnixConnection(self.socket_path, timeout_s or self.timeout_s)
        try:
            payload = body.model_dump_json().encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise AgentError(f"node agent at {self.socket_path} unreachable: {e}") from e
        finally:
            conn.close()
        if response.status >= 400:
            code, message = None, data.decode(errors="replace")[:500]
            try:
                error = proto.ErrorResponse.model_validate_json(data).error
                code, message = error.code, error.message
            except ValidationError:
                pass
            raise AgentError(
                f"node agent: {method} {path} -> {response.status} {code}: {message}",
                response.status,
                code,
            )
        if reply is None:
            return None
        try:
            return reply.model_validate_json(data)
        except ValidationError as e:
            raise AgentError(
                f"node agent: {method} {path}: malformed reply: {e}", response.status
            ) from e

    def register(self, body: proto.Register) -> proto.Registration:
        out = self._call("POST", proto.TENANTS, body, proto.Registration)
        assert out is not None
        return out

    def heartbeat(self, tenant: str, body: proto.Heartbeat) -> proto.Lease:
        out = self._call("POST", proto.tenant_path(tenant, "heartbeat"), body, proto.Lease)
        assert out is not None
        return out

    def release(self, tenant: str, body: proto.Release) -> proto.Lease:
        out = self._call("POST", proto.tenant_path(tenant, "release"), body, proto.Lease)
        assert out is not None
        return out

    def orders(self, tenant: str, instance: str, wait_s: float) -> proto.Lease:
        """The lease once it carries a reclaim or park order, or after ``wait_s`` (a long
        poll: the agent holds the call until then)."""
        query = f"?instance={quote(instance)}&wait_s={wait_s:g}"
        timeout = wait_s + self.timeout_s
        out = self._call("GET", proto.tenant_path(tenant, "orders") + query, None, proto.Lease,
                         timeout)  # fmt: skip
        assert out is not None
        return out

    def deregister(self, tenant: str, instance: str) -> None:
        self._call("DELETE", f"{proto.tenant_path(tenant)}?instance={quote(instance)}", None, None)

    def ledger(self) -> proto.LedgerView:
        out = self._call("GET", proto.GPUS, None, proto.LedgerView)
        assert out is not None
        return out
