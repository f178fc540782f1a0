"""Leader election on a ``coordination.k8s.io/v1`` Lease, with client-go's semantics.

Several operator processes may run; one leads and acts (reconciler and GPU scheduler), the others
wait. The pure core decides from what a candidate has observed and its own clock:

- ``observe``: a candidate remembers *when it first saw* each lease record, on its own monotonic
  clock, and never trusts the record's ``renewTime`` (another machine's clock).
- ``decide``: create the Lease when there is none; renew it when this candidate holds it; take it
  when it is released (empty holder) or when its record has not changed for its
  ``leaseDurationSeconds`` since this candidate saw it; otherwise wait.
- ``still_leading``: a leader acts only until ``renew_deadline`` after the *start* of its last
  successful renewal, which is shorter than the lease duration, so it has stopped before any
  follower can have waited the lease out.

Writes go through the Lease's ``resourceVersion`` (a conflict loses the race, never both win).
``LeaderElector`` is the thin shell: its own HTTP connection with a short timeout (a busy shared
pool must not delay renewals), a renew loop and a watchdog that calls ``on_lost`` the moment the
deadline passes, and ``release`` on a clean exit so a follower takes over at once.
"""

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from kubernetes import config as k8s_config

from berth.operator.kube import KubeClient, KubeError, Obj

log = logging.getLogger(__name__)
Decision = Literal["create", "renew", "take", "wait"]
IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class Timing:
    """client-go's defaults for controllers (kube-scheduler: 15 s, 10 s, 2 s)."""

    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s > 0:
            raise ValueError("need lease duration > renew deadline > retry period > 0")


@dataclass(frozen=True)
class LeaseRecord:
    holder: str  # "" when released
    lease_duration_s: int
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0


@dataclass(frozen=True)
class Observed:
    record: LeaseRecord
    resource_version: str
    since: float  # this candidate's monotonic time when it first saw ``record``


def observe(previous: Observed | None, record: LeaseRecord, version: str, now: float) -> Observed:
    """The candidate's view after reading ``record``: the clock restarts only when it changed."""
    if previous is not None and previous.record == record:
        return replace(previous, resource_version=version)
    return Observed(record, version, now)


def decide(identity: str, observed: Observed | None, now: float) -> Decision:
    if observed is None:
        return "create"
    holder = observed.record.holder
    if holder == identity:
        return "renew"
    if holder and now < observed.since + observed.record.lease_duration_s:
        return "wait"
    return "take"


def claim(
    identity: str, observed: Observed | None, decision: Decision, stamp: str, timing: Timing
) -> LeaseRecord:
    """The record to write for ``create``, ``renew`` or ``take``."""
    duration = round(timing.lease_duration_s)
    if decision == "renew" and observed is not None:
        return replace(observed.record, renew_time=stamp, lease_duration_s=duration)
    transitions = observed.record.transitions + 1 if observed is not None else 0
    return LeaseRecord(identity, duration, stamp, stamp, transitions)


def still_leading(renewal_started: float | None, now: float, timing: Timing) -> bool:
    return renewal_started is not None and now < renewal_started + timing.renew_deadline_s


# ---- the Lease on the API server ----------------------------------------------------------


def micro_time(moment: datetime | None = None) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_of(lease: Obj) -> LeaseRecord:
    spec = lease.get("spec") or {}
    return LeaseRecord(
        holder=spec.get("holderIdentity") or "",
        lease_duration_s=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=spec.get("acquireTime"),
        renew_time=spec.get("renewTime"),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def lease_body(namespace: str, name: str, record: LeaseRecord, version: str | None) -> Obj:
    metadata: Obj = {"name": name, "namespace": namespace}
    if version:
        metadata["resourceVersion"] = version
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": record.holder,
            "leaseDurationSeconds": record.lease_duration_s,
            "acquireTime": record.acquire_time,
            "renewTime": record.renew_time,
            "leaseTransitions": record.transitions,
        },
    }


def default_identity() -> str:
    """Host name (the pod's name in a cluster) plus a random part, as client-go's callers use:
    a restarted process is a new candidate and waits out its predecessor's lease."""
    return f"{os.uname().nodename}_{uuid.uuid4().hex[:12]}"


def default_namespace(kubeconfig: str | None = None) -> str:
    """Where the Lease lives, as kubectl picks a namespace: the pod's own in a cluster, else the
    kubeconfig's current context's, else ``default``."""
    try:
        with open(IN_CLUSTER_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        pass
    try:
        _, current = k8s_config.list_kube_config_contexts(kubeconfig)
    except (k8s_config.ConfigException, OSError):
        return "default"
    return str((current or {}).get("context", {}).get("namespace") or "default")


class LeaderElector:
    """Campaigns for one Lease and keeps it; ``on_lost`` runs once if leadership ends."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        timing: Timing = Timing(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.namespace, self.name = client, namespace, name
        self.identity, self.timing, self.clock = identity, timing, clock
        self.observed: Observed | None = None
        self.renewal_started: float | None = None  # start of the last successful write
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    def try_acquire_or_renew(self) -> bool:
        """One round: read the Lease, decide, write if it is ours to write. True when leading."""
        started = self.clock()
        try:
            lease: Obj | None = self.client.get(f"{self.path}/{self.name}")
        except KubeError as error:
            if error.status != 404:
                raise
            lease = None
        now = self.clock()
        if lease is not None:
            version = lease["metadata"]["resourceVersion"]
            self.observed = observe(self.observed, record_of(lease), version, now)
        else:
            self.observed = None
        decision = decide(self.identity, self.observed, now)
        if decision == "wait":
            return False
        record = claim(self.identity, self.observed, decision, micro_time(), self.timing)
        if decision == "create":
            body = lease_body(self.namespace, self.name, record, None)
            written = self.client.request("POST", self.path, body=body)
        else:
            assert self.observed is not None
            version = self.observed.resource_version
            body = lease_body(self.namespace, self.name, record, version)
            written = self.client.request("PUT", f"{self.path}/{self.name}", body=body)
        self.observed = Observed(record, written["metadata"]["resourceVersion"], now)
        with self.lock:
            self.renewal_started = started
        if decision != "renew":
            log.info("leading as %s (lease %s/%s)", self.identity, self.namespace, self.name)
        return True

    def acquire(self) -> bool:
        """Block until this candidate leads (True) or ``close`` is called (False)."""
        log.info("waiting to lead as %s (lease %s/%s)", self.identity, self.namespace, self.name)
        while not self.stop.is_set():
            if self._attempt():
                return True
            self.stop.wait(self.timing.retry_period_s)
        return False

    def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew every retry period in one thread; a watchdog thread calls ``on_lost`` once the
        renew deadline passes without a successful renewal (or the Lease went to another)."""
        lost = threading.Event()

        def renew() -> None:
            while not self.stop.wait(self.timing.retry_period_s) and not lost.is_set():
                if not self._attempt() and self._held_by_another():
                    with self.lock:
                        self.renewal_started = None  # the watchdog steps down at once
                    return

        def watch() -> None:
            while not self.stop.wait(min(0.25, self.timing.retry_period_s / 4)):
                with self.lock:
                    started = self.renewal_started
                if not still_leading(started, self.clock(), self.timing):
                    lost.set()
                    log.error(
                        "lost the lease %s/%s as %s", self.namespace, self.name, self.identity
                    )
                    on_lost()
                    return

        for target, name in ((renew, "lease-renew"), (watch, "lease-watchdog")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def release(self) -> None:
        """Give the Lease up on a clean exit (client-go's ReleaseOnCancel)."""
        self.stop.set()
        with self.lock:
            leading = self.renewal_started is not None
        if not leading or self.observed is None or self.observed.record.holder != self.identity:
            return
        record = replace(
            self.observed.record, holder="", lease_duration_s=1, renew_time=micro_time()
        )
        body = lease_body(self.namespace, self.name, record, self.observed.resource_version)
        try:
            self.client.request("PUT", f"{self.path}/{self.name}", body=body)
            log.info("released the lease %s/%s", self.namespace, self.name)
        except Exception as error:  # best effort: the lease expires anyway
            log.warning("lease %s/%s not released: %s", self.namespace, self.name, error)

    def _held_by_another(self) -> bool:
        return self.observed is not None and self.observed.record.holder not in ("", self.identity)

    def _attempt(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except KubeError as error:
            if error.status == 409:  # another candidate wrote first
                log.info("lease %s/%s: lost a race to write it", self.namespace, self.name)
            else:
                log.warning("lease %s/%s: %s", self.namespace, self.name, error)
        except Exception as error:  # a broken connection: try again next period
            log.warning(
                "lease %s/%s: %s: %s", self.namespace, self.name, type(error).__name__, error
            )
        return False
