"""The operator's own Prometheus metrics, declared once.

One ``OperatorMetrics`` per process (tests make their own), on its own registry, so that
``/metrics`` shows exactly these series and tests never share counters.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.binds = Counter(
            "berth_scheduler_binds_total", "Pods bound to a node and GPU share.", registry=r
        )
        self.bind_failures = Counter(
            "berth_scheduler_bind_failures_total",
            "Binds that failed, by reason: refused (the API server said no), ambiguous "
            "(timeout, 5xx: the bind may have landed), conflict (404/409: gone or already "
            "bound), reservation (the GPU's reservation pod could not be made), owner (the "
            "pod's owner could not be checked).",
            ["reason"],
            registry=r,
        )
        self.unschedulable = Gauge(
            "berth_scheduler_unschedulable_pods", "Pending pods that fit nowhere now.", registry=r
        )
        self.queue_depth = Gauge(
            "berth_scheduler_pending_pods", "Pods waiting to be placed.", registry=r
        )
        self.assumed = Gauge(
            "berth_scheduler_assumed_pods",
            "GPU shares booked but not yet confirmed bound by the API server.",
            registry=r,
        )
        self.expired = Counter(
            "berth_scheduler_assumed_expired_total",
            "Assumed shares freed because, past their deadline, a fresh read showed the pod unbound "
            "or gone.",
            registry=r,
        )
        self.refused = Counter(
            "berth_scheduler_refused_pods_total",
            "Pods with schedulerName berth refused a share because no InferenceService owns them.",
            registry=r,
        )
        self.reservations = Gauge(
            "berth_gpu_reservations",
            "Reservation pods holding GPUs with Berth tenants.",
            registry=r,
        )
        self.loop_restarts = Counter(
            "berth_loop_restarts_total",
            "Times a watch loop relisted after an error, or a work loop recovered from one.",
            ["loop"],
            registry=r,
        )
        self.handler_errors = Counter(
            "berth_handler_errors_total",
            "Objects a loop's handler failed on (reported on the object and skipped).",
            ["loop"],
            registry=r,
        )
