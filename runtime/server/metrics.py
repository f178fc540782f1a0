"""Every metric the model server exports, declared once: Berth's names and vLLM's aliases.

Berth's metrics carry a ``model`` label; where vLLM exports the same quantity, it is exported
again under vLLM's name with vLLM's ``model_name`` label, so that existing Grafana dashboards
and the Gateway API Inference Extension's endpoint picker (which reads
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``) work unchanged.

Two kinds of source: per-request observations (latencies, token counts, outcomes) are pushed
into histograms and counters by the engine loop as they happen; engine-wide state (queue
lengths, KV usage, cumulative preemptions and prefix-cache counts, memory, standby state) is
read at scrape time from the latest snapshot through :class:`RuntimeCollector`, so it can never
drift from the engine's own numbers.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from berth.runtime.server.standby import StandbyState


class Name(NamedTuple):
    """One metric: Berth's name, vLLM's name for the same quantity (None: vLLM has none)."""

    berth: str
    vllm: str | None
    doc: str


# Request-level metrics, pushed by the engine loop. Counters are exposed with ``_total``.
TIME_TO_FIRST_TOKEN = Name(
    "berth_time_to_first_token_seconds",
    "vllm:time_to_first_token_seconds",
    "Time from arrival to the first token.",
)
INTER_TOKEN_LATENCY = Name(
    "berth_inter_token_latency_seconds",
    "vllm:inter_token_latency_seconds",
    "Time between consecutive outputs of one request.",
)
E2E_LATENCY = Name(
    "berth_e2e_request_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "Time from arrival to the last token.",
)
PROMPT_TOKENS = Name("berth_prompt_tokens", "vllm:prompt_tokens", "Prefilled prompt tokens.")
GENERATION_TOKENS = Name("berth_generation_tokens", "vllm:generation_tokens", "Generated tokens.")
REQUEST_SUCCESS = Name(
    "berth_request_success",
    "vllm:request_success",
    "Sequences finished, by finish reason (label finished_reason).",
)
REQUEST_FAILURE = Name(
    "berth_request_failure",
    None,
    "Requests refused or sequences aborted, by reason (label reason).",
)

# Engine-wide metrics, read from the latest snapshot at scrape time.
REQUESTS_RUNNING = Name(
    "berth_requests_running", "vllm:num_requests_running", "Requests in the running batch."
)
REQUESTS_WAITING = Name(
    "berth_requests_waiting", "vllm:num_requests_waiting", "Requests admitted but not yet running."
)
KV_CACHE_USAGE = Name(
    "berth_kv_cache_usage_ratio",
    "vllm:kv_cache_usage_perc",
    "Fraction of KV-cache blocks in use (0-1).",
)
# vLLM before 0.10, and endpoint pickers configured for it, read KV usage under this name.
KV_CACHE_USAGE_LEGACY_VLLM = "vllm:gpu_cache_usage_perc"
KV_CACHE_BLOCKS_TOTAL = Name("berth_kv_cache_blocks_total", None, "KV-cache blocks in the pool.")
KV_CACHE_BLOCKS_FREE = Name("berth_kv_cache_blocks_free", None, "KV-cache blocks free.")
PREEMPTIONS = Name(
    "berth_preemptions", "vllm:num_preemptions", "Sequences preempted for lack of KV blocks."
)
PREFIX_CACHE_QUERIES = Name(
    "berth_prefix_cache_queries",
    "vllm:prefix_cache_queries",
    "Prompt tokens looked up in the prefix cache.",
)
PREFIX_CACHE_HITS = Name(
    "berth_prefix_cache_hits", "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache."
)
PREFIX_CACHE_HIT_RATE = Name(
    "berth_prefix_cache_hit_rate",
    "vllm:gpu_prefix_cache_hit_rate",
    "Prefix-cache hit rate since start (0-1).",
)
KV_CACHE_BYTES = Name("berth_kv_cache_bytes", None, "Bytes of the KV-cache pool.")
MEMORY_REQUEST = Name("berth_gpu_memory_request_bytes", None, "Guaranteed GPU memory, bytes.")
MEMORY_LIMIT = Name("berth_gpu_memory_limit_bytes", None, "Burst ceiling of GPU memory, bytes.")
MEMORY_RESIDENT = Name(
    "berth_runtime_gpu_memory_resident_bytes",
    None,
    "GPU memory this runtime holds (weights + KV), bytes; the agent sums its tenants' as "
    "berth_gpu_memory_resident_bytes.",
)
STANDBY_STATE = Name(
    "berth_standby_state", None, "1 for the runtime's current residency state (label state)."
)
DRAINING = Name("berth_draining", None, "1 while the server drains before exit.")
HTTP_CONNECTIONS = Name("berth_http_connections", None, "Open HTTP connections.")
HTTP_HEADER_TIMEOUTS = Name(
    "berth_http_header_timeouts",
    None,
    "Connections closed because a request's headers did not arrive in time.",
)

# Buckets: vLLM's, with finer steps at the low end where a GPU decode step lands (~5-10 ms).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)  # fmt: skip


@dataclass(frozen=True)
class RuntimeGauges:
    """Engine-wide numbers at one instant, as the engine loop last saw them."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    total_blocks: int = 0
    free_blocks: int = 0
    preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative, tokens
    prefix_cache_hits: int = 0  # cumulative, tokens
    kv_cache_bytes: int = 0
    resident_bytes: int = 0  # bytes this runtime holds on its GPU (weights + KV)


@dataclass(slots=True)
class ConnectionStats:
    """The HTTP side's connection counts, kept by the protocol (``connections.py``)."""

    open: int = 0
    header_timeouts: int = 0  # cumulative


@dataclass(frozen=True)
class MemoryBudget:
    """The GPU memory the scheduler granted this pod (wire.ENV_GPU_MEMORY_*), in bytes."""

    request_bytes: int | None = None
    limit_bytes: int | None = None


class RuntimeCollector(Collector):
    """Yields the engine-wide metrics from callables read at scrape time."""

    def __init__(
        self,
        model: str,
        gauges: Callable[[], RuntimeGauges],
        state: Callable[[], StandbyState],
        draining: Callable[[], bool],
        budget: MemoryBudget,
        connections: ConnectionStats,
    ) -> None:
        self._model = model
        self._gauges = gauges
        self._state = state
        self._draining = draining
        self._budget = budget
        self._connections = connections

    def _family(self, name: Name, value: float, counter: bool = False) -> Iterable[Metric]:
        """The value under Berth's name and, where vLLM has one, under vLLM's."""
        family = CounterMetricFamily if counter else GaugeMetricFamily
        berth = family(name.berth, name.doc, labels=["model"])
        berth.add_metric([self._model], value)
        yield berth
        if name.vllm is not None:
            alias = family(name.vllm, name.doc, labels=["model_name"])
            alias.add_metric([self._model], value)
            yield alias

    def collect(self) -> Iterable[Metric]:
        g = self._gauges()
        yield from self._family(REQUESTS_RUNNING, g.running)
        yield from self._family(REQUESTS_WAITING, g.waiting)
        yield from self._family(KV_CACHE_USAGE, g.kv_cache_usage)
        legacy = GaugeMetricFamily(
            KV_CACHE_USAGE_LEGACY_VLLM, KV_CACHE_USAGE.doc, labels=["model_name"]
        )
        legacy.add_metric([self._model], g.kv_cache_usage)
        yield legacy
        yield from self._family(KV_CACHE_BLOCKS_TOTAL, g.total_blocks)
        yield from self._family(KV_CACHE_BLOCKS_FREE, g.free_blocks)
        yield from self._family(PREEMPTIONS, g.preemptions, counter=True)
        yield from self._family(PREFIX_CACHE_QUERIES, g.prefix_cache_queries, counter=True)
        yield from self._family(PREFIX_CACHE_HITS, g.prefix_cache_hits, counter=True)
        queries = g.prefix_cache_queries
        yield from self._family(
            PREFIX_CACHE_HIT_RATE, g.prefix_cache_hits / queries if queries else 0.0
        )
        yield from self._family(KV_CACHE_BYTES, g.kv_cache_bytes)
        yield from self._family(MEMORY_RESIDENT, g.resident_bytes)
        if self._budget.request_bytes is not None:
            yield from self._family(MEMORY_REQUEST, self._budget.request_bytes)
        if self._budget.limit_bytes is not None:
            yield from self._family(MEMORY_LIMIT, self._budget.limit_bytes)
        state = GaugeMetricFamily(STANDBY_STATE.berth, STANDBY_STATE.doc, labels=["model", "state"])
        current = self._state()
        for member in StandbyState:
            state.add_metric([self._model, member.value], 1.0 if member is current else 0.0)
        yield state
        yield from self._family(DRAINING, 1.0 if self._draining() else 0.0)
        yield from self._family(HTTP_CONNECTIONS, self._connections.open)
        yield from self._family(
            HTTP_HEADER_TIMEOUTS, self._connections.header_timeouts, counter=True
        )


class RequestMetrics:
    """Per-request observations, each written under Berth's and vLLM's name at once.

    The engine loop calls it on the event loop as the engine's reports arrive.
    """

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        def histogram(name: Name, buckets: tuple[float, ...]) -> list[Histogram]:
            out = [Histogram(name.berth, name.doc, ["model"], registry=registry, buckets=buckets)]
            if name.vllm is not None:
                out.append(
                    Histogram(
                        name.vllm, name.doc, ["model_name"], registry=registry, buckets=buckets
                    )
                )
            return [h.labels(model) for h in out]

        def counter(name: Name, *labels: str) -> list[Counter]:
            out = [Counter(name.berth, name.doc, ["model", *labels], registry=registry)]
            if name.vllm is not None:
                out.append(Counter(name.vllm, name.doc, ["model_name", *labels], registry=registry))
            return out

        self._model = model
        self._ttft = histogram(TIME_TO_FIRST_TOKEN, TTFT_BUCKETS)
        self._itl = histogram(INTER_TOKEN_LATENCY, ITL_BUCKETS)
        self._e2e = histogram(E2E_LATENCY, E2E_BUCKETS)
        self._prompt = [c.labels(model) for c in counter(PROMPT_TOKENS)]
        self._generation = [c.labels(model) for c in counter(GENERATION_TOKENS)]
        self._success = counter(REQUEST_SUCCESS, "finished_reason")
        self._failure = counter(REQUEST_FAILURE, "reason")

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        for h in self._ttft:
            h.observe(seconds)
        for c in self._prompt:
            c.inc(prompt_tokens)

    def generated(self, count: int) -> None:
        """``count`` new tokens (of any number of requests)."""
        for c in self._generation:
            c.inc(count)

    def inter_token(self, seconds: float) -> None:
        """The gap between two consecutive outputs of one request."""
        for h in self._itl:
            h.observe(seconds)

    def finished(self, seconds: float, finish_reason: str) -> None:
        for h in self._e2e:
            h.observe(seconds)
        for c in self._success:
            c.labels(self._model, finish_reason).inc()

    def failed(self, reason: str) -> None:
        for c in self._failure:
            c.labels(self._model, reason).inc()
