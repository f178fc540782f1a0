"""Berth's eBPF egress enforcer (``egress.py``) on this node's sandboxed pods, fed by the pod watch.

The operator renders a sandboxed pod's egress rules (``spec.sandbox.egress``) into the pod's
annotation ``wire.POD_EGRESS_POLICY``. For each such pod the agent attaches the enforcer to the
pod's cgroup as soon as the cgroup exists (the watch sees the pod again as its containers start,
and ``tick`` retries while it waits), rewrites the entries when the rules change, and detaches
when the pod goes (and, after each list of the node's pods, whatever an earlier agent left for
pods that are gone). ``tick`` also looks host names up again when their TTL runs out and reports
each sandbox's new denials as a Warning event on its pod; ``EgressCollector`` exports the denial
counters (read from the maps at scrape time, so they cannot drift from what the kernel counted).

DNS: a sandboxed pod may query only the cluster's DNS servers (the agent's ``--cluster-dns``, the
kubelet's ``clusterDNS``), as the NetworkPolicy allows only the cluster DNS pods.
"""

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from berth import wire
from berth.operator.api import EgressRule
from berth.runtime.agent.egress import Attachment, EgressError
from berth.runtime.agent.egress_policy import Address, EgressPolicy

log = logging.getLogger(__name__)
Obj = dict[str, Any]
Report = Callable[[str, str, str], None]  # (tenant "namespace/name", reason, message)
ATTACH_RETRY_S = 1.0  # a pod whose cgroup is not there yet is tried again this often
DENIALS = "berth_egress_denials_total"


class Enforcer(Protocol):
    def attach_pod(self, pod_uid: str, policy: EgressPolicy) -> Attachment: ...

    def prune(self) -> list[int]: ...


def egress_policy(pod: Obj, dns_servers: Sequence[Address]) -> EgressPolicy | None:
    """The policy a pod's annotation asks for; None when it carries none (not sandboxed)."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(wire.POD_EGRESS_POLICY)
    if text is None:
        return None
    rules = tuple(EgressRule.model_validate(rule) for rule in json.loads(text))
    return EgressPolicy(rules=rules, dns_servers=tuple(dns_servers))


@dataclass
class _Sandbox:
    tenant: str  # namespace/name
    policy: EgressPolicy
    attachment: Attachment | None = None  # None until the pod's cgroup exists
    refresh_at: float = 0.0  # clock time of the next host-name refresh (or attach attempt)
    denied: int = 0  # denials already reported


class PodEgress:
    def __init__(
        self,
        enforcer: Enforcer,
        dns_servers: Iterable[str] = (),
        report: Report | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enforcer, self.report, self.clock = enforcer, report, clock
        self.dns_servers = tuple(ipaddress.ip_address(s) for s in dns_servers)
        self.sandboxes: dict[str, _Sandbox] = {}  # pod uid -> its sandbox
        self.lock = threading.Lock()

    def pod_seen(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid, tenant = meta["uid"], f"{meta.get('namespace')}/{meta.get('name')}"
        policy = egress_policy(pod, self.dns_servers)
        with self.lock:
            sandbox = self.sandboxes.get(uid)
            if policy is None:
                if sandbox is not None:
                    self._drop(uid)
                return
            if sandbox is None:
                sandbox = self.sandboxes[uid] = _Sandbox(tenant, policy)
            elif sandbox.policy != policy:
                sandbox.policy = policy
                if sandbox.attachment is not None:
                    sandbox.attachment.update(policy)
            if sandbox.attachment is None:
                self._attach(uid, sandbox)

    def listed(self) -> None:
        """The pod watch handed out a whole list: remove the sandboxes of pods that are gone
        (an earlier agent's, pinned in bpffs, or attachments whose cgroup went)."""
        with self.lock:
            removed = self.enforcer.prune()
        if removed:
            log.info("egress sandboxes of %d gone pod(s) removed", len(removed))

    def pod_gone(self, pod: Obj) -> None:
        with self.lock:
            if pod["metadata"]["uid"] in self.sandboxes:
                self._drop(pod["metadata"]["uid"])

    def tick(self) -> float:
        """Attach waiting pods, refresh due host names, report new denials; returns the
        seconds until something is due."""
        with self.lock:
            now = self.clock()
            for uid, sandbox in self.sandboxes.items():
                if sandbox.attachment is None:
                    if now >= sandbox.refresh_at:
                        self._attach(uid, sandbox)
                    continue
                if now >= sandbox.refresh_at:
                    sandbox.refresh_at = now + sandbox.attachment.refresh()
                self._report_denials(sandbox)
            due = [s.refresh_at for s in self.sandboxes.values()]
        return max(0.0, min(due, default=ATTACH_RETRY_S) - now)

    def run(self, stop: threading.Event, every_s: float = 1.0) -> None:
        """``tick`` until ``stop``, at least every ``every_s`` (how soon a denial is reported);
        a failing tick is logged and the next one goes on."""
        delay = 0.0
        while not stop.wait(delay):
            try:
                delay = min(every_s, self.tick())
            except Exception:
                log.exception("egress tick failed")
                delay = every_s

    def denials(self) -> dict[str, dict[str, int]]:
        """Refused attempts per attached pod (``namespace/name``) and hook."""
        with self.lock:
            return {
                s.tenant: s.attachment.denials()
                for s in self.sandboxes.values()
                if s.attachment is not None
            }

    def close(self) -> None:
        """Forget the attachments; their pinned links keep enforcing for the next agent."""
        with self.lock:
            self.sandboxes.clear()

    def _attach(self, uid: str, sandbox: _Sandbox) -> None:
        try:
            sandbox.attachment = self.enforcer.attach_pod(uid, sandbox.policy)
        except EgressError as error:  # its cgroup is not there yet, most likely
            log.debug("egress of %s not attached yet: %s", sandbox.tenant, error)
            sandbox.refresh_at = self.clock() + ATTACH_RETRY_S
            return
        sandbox.refresh_at = self.clock() + sandbox.attachment.refresh()
        sandbox.denied = sum(sandbox.attachment.denials().values())
        log.info(
            "egress of %s enforced (cgroup %s)", sandbox.tenant, sandbox.attachment.cgroup_path
        )

    def _drop(self, uid: str) -> None:
        sandbox = self.sandboxes.pop(uid)
        if sandbox.attachment is not None:
            sandbox.attachment.detach()
            log.info("egress of %s detached", sandbox.tenant)

    def _report_denials(self, sandbox: _Sandbox) -> None:
        assert sandbox.attachment is not None
        counts = sandbox.attachment.denials()
        total = sum(counts.values())
        if total > sandbox.denied and self.report is not None:
            hooks = ", ".join(f"{hook} {n}" for hook, n in counts.items() if n)
            message = (f"{total - sandbox.denied} connection(s) refused by the sandbox's egress "
                       f"allowlist ({total} in all: {hooks})")  # fmt: skip
            self.report(sandbox.tenant, "EgressDenied", message)
        sandbox.denied = total


class EgressCollector(Collector):
    """``berth_egress_denials_total{pod, hook}``: connections the enforcer refused."""

    def __init__(self, pods: PodEgress) -> None:
        self.pods = pods

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            DENIALS.removesuffix("_total"),
            "Connections and datagrams the egress enforcer refused, per sandboxed pod and hook.",
            labels=["pod", "hook"],
        )
        for tenant, counts in sorted(self.pods.denials().items()):
            for hook, count in counts.items():
                family.add_metric([tenant, hook], count)
        yield family
