"""``berth serve``: the model server of one Berth pod.

Every flag can also come from a ``BERTH_*`` environment variable (the pod template sets them).
The GPU memory budget comes from the pod (``berth.runtime.engine.budget.read_budget``: the
variables and the annotations file the downward API fills, names in ``berth.wire``); the
``--gpu-memory-*`` flags give one by hand. With neither, the runtime takes the whole GPU (or a
CPU default pool): local use.
"""

import os
import sys

import click

from berth import wire
from berth.runtime.engine.config import DECODE_BLAS
from berth.runtime.server.reasoning import REASONING_PARSERS, ReasoningParser


def _env(name: str) -> str:
    return f"BERTH_{name}"


@click.command("serve")
@click.option(
    "--model",
    required=True,
    envvar=_env("MODEL"),
    help="Model directory (Hugging Face layout), 'smollm2' (the real SmolLM2-135M-Instruct, "
    "imported once into ~/.cache/berth/models), or 'tiny' for the random test model.",
)
@click.option(
    "--served-model-name",
    envvar=_env("SERVED_MODEL_NAME"),
    help="The name clients send as 'model' [default: the directory's name].",
)
@click.option("--host", default="0.0.0.0", show_default=True, envvar=_env("HOST"))
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), envvar=_env("PORT")
)
@click.option(
    "--max-waiting-requests",
    default=256,
    show_default=True,
    type=click.IntRange(0),
    envvar=_env("MAX_WAITING_REQUESTS"),
    help="Requests allowed to wait beyond the running batch; more get 429.",
)
@click.option(
    "--retry-after",
    "retry_after_s",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Retry-After seconds of a 429 or 503.",
)
@click.option(
    "--request-timeout",
    "request_timeout_s",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    envvar=_env("REQUEST_TIMEOUT"),
    help="Seconds from arrival to the last token; then 408 and the request is aborted.",
)
@click.option(
    "--shutdown-delay",
    "shutdown_delay_s",
    default=float(wire.RUNTIME_SHUTDOWN_DELAY_S),
    show_default=True,
    type=click.FloatRange(min=0),
    envvar=_env("SHUTDOWN_DELAY"),
    help="On SIGTERM, seconds /ready fails while requests are still admitted (each response "
    "closes its connection), so that load balancers move away first.",
)
@click.option(
    "--drain-timeout",
    "drain_grace_s",
    default=float(wire.RUNTIME_DRAIN_TIMEOUT_S),
    show_default=True,
    type=click.FloatRange(min=0),
    envvar=_env("DRAIN_TIMEOUT"),
    help="After the shutdown delay, seconds in-flight requests may take before they are aborted.",
)
@click.option(
    "--reasoning-parser",
    type=click.Choice(REASONING_PARSERS),
    envvar=_env("REASONING_PARSER"),
    help="vLLM's: a thinking model's <think> ... </think> goes to a chat answer's "
    "reasoning_content, the rest to its content (qwen3: where the output opens a thought; "
    "deepseek_r1: the template opened it). Default: all is content.",
)
@click.option("--max-body-bytes", default=8 << 20, show_default=True, type=click.IntRange(1024))
@click.option(
    "--max-prompt-bytes",
    type=click.IntRange(1),
    envvar=_env("MAX_PROMPT_BYTES"),
    help="Bytes of prompt text per request; more get 413 before tokenizing "
    "[default: 16 per token of the context, at least 64 KiB].",
)
@click.option(
    "--header-timeout",
    "header_timeout_s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    envvar=_env("HEADER_TIMEOUT"),
    help="Seconds a connection may take to send a request's headers; then it is closed.",
)
@click.option(
    "--body-timeout",
    "body_timeout_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    envvar=_env("BODY_TIMEOUT"),
    help="Seconds a request may take to send its body; then 408.",
)
@click.option(
    "--keep-alive-timeout",
    "keep_alive_timeout_s",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="Seconds an idle keep-alive connection stays open.",
)
@click.option(
    "--max-connections",
    default=1024,
    show_default=True,
    type=click.IntRange(1),
    envvar=_env("MAX_CONNECTIONS"),
    help="Open connections (or requests in progress) beyond which requests get 503.",
)
@click.option(
    "--gpu-memory-request",
    type=click.IntRange(1),
    help=f"Guaranteed GPU memory in bytes [default: from {wire.ENV_GPU_MEMORY_REQUEST} or the "
    "pod's annotations, set by the Berth scheduler; none: the whole device].",
)
@click.option(
    "--gpu-memory-limit",
    type=click.IntRange(1),
    help=f"Burst ceiling of GPU memory in bytes [default: from {wire.ENV_GPU_MEMORY_LIMIT}, or "
    "the request].",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    envvar=_env("DEVICE"),
    help="auto, cpu, cuda or cuda:N.",
)
@click.option("--max-model-len", type=click.IntRange(2), help="[default: the model's]")
@click.option("--block-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--num-kv-blocks", type=click.IntRange(1), help="KV-cache blocks (wins over bytes).")
@click.option("--kv-cache-bytes", type=click.IntRange(1), help="Bytes of KV cache to allocate.")
@click.option(
    "--kv-cache-dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fp8"]),
    help="auto: the model's dtype; fp8: e4m3 with a scale per token and KV head (half of bf16).",
)
@click.option(
    "--max-num-seqs",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Sequences in the running batch.",
)
@click.option("--max-num-batched-tokens", default=2048, show_default=True, type=click.IntRange(1))
@click.option(
    "--max-prefill-tokens-while-decoding",
    default=512,
    show_default=True,
    type=click.IntRange(0),
    help="Prompt tokens per step while sequences decode (bounds inter-token latency; raised to "
    "fill the CUDA graph the step is padded to; 0: no cap).",
)
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True)
@click.option("--enforce-eager", is_flag=True, help="No CUDA graphs.")
@click.option(
    "--max-prefill-graph-tokens",
    default=2048,
    show_default=True,
    type=click.IntRange(0),
    help="Prefill/mixed steps up to this many tokens replay CUDA graphs (0: eager).",
)
@click.option(
    "--decode-blas",
    default="measured",
    show_default=True,
    type=click.Choice(DECODE_BLAS),
    help="BLAS library of the decode graphs' matmuls: measured per batch size at start-up "
    "(whichever of cuBLAS and cuBLASLt is faster there, and up to 16 rows Berth's skinny kernel "
    "for the projections it runs faster), or one library for all.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@click.option("--access-log/--no-access-log", default=True, show_default=True)
@click.option(
    "--standby-idle-seconds",
    "standby_idle_s",
    type=click.FloatRange(min=0),
    envvar=wire.ENV_STANDBY_IDLE_SECONDS,
    help="Warm standby: park (give the GPU memory back, keep the weights in pinned host RAM) "
    "after this many idle seconds; 0 parks only when asked (POST /admin/park, the node agent) "
    "[default: standby off].",
)
@click.option(
    "--park-deadline",
    "park_deadline_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    envvar=_env("PARK_DEADLINE"),
    help="Seconds running requests may take to finish when parking; then they are preempted "
    "(and computed again after the wake).",
)
@click.option(
    "--wake-timeout",
    "wake_timeout_s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    envvar=_env("WAKE_TIMEOUT"),
    help="Seconds a wake may wait for the node agent's GPU memory; then waiting requests get "
    "503 with Retry-After.",
)
def serve(
    model: str,
    served_model_name: str | None,
    host: str,
    port: int,
    max_waiting_requests: int,
    retry_after_s: int,
    request_timeout_s: float,
    shutdown_delay_s: float,
    drain_grace_s: float,
    reasoning_parser: ReasoningParser | None,
    max_body_bytes: int,
    max_prompt_bytes: int | None,
    header_timeout_s: float,
    body_timeout_s: float,
    keep_alive_timeout_s: int,
    max_connections: int,
    gpu_memory_request: int | None,
    gpu_memory_limit: int | None,
    dtype: str,
    device: str,
    max_model_len: int | None,
    block_size: int,
    num_kv_blocks: int | None,
    kv_cache_bytes: int | None,
    kv_cache_dtype: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_prefill_tokens_while_decoding: int,
    enable_prefix_caching: bool,
    enforce_eager: bool,
    max_prefill_graph_tokens: int,
    decode_blas: str,
    seed: int,
    log_level: str,
    access_log: bool,
    standby_idle_s: float | None,
    park_deadline_s: float,
    wake_timeout_s: float,
) -> None:
    """Serve a model with an OpenAI-compatible API, Prometheus metrics and graceful drain.

    The bearer token of POST /admin/park, /admin/wake and /admin/rotation comes from the
    environment only (BERTH_ADMIN_TOKEN, from the pod's Secret), never from a flag that ``ps``
    would show."""
    from pydantic import SecretStr

    from berth.runtime.engine import EngineConfig
    from berth.runtime.engine.budget import BudgetError, budget_from_flags, read_budget
    from berth.runtime.engine.mps_client import mps_client
    from berth.runtime.server.lifecycle import serve as run_server
    from berth.runtime.server.metrics import MemoryBudget
    from berth.runtime.server.settings import ServerSettings
    from berth.runtime.server.standby import StandbyPolicy

    try:
        budget = budget_from_flags(gpu_memory_request, gpu_memory_limit) or read_budget()
    except BudgetError as exc:
        raise click.UsageError(f"GPU memory budget: {exc}") from exc
    # Before the engine process starts (and with it CUDA): join the GPU's MPS server, if any.
    mps = mps_client(budget, os.environ.get(wire.ENV_MPS_DIR))
    os.environ.update(mps.env)
    click.echo(f"berth: NVIDIA MPS {mps.why}", err=True)
    engine = EngineConfig(
        model=model,
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        block_size=block_size,
        num_kv_blocks=num_kv_blocks,
        kv_cache_bytes=kv_cache_bytes,
        kv_cache_dtype=kv_cache_dtype,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_prefill_tokens_while_decoding=max_prefill_tokens_while_decoding or None,
        enable_prefix_caching=enable_prefix_caching,
        enforce_eager=enforce_eager,
        max_prefill_graph_tokens=max_prefill_graph_tokens,
        decode_blas=decode_blas,
        seed=seed,
        budget=budget,
    )
    try:
        engine.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    settings = ServerSettings(
        engine=engine,
        served_model_name=served_model_name,
        host=host,
        port=port,
        max_waiting_requests=max_waiting_requests,
        retry_after_s=retry_after_s,
        request_timeout_s=request_timeout_s,
        shutdown_delay_s=shutdown_delay_s,
        drain_grace_s=drain_grace_s,
        reasoning_parser=reasoning_parser,
        max_body_bytes=max_body_bytes,
        max_prompt_bytes=max_prompt_bytes,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        keep_alive_timeout_s=keep_alive_timeout_s,
        max_connections=max_connections,
        memory=MemoryBudget(
            budget.request_bytes if budget else None, budget.limit_bytes if budget else None
        ),
        log_level=log_level,
        access_log=access_log,
        standby=StandbyPolicy(standby_idle_s, park_deadline_s, wake_timeout_s),
        admin_token=SecretStr(token) if (token := os.environ.get(wire.ENV_ADMIN_TOKEN)) else None,
    )
    sys.exit(run_server(settings))
