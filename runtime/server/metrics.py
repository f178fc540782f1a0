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

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Request-level metrics (pushed): Berth name, vLLM name (None where vLLM has none).
TIME_TO_FIRST_TOKEN = ("berth_time_to_first_token_seconds", "vllm:time_to_first_token_seconds")
INTER_TOKEN_LATENCY = ("berth_inter_token_latency_seconds", "vllm:inter_token_latency_seconds")
E2E_LATENCY = ("berth_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds")
PROMPT_TOKENS = ("berth_prompt_tokens", "vllm:prompt_tokens")  # counters: exposed with _total
GENERATION_TOKENS = ("berth_generation_tokens", "vllm:generation_tokens")
REQUEST_SUCCESS = ("berth_request_success", "vllm:request_success")  # label finished_reason
REQUEST_FAILURE = ("berth_request_failure", None)  # label reason

# Engine-wide metrics (read at scrape time).
REQUESTS_RUNNING = ("berth_requests_running", "vllm:num_requests_running")
REQUESTS_WAITING = ("berth_requests_waiting", "vllm:num_requests_waiting")
KV_CACHE_USAGE = ("berth_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc")
KV_CACHE_USAGE_LEGACY = "vllm:gpu_cache_usage_perc"  # vLLM < 0.10 and older endpoint pickers
KV_CACHE_BLOCKS_TOTAL = ("berth_kv_cache_blocks_total", None)
KV_CACHE_BLOCKS_FREE = ("berth_kv_cache_blocks_free", None)
PREEMPTIONS = ("berth_preemptions", "vllm:num_preemptions")
PREFIX_CACHE_QUERIES = ("berth_prefix_cache_queries", "vllm:prefix_cache_queries")  # tokens
PREFIX_CACHE_HITS = ("berth_prefix_cache_hits", "vllm:prefix_cache_hits")  # tokens
PREFIX_CACHE_HIT_RATE = ("berth_prefix_cache_hit_rate", "vllm:gpu_prefix_cache_hit_rate")
KV_CACHE_BYTES = ("berth_kv_cache_bytes", None)
MEMORY_REQUEST = ("berth_gpu_memory_request_bytes", None)
MEMORY_LIMIT = ("berth_gpu_memory_limit_bytes", None)
MEMORY_RESIDENT = ("berth_gpu_memory_resident_bytes", None)
STANDBY_STATE = ("berth_standby_state", None)  # one series per state, 1 for the current one
DRAINING = ("berth_draining", None)

# Buckets: vLLM's, with finer steps at the low end where a GPU decode step lands (~5-10 ms).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)  # fmt: skip


class StandbyState(enum.Enum):
    """The runtime's residency on its GPU (ARCHITECTURE section 5).

    Only ``loading`` and ``active`` are entered today; parking and waking belong to the node
    agent's park/wake protocol, and the metric already exports every state so that dashboards
    and the autoscaler can be written against the final shape.
    """

    LOADING = "loading"
    ACTIVE = "active"
    PARKING = "parking"
    STANDBY = "standby"
    WAKING = "waking"


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
    ) -> None:
        self._model = model
        self._gauges = gauges
        self._state = state
        self._draining = draining
        self._budget = budget

    def _family(
        self, names: tuple[str, str | None], doc: str, value: float, counter: bool = False
    ) -> Iterable[Metric]:
        berth_name, vllm_name = names
        family = CounterMetricFamily if counter else GaugeMetricFamily
        berth = family(berth_name, doc, labels=["model"])
        berth.add_metric([self._model], value)
        yield berth
        if vllm_name is not None:
            alias = family(vllm_name, doc, labels=["model_name"])
            alias.add_metric([self._model], value)
            yield alias

    def collect(self) -> Iterable[Metric]:
        g = self._gauges()
        yield from self._family(REQUESTS_RUNNING, "Requests in the running batch.", g.running)
        yield from self._family(
            REQUESTS_WAITING, "Requests admitted but not yet running.", g.waiting
        )
        yield from self._family(KV_CACHE_USAGE, "Fraction of KV-cache blocks in use (0-1).",
                                g.kv_cache_usage)  # fmt: skip
        legacy = GaugeMetricFamily(KV_CACHE_USAGE_LEGACY, "KV-cache usage (0-1), legacy name.",
                                   labels=["model_name"])  # fmt: skip
        legacy.add_metric([self._model], g.kv_cache_usage)
        yield legacy
        yield from self._family(KV_CACHE_BLOCKS_TOTAL, "KV-cache blocks in the pool.",
                                g.total_blocks)  # fmt: skip
        yield from self._family(KV_CACHE_BLOCKS_FREE, "KV-cache blocks free.", g.free_blocks)
        yield from self._family(PREEMPTIONS, "Sequences preempted for lack of KV blocks.",
                                g.preemptions, counter=True)  # fmt: skip
        yield from self._family(PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache.",
                                g.prefix_cache_queries, counter=True)  # fmt: skip
        yield from self._family(PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache.",
                                g.prefix_cache_hits, counter=True)  # fmt: skip
        rate = g.prefix_cache_hits / g.prefix_cache_queries if g.prefix_cache_queries else 0.0
        yield from self._family(PREFIX_CACHE_HIT_RATE, "Prefix-cache hit rate since start (0-1).",
                                rate)  # fmt: skip
        yield from self._family(KV_CACHE_BYTES, "Bytes of the KV-cache pool.", g.kv_cache_bytes)
        yield from self._family(MEMORY_RESIDENT, "GPU bytes this runtime holds (weights + KV).",
                                g.resident_bytes)  # fmt: skip
        if self._budget.request_bytes is not None:
            yield from self._family(MEMORY_REQUEST, "Guaranteed GPU memory, bytes.",
                                    self._budget.request_bytes)  # fmt: skip
        if self._budget.limit_bytes is not None:
            yield from self._family(MEMORY_LIMIT, "Burst ceiling of GPU memory, bytes.",
                                    self._budget.limit_bytes)  # fmt: skip
        current = self._state()
        state = GaugeMetricFamily(STANDBY_STATE[0], "1 for the runtime's current residency state.",
                                  labels=["model", "state"])  # fmt: skip
        for member in StandbyState:
            state.add_metric([self._model, member.value], 1.0 if member is current else 0.0)
        yield state
        yield from self._family(DRAINING, "1 while the server drains before exit.",
                                1.0 if self._draining() else 0.0)  # fmt: skip


class RequestMetrics:
    """Per-request observations, each written under Berth's and vLLM's name at once.

    Thread-safe (prometheus-client's metrics are); the engine loop calls it from its thread.
    """

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        def histogram(names: tuple[str, str | None], doc: str, buckets: tuple[float, ...]) -> list[Histogram]:  # fmt: skip
            berth_name, vllm_name = names
            out = [Histogram(berth_name, doc, ["model"], registry=registry, buckets=buckets)]
            if vllm_name is not None:
                out.append(Histogram(vllm_name, doc, ["model_name"], registry=registry,
                                     buckets=buckets))  # fmt: skip
            return [h.labels(model) for h in out]

        def counter(names: tuple[str, str | None], doc: str, extra: tuple[str, ...] = ()) -> list[Counter]:  # fmt: skip
            berth_name, vllm_name = names
            out = [Counter(berth_name, doc, ["model", *extra], registry=registry)]
            if vllm_name is not None:
                out.append(Counter(vllm_name, doc, ["model_name", *extra], registry=registry))
            return out

        self._model = model
        self._ttft = histogram(TIME_TO_FIRST_TOKEN, "Time from arrival to the first token.",
                               TTFT_BUCKETS)  # fmt: skip
        self._itl = histogram(INTER_TOKEN_LATENCY, "Time between consecutive output tokens.",
                              ITL_BUCKETS)  # fmt: skip
        self._e2e = histogram(E2E_LATENCY, "Time from arrival to the last token.", E2E_BUCKETS)
        self._prompt = [c.labels(model) for c in counter(PROMPT_TOKENS, "Prefilled prompt tokens.")]
        self._generation = [
            c.labels(model) for c in counter(GENERATION_TOKENS, "Generated tokens.")
        ]
        self._success = counter(REQUEST_SUCCESS, "Requests finished, by finish reason.",
                                ("finished_reason",))  # fmt: skip
        self._failure = counter(REQUEST_FAILURE, "Requests that failed, by reason.", ("reason",))

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        for h in self._ttft:
            h.observe(seconds)
        for c in self._prompt:
            c.inc(prompt_tokens)

    def tokens(self, count: int, seconds_since_previous: float | None) -> None:
        """``count`` new tokens; the gap since the previous output when there was one."""
        for c in self._generation:
            c.inc(count)
        if seconds_since_previous is not None:
            for h in self._itl:
                h.observe(seconds_since_previous)

    def finished(self, seconds: float, finish_reason: str) -> None:
        for h in self._e2e:
            h.observe(seconds)
        for c in self._success:
            c.labels(self._model, finish_reason).inc()

    def failed(self, reason: str) -> None:
        for c in self._failure:
            c.labels(self._model, reason).inc()
