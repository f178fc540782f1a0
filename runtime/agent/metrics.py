"""The node agent's Prometheus metrics, declared once.

Ledger quantities (per GPU and per tenant) are read from the ledger at scrape time through
:class:`LedgerCollector`, so they can never drift from the ledger; what happened (reclaims,
overdue tenants, lapses) is counted as the ledger reports it (:meth:`AgentMetrics.count`).
"""

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from berth.agent_protocol import LedgerView, TenantState
from berth.runtime.agent.ledger import (
    Lapsed,
    Notice,
    OverGrant,
    Parked,
    ParkIssued,
    ReclaimIssued,
    ReclaimOverdue,
)

# Per GPU, label ``gpu`` (the UUID).
GPU_GAUGES = {
    "berth_gpu_memory_capacity_bytes": ("capacity_bytes", "The GPU's memory."),
    "berth_gpu_memory_reserved_bytes": ("reserved_bytes", "Memory kept back from tenants."),
    "berth_gpu_memory_requested_bytes": ("requested_bytes", "Sum of the tenants' requests."),
    "berth_gpu_memory_granted_bytes": ("granted_bytes", "Sum of what tenants may hold."),
    "berth_gpu_memory_resident_bytes": ("resident_bytes", "Sum of what tenants report holding."),
    "berth_gpu_memory_free_bytes": ("free_bytes", "Allocatable memory neither granted nor held."),
}
# Per tenant, labels ``gpu`` and ``tenant``.
TENANT_GAUGES = {
    "berth_gpu_tenant_request_bytes": ("request_bytes", "The tenant's guaranteed memory."),
    "berth_gpu_tenant_limit_bytes": ("limit_bytes", "The tenant's burst ceiling."),
    "berth_gpu_tenant_granted_bytes": ("granted_bytes", "What the tenant may hold now."),
    "berth_gpu_tenant_resident_bytes": ("held_bytes", "What the tenant reports holding."),
    "berth_gpu_tenant_in_flight_requests": ("in_flight", "Requests the tenant is serving."),
    "berth_gpu_tenant_idle_seconds": ("idle_s", "Seconds since the tenant's last request ended."),
}
TENANT_STATE = "berth_gpu_tenant_state"  # 1 for the tenant's current state (label ``state``)
RECOVERING = "berth_node_agent_recovering"
RECLAIMS = "berth_gpu_reclaims"
RECLAIM_OVERDUE = "berth_gpu_reclaim_overdue"
OVER_GRANT = "berth_gpu_over_grant"
LAPSES = "berth_gpu_tenant_lapses"
PARK_REQUESTS = "berth_gpu_park_requests"
PARKS = "berth_gpu_parks"


class LedgerCollector(Collector):
    """Every ledger gauge, computed from one view of the ledger per scrape."""

    def __init__(self, view: Callable[[], LedgerView]) -> None:
        self.view = view

    def collect(self) -> Iterable[Metric]:
        ledger = self.view()
        recovering = GaugeMetricFamily(
            RECOVERING, "1 during the restart grace (no grants, only re-registrations)."
        )
        recovering.add_metric([], 1.0 if ledger.recovering_s > 0 else 0.0)
        yield recovering
        for name, (attribute, doc) in GPU_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["gpu"])
            for gpu in ledger.gpus:
                family.add_metric([gpu.uuid], float(getattr(gpu, attribute)))
            yield family
        for name, (attribute, doc) in TENANT_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["gpu", "tenant"])
            for gpu in ledger.gpus:
                for tenant in gpu.tenants:
                    family.add_metric([gpu.uuid, tenant.tenant], float(getattr(tenant, attribute)))
            yield family
        states = GaugeMetricFamily(
            TENANT_STATE, "1 for the tenant's state.", labels=["gpu", "tenant", "state"]
        )
        for gpu in ledger.gpus:
            for tenant in gpu.tenants:
                for state in TenantState:
                    value = 1.0 if tenant.state == state else 0.0
                    states.add_metric([gpu.uuid, tenant.tenant, state.value], value)
        yield states


class AgentMetrics:
    def __init__(self, view: Callable[[], LedgerView]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(LedgerCollector(view))
        self.reclaims = Counter(
            RECLAIMS, "Reclaims asked of bursting tenants.", ["gpu"], registry=self.registry
        )
        self.overdue = Counter(
            RECLAIM_OVERDUE,
            "Reclaims a tenant did not honour by the deadline.",
            ["gpu", "tenant"],
            registry=self.registry,
        )
        self.over_grant = Counter(
            OVER_GRANT,
            "Times a tenant reported holding more than it was granted.",
            ["gpu", "tenant"],
            registry=self.registry,
        )
        self.lapses = Counter(
            LAPSES, "Tenants dropped because their heartbeat lapsed.", ["gpu"],
            registry=self.registry,
        )  # fmt: skip
        self.park_requests = Counter(
            PARK_REQUESTS, "Idle tenants asked to park (warm standby).", ["gpu"],
            registry=self.registry,
        )  # fmt: skip
        self.parks = Counter(
            PARKS,
            "Tenants that parked (reason: asked by the agent, or on their own).",
            ["gpu", "reason"],
            registry=self.registry,
        )

    def count(self, notice: Notice) -> None:
        match notice:
            case ReclaimIssued():
                self.reclaims.labels(notice.gpu).inc()
            case ReclaimOverdue():
                self.overdue.labels(notice.gpu, notice.tenant).inc()
            case OverGrant():
                self.over_grant.labels(notice.gpu, notice.tenant).inc()
            case Lapsed():
                self.lapses.labels(notice.gpu).inc()
            case ParkIssued():
                self.park_requests.labels(notice.gpu).inc()
            case Parked():
                self.parks.labels(notice.gpu, "agent" if notice.asked else "tenant").inc()
