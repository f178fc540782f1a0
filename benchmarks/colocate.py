"""Co-location benchmark: several ``berth serve`` processes on one GPU, each inside its share.

(a) ``--mode a``: three models of different sizes (``--shapes``) on one GPU under a real
``berth node-agent``, first with fixed shares (request == limit, proportional to the weights,
or with ``--fixed-split equal`` the same for every model, as a user setting ``fraction: 0.33``
would; summing to the card minus ``--margin-gib``), then with request/limit pairs (each request
``--request-fraction`` of its fixed share, each limit the card minus the other two requests, so
a busy model may burst into whatever the others leave). The load takes turns: at each
concurrency level each model in turn gets ``--concurrency`` closed-loop streams while the other
two are idle (the pattern where memory left idle by one model can serve another). Per turn:
output throughput, p50 end-to-end latency and TTFT, and the memory each runtime held (the
agent's ledger) and used (NVML, from outside: this process holds no CUDA context), checked
against its grant at every sample. The raw results go to a JSON file beside the report after
each layout, so a run cut short still leaves data (``--render`` turns that file into the report).

(b) ``--mode b`` (default): two copies of one model, each given half of the GPU as its budget
(``--gpu-memory-request = --gpu-memory-limit = free/2``), loaded together at each concurrency
level, against one copy given the whole GPU under twice the load; combined output throughput
and p50 end-to-end latency. While both halves serve, the device memory of every GPU process is
read from outside the runtimes (NVML): each must stay within its share and their sum within the
card.

Requests as in ``serve.py`` (random prompt ids, ``ignore_eos``, streamed, locust closed loop).
Run on the GPU machine after installing ``serve_wheels.sh``'s wheels::

    python benchmarks/colocate.py --mode a --model-cache /tmp/berth-models \\
        --out $OUT/colocate-a.md
    python benchmarks/colocate.py --shape llama-3-8b --model-cache /tmp/berth-models \\
        --out $OUT/colocate-h200.md

(a) on the CPU against a simulated GPU, to check the whole path (locust in a side directory)::

    python benchmarks/colocate.py --mode a --device cpu --shapes tiny,tiny-qwen3,tiny-llama-3.2 \\
        --concurrency 2,8 --prompt-tokens 64 --output-tokens 16 --warmup 2 --duration 5 \\
        --max-num-seqs 8 --load-site /tmp/locust-site --out /tmp/colocate-a.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve  # noqa: E402  (benchmarks/serve.py: the server launcher and the locust load)

from berth import wire  # noqa: E402
from berth.agent_protocol import TenantView  # noqa: E402
from berth.runtime.agent import gpus  # noqa: E402
from berth.runtime.agent.mps import MpsDaemons, prepare  # noqa: E402
from berth.runtime.engine import nvml  # noqa: E402
from berth.runtime.engine.mps_client import PID_FILE  # noqa: E402
from berth.runtime.server.agent_client import AgentClient, AgentError  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20


@dataclass
class TenantMemory:
    """One tenant's memory over a watch: peaks of what the agent granted and saw held, and of
    what NVML saw its engine process use; ``headroom`` is the least grant - used over the
    samples (negative: it held more than its grant)."""

    request: int
    limit: int
    granted: int = 0
    held: int = 0
    used: int = 0
    headroom: int | None = None
    samples: int = 0


class MemoryWatch:
    """Samples every GPU process's memory (NVML) every ``period`` s; keeps the maxima. Given
    the node agent, also each tenant's grant, read before and after the NVML sample so that a
    resize between the two reads never looks like an overrun (the runtime maps only after a
    grant and releases only after it unmapped)."""

    def __init__(
        self, period: float = 0.5, agent: AgentClient | None = None, uuid: str | None = None
    ) -> None:
        self.period = period
        self.agent = agent
        self.uuid = uuid
        self.peak_per_pid: dict[int, int] = {}
        self.peak_device_used = 0
        self.tenants: dict[str, TenantMemory] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            before = self._views()
            per_pid = nvml.all_process_bytes(self.uuid)
            after = self._views()
            for pid, used in per_pid.items():
                self.peak_per_pid[pid] = max(self.peak_per_pid.get(pid, 0), used)
            mem = nvml.device_memory(self.uuid)
            if mem is not None:
                self.peak_device_used = max(self.peak_device_used, mem[1])
            for name, view in after.items():
                m = self.tenants.setdefault(
                    name, TenantMemory(view.request_bytes, view.limit_bytes)
                )
                m.granted = max(m.granted, view.granted_bytes)
                m.held = max(m.held, view.held_bytes)
                if view.pid in per_pid:
                    used = per_pid[view.pid]
                    earlier = before.get(name)
                    grant = max(view.granted_bytes, earlier.granted_bytes if earlier else 0)
                    m.used = max(m.used, used)
                    headroom = grant - used
                    m.headroom = headroom if m.headroom is None else min(m.headroom, headroom)
                    m.samples += 1

    def _views(self) -> dict[str, TenantView]:
        if self.agent is None:
            return {}
        try:
            ledger = self.agent.ledger()
        except AgentError:
            return {}
        return {t.tenant: t for gpu in ledger.gpus for t in gpu.tenants}

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _load_all(args: argparse.Namespace, urls: list[str], users: int, vocab: int) -> list[dict]:
    """The same closed-loop load on every server at once; one result per server."""

    def one(url: str) -> dict:
        extra = ["--url", url, "--users", str(users), "--vocab-size", str(vocab)]
        return serve._child("_load", args, extra, args.load_site)

    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(one, urls))


def _serve_flags(args: argparse.Namespace, share: int | None) -> list[str]:
    flags = ["--max-num-seqs", str(args.max_num_seqs), "--log-level", "info", *_cap_flags(args)]
    if share is not None:
        flags += ["--gpu-memory-request", str(share), "--gpu-memory-limit", str(share)]
    return flags


def _cap_flags(args: argparse.Namespace) -> list[str]:
    """The runtimes' cap on prompt tokens per step beside decodes, when the run sets one."""
    if args.prefill_cap is None:
        return []
    return ["--max-prefill-tokens-while-decoding", str(args.prefill_cap)]


def _cap_text(cap: int | None) -> str:
    return "the runtime's default (512)" if cap is None else "no cap" if cap == 0 else str(cap)


def gpu_uuid() -> str:
    """The first GPU's UUID, as the node agent discovers it (NVML)."""
    return gpus.nvml()[0].uuid


@contextlib.contextmanager
def mps_daemons(root: Path, uuid: str) -> Iterator[MpsDaemons]:
    """NVIDIA's Multi-Process Service as Berth's node agent runs it (``runtime/agent/mps.py``):
    the GPU's control daemon, its pipes in ``root/<uuid>``; runtimes whose budget names the GPU
    and whose environment has ``BERTH_MPS_DIR`` join it. Their kernels then share the GPU at once
    instead of in time slices, so one half's memory-bound decode can overlap the other's
    compute-bound prefill."""
    prepare(root)
    daemons = MpsDaemons(root, [uuid])
    daemons.start()
    pid_file = root / uuid / PID_FILE
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline, f"MPS control daemon not up: {daemons.state}"
        time.sleep(0.2)
    try:
        yield daemons
    finally:
        daemons.close()


def mps_clients(daemons: MpsDaemons, uuid: str) -> dict[str, str]:
    """What the control daemon says of its servers and their clients."""
    servers = daemons.command(uuid, "get_server_list").split()
    return {s: daemons.command(uuid, f"get_client_list {s}") for s in servers}


def mps_cap_check(root: Path, uuid: str, cap_mib: int) -> dict[str, str]:
    """A client capped at ``cap_mib`` (as a runtime's limit caps it) asks for twice that, with
    torch's allocator and with CUDA's virtual memory API (the KV arena's): what each got."""
    code = f"""
import json
import torch
from berth.runtime.engine.cuda_vmm import VirtualRange
out = {{}}
try:
    x = torch.empty({2 * cap_mib} << 20, dtype=torch.uint8, device="cuda")
    out["torch"] = "allocated"
except Exception as e:
    out["torch"] = "refused: " + str(e).splitlines()[0][:160]
try:
    r = VirtualRange({2 * cap_mib} << 20, torch.device("cuda"))
    r.map(0, r.size)
    out["vmm"] = "mapped"
except Exception as e:
    out["vmm"] = "refused: " + str(e).splitlines()[0][:160]
print(json.dumps(out))
"""
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(root / uuid),
           "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={cap_mib}M", "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-300:]}
    result: dict[str, str] = json.loads(lines[-1])
    return result


def halves_vs_whole(args: argparse.Namespace, tmp: Path, vocab: int) -> tuple[list[dict], dict]:
    mem = nvml.device_memory()
    assert mem is not None, "NVML cannot read the device"
    total, used0, free0 = mem
    share = int(free0 - args.margin_gib * GIB) // 2
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    memory: dict = {"capacity": total, "used_before": used0, "share": share}
    with contextlib.ExitStack() as stack:
        flags, env = _serve_flags(args, share), None
        if args.mps:
            # As under the operator: the budget (with the GPU) from the pod's env, and the MPS
            # folder the pod mounts; the runtime joins the server and caps itself at its limit.
            uuid, root = gpu_uuid(), tmp / "mps"
            daemons = stack.enter_context(mps_daemons(root, uuid))
            flags = _serve_flags(args, None)
            env = {"BERTH_GPU_MEMORY_REQUEST": str(share), "BERTH_GPU_MEMORY_LIMIT": str(share),
                   "BERTH_GPU_UUID": uuid, "BERTH_MPS_DIR": str(root)}  # fmt: skip
        t0 = time.perf_counter()
        urls = [
            stack.enter_context(serve.berth_serve(args, tmp / f"half{i}.log", flags, env))
            for i in range(2)
        ]
        memory["start_s"] = time.perf_counter() - t0
        if args.mps:
            memory["mps_clients"] = mps_clients(daemons, uuid)
            memory["mps_joined"] = [_mps_line(tmp / f"half{i}.log") for i in range(2)]
            memory["mps_cap"] = mps_cap_check(root, uuid, 1024)
        with MemoryWatch() as watch:
            for users in levels:
                print(f"halves: {users} streams each ...", flush=True)
                runs = _load_all(args, urls, users, vocab)
                rows.append({"mode": "2 x 0.5", "users": users, "runs": runs})
        memory["per_process"] = dict(watch.peak_per_pid)
        memory["device_used_peak"] = watch.peak_device_used
    memory["startup"] = [_memory_line(tmp / f"half{i}.log") for i in range(2)]
    with serve.berth_serve(args, tmp / "whole.log", _serve_flags(args, None)) as url:
        for users in levels:
            print(f"whole: {2 * users} streams ...", flush=True)
            runs = _load_all(args, [url], 2 * users, vocab)
            rows.append({"mode": "1 x 1.0", "users": 2 * users, "runs": runs})
    return rows, memory


def _mps_line(log: Path) -> str:
    """What the runtime said of MPS at start (joined, or why not)."""
    lines = [line for line in log.read_text().splitlines() if "NVIDIA MPS" in line]
    return lines[-1].split("NVIDIA MPS ", 1)[1] if lines else "(not logged)"


def _memory_line(log: Path) -> str:
    """The runtime's own start-up measurement (weights, workspace, KV chunks) from its log."""
    lines = [line for line in log.read_text().splitlines() if "memory: weights" in line]
    return lines[-1].split("memory: ", 1)[1] if lines else "(not logged)"


# ---- (a) three models of different sizes: fixed shares vs request/limit pairs -----------------

LAYOUTS = {"fixed": "fixed shares", "burst": "request/limit"}
SETTINGS = ("shapes", "concurrency", "prompt_tokens", "output_tokens", "warmup", "duration",
            "max_num_seqs", "margin_gib", "request_fraction", "request_floor_gib", "device",
            "fixed_split", "prefill_cap")  # fmt: skip


@dataclass(frozen=True)
class Model:
    shape: str
    path: str
    weights_bytes: int  # the safetensors files: what its weights take on the device
    vocab_size: int


Budgets = dict[str, tuple[int, int]]  # shape -> (request, limit) bytes


def fixed_shares(weights: dict[str, int], allocatable: int, split: str = "weights") -> Budgets:
    """request == limit, summing to ``allocatable``: proportional to each model's weights, or
    (``split="equal"``) the same share for every model, which leaves the largest model the
    least room for KV."""
    if split == "equal":
        return {shape: (allocatable // len(weights),) * 2 for shape in weights}
    total = sum(weights.values())
    return {shape: (allocatable * w // total,) * 2 for shape, w in weights.items()}


def burst_pairs(
    fixed: Budgets, fraction: float, allocatable: int, weights: dict[str, int], floor: int
) -> Budgets:
    """Each request ``fraction`` of the fixed share, but at least the weights and ``floor``
    beside them (a runtime measures its activation/graph workspace at start and refuses a
    request that leaves no KV: Llama-3.2-1B on an H100 needs 1.55 GiB, half its fixed share
    left 1.34); each limit whatever the other requests leave of ``allocatable`` (the agent
    grants bursts from memory nobody else is owed)."""
    requests = {
        shape: min(request, max(int(request * fraction), weights[shape] + floor))
        for shape, (request, _) in fixed.items()
    }
    owed = sum(requests.values())
    return {shape: (r, allocatable - (owed - r)) for shape, r in requests.items()}


def _tenant(layout: str, shape: str) -> str:
    """The tenant name a runtime registers under (POD_NAMESPACE/POD_NAME, as in a pod)."""
    return f"bench/{layout}-{shape}"


def make_models(args: argparse.Namespace, cache: Path) -> dict[str, Model]:
    """The random-weight models of ``--shapes`` (made once into ``cache``, all at the same
    time, each in a child process: this one must hold no CUDA context while it measures)."""
    from berth.runtime.engine.tokenizer import Tokenizer

    on_gpu = args.device != "cpu"
    code = (
        "import sys; from berth.runtime.engine.testmodels import make_model; "
        "make_model(sys.argv[1], sys.argv[2], dtype=sys.argv[3], device=sys.argv[4])"
    )
    dtype, device = ("bfloat16", "cuda") if on_gpu else ("float32", "cpu")
    shapes = args.shapes.split(",")
    missing = [s for s in shapes if not (cache / s / "config.json").exists()]
    if missing:
        print(f"making the random-weight models {', '.join(missing)} ...", flush=True)
        makers = [
            subprocess.Popen([sys.executable, "-c", code, s, str(cache / s), dtype, device])
            for s in missing
        ]
        if any(m.wait() != 0 for m in makers):
            raise RuntimeError("making a test model failed (see its output above)")
    return {
        s: Model(
            s,
            str(cache / s),
            sum(f.stat().st_size for f in (cache / s).glob("*.safetensors")),
            Tokenizer(str(cache / s)).vocab_size,
        )
        for s in shapes
    }


@contextlib.contextmanager
def node_agent(sock: Path, log: Path, gpu_flags: list[str]) -> Iterator[AgentClient]:
    """A real ``berth node-agent`` on ``sock``; yields a client once it answers."""
    command = [sys.executable, "-c", "from berth.cli import main; main()", "node-agent",
               "--socket", str(sock), "--heartbeat-interval", "0.5", "--lease", "10",
               "--reclaim-deadline", "5", *gpu_flags]  # fmt: skip
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    client = AgentClient(str(sock))
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the node agent exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(AgentError):
                client.ledger()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the node agent did not answer")
            time.sleep(0.2)
        yield client
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_granting(agent: AgentClient) -> None:
    """A fresh agent grants nothing during its restart grace (it cannot know it is fresh)."""
    while (recovering := agent.ledger().recovering_s) > 0:
        time.sleep(min(recovering, 1.0))


@contextlib.contextmanager
def serving(
    args: argparse.Namespace,
    layout: str,
    models: dict[str, Model],
    budgets: Budgets,
    ctx: dict[str, str],
    extra: Sequence[str] = (),
) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """One ``berth serve`` per model, started together, each with its budget in the env vars
    a pod gets and the agent's socket, plus ``extra`` flags; yields (shape -> URL of those
    that turned ready, shape -> the log's tail of those that did not), so one failed start costs only its turns."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    # What the requests need (one block spare), not the shapes' own (131072 for llama-3.2-1b).
    max_len = args.prompt_tokens + args.output_tokens + 16
    processes: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        for shape, model in models.items():
            request, limit = budgets[shape]
            port = serve._free_port()
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(p for p in paths if p),
                wire.ENV_GPU_MEMORY_REQUEST: str(request),
                wire.ENV_GPU_MEMORY_LIMIT: str(limit),
                wire.ENV_GPU_UUID: ctx["uuid"],
                wire.ENV_AGENT_SOCKET: ctx["socket"],
                "POD_NAMESPACE": "bench",
                "POD_NAME": f"{layout}-{shape}",
            }
            command = [sys.executable, "-c", "from berth.cli import main; main()", "serve",
                       "--model", model.path, "--served-model-name", "bench",
                       "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
                       "--no-access-log", "--log-level", "info", "--shutdown-delay", "0",
                       "--max-waiting-requests", "1024",
                       "--max-num-seqs", str(args.max_num_seqs),
                       "--max-model-len", str(max_len), *_cap_flags(args), *extra]  # fmt: skip
            with _log(ctx, layout, shape).open("w") as sink:
                processes[shape] = subprocess.Popen(
                    command, stdout=sink, stderr=subprocess.STDOUT, env=env
                )
            urls[shape] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        failed: dict[str, str] = {}
        for shape, url in urls.items():
            while not _ready(url):
                if processes[shape].poll() is not None or time.monotonic() > deadline:
                    failed[shape] = _log(ctx, layout, shape).read_text()[-3000:]
                    print(f"berth serve ({layout}, {shape}) did not start:\n{failed[shape]}")
                    break
                time.sleep(1)
        yield {s: u for s, u in urls.items() if s not in failed}, failed
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()


def _log(ctx: dict[str, str], layout: str, shape: str) -> Path:
    return Path(ctx["tmp"]) / f"{layout}-{shape}.log"


def _ready(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
        return bool(r.status == 200)
    return False


def _turn(args: argparse.Namespace, model: Model, url: str, users: int) -> dict:
    """``users`` closed-loop streams on one model for warm-up + duration (serve.py's load)."""
    child = argparse.Namespace(**{**vars(args), "model_dir": model.path})
    extra = ["--url", url, "--users", str(users), "--vocab-size", str(model.vocab_size)]
    try:
        return serve._child("_load", child, extra, args.load_site)
    except subprocess.CalledProcessError as e:
        return {"error": f"the load failed: {(e.stderr or '')[-2000:]}"}


def run_layout(
    args: argparse.Namespace,
    layout: str,
    models: dict[str, Model],
    budgets: Budgets,
    agent: AgentClient,
    ctx: dict[str, str],
    entry: dict,
    save: Callable[[], None],
) -> None:
    """Start the three runtimes with ``budgets``; at each level each model takes its turn.
    Fills ``entry`` as it goes and calls ``save`` after every turn."""
    entry.update({"layout": layout, "budgets": budgets, "turns": [], "startup": {}})
    save()
    t0 = time.perf_counter()
    with serving(args, layout, models, budgets, ctx) as (urls, failed):
        entry["start_s"] = time.perf_counter() - t0
        entry["failed"] = failed
        entry["leased"] = sorted(t.tenant for g in agent.ledger().gpus for t in g.tenants)
        print(f"[{_clock(ctx)}] {layout}: ready in {entry['start_s']:.0f} s, leased: "
              f"{', '.join(entry['leased']) or 'none'}", flush=True)  # fmt: skip
        for users in (int(c) for c in args.concurrency.split(",")):
            for shape, model in models.items():
                if shape not in urls:
                    continue
                with MemoryWatch(agent=agent, uuid=ctx.get("nvml_uuid") or None) as watch:
                    run = _turn(args, model, urls[shape], users)
                memory = {
                    s: asdict(watch.tenants[_tenant(layout, s)])
                    for s in models
                    if _tenant(layout, s) in watch.tenants
                }
                entry["turns"].append({"users": users, "busy": shape, "run": run,
                                       "memory": memory})  # fmt: skip
                save()
                held = memory.get(shape, {}).get("held", 0)
                print(f"[{_clock(ctx)}] {layout} {shape} x{users}: "
                      f"{run.get('output_tokens_per_s', float('nan')):.0f} tok/s, "
                      f"E2E p50 {run.get('e2e_s_p50', float('nan')):.2f} s, held "
                      f"{held / MIB:.0f} MiB{' ' + run['error'] if 'error' in run else ''}",
                      flush=True)  # fmt: skip
    entry["startup"] = {s: _memory_line(_log(ctx, layout, s)) for s in urls}


def _clock(ctx: dict[str, str]) -> str:
    return f"{time.perf_counter() - float(ctx['t0']):6.1f} s"


@dataclass(frozen=True)
class AgentGpu:
    """The one GPU a benchmark's node agent manages: the card (or, on the CPU, a simulated one
    of ``--cpu-capacity-mib``), what is allocatable on it, and the agent's flags for it."""

    ctx: dict[str, str]  # tmp, socket, t0, uuid (the runtimes' GPU) and, on a card, nvml_uuid
    name: str
    capacity: int
    used_before: int
    allocatable: int
    agent_flags: list[str]

    @property
    def nvml_uuid(self) -> str | None:
        return self.ctx.get("nvml_uuid")


def agent_gpu(args: argparse.Namespace, tmp: Path, cpu_uuid: str) -> AgentGpu:
    """The first GPU less what is in use and ``--margin-gib`` (reserved from the agent), or on
    ``--device cpu`` a simulated GPU named ``cpu_uuid``."""
    from berth.runtime.agent import gpus

    ctx = {"tmp": str(tmp), "socket": str(tmp / "agent.sock"), "t0": str(time.perf_counter())}
    if args.device == "cpu":
        allocatable = int(args.cpu_capacity_mib * MIB)
        ctx["uuid"] = cpu_uuid
        flags = ["--simulate-gpus", f"{cpu_uuid}:{allocatable}"]
        return AgentGpu(ctx, "CPU (one simulated GPU)", allocatable, 0, allocatable, flags)
    gpu = gpus.nvml()[0]
    mem = nvml.device_memory(gpu.uuid)
    assert mem is not None, "NVML cannot read the device"
    total, used0, _ = mem
    allocatable = total - used0 - int(args.margin_gib * GIB)
    ctx["uuid"] = ctx["nvml_uuid"] = gpu.uuid
    flags = ["--reserve", str(total - allocatable)]
    return AgentGpu(ctx, gpu.name, total, used0, allocatable, flags)


def three_models(args: argparse.Namespace, tmp: Path, json_out: Path) -> dict:
    """(a): the agent, the models, then each layout in turn; the raw results after each."""
    card = agent_gpu(args, tmp, "GPU-colocate-cpu")
    ctx, allocatable, agent_flags = card.ctx, card.allocatable, card.agent_flags
    results: dict = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "device": card.name,
        "capacity": card.capacity,
        "used_before": card.used_before,
        "allocatable": allocatable,
        "versions": _versions(),
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "layouts": [],
    }
    cache = Path(args.model_cache or tmp)
    with node_agent(Path(ctx["socket"]), tmp / "agent.log", agent_flags) as agent:
        models = make_models(args, cache)  # meanwhile the agent's grace runs out
        print(f"[{_clock(ctx)}] models ready", flush=True)
        weights = {s: m.weights_bytes for s, m in models.items()}
        results["weights"] = weights
        fixed = fixed_shares(weights, allocatable, args.fixed_split)
        pairs = burst_pairs(
            fixed, args.request_fraction, allocatable, weights, int(args.request_floor_gib * GIB)
        )
        layouts = {"fixed": fixed, "burst": pairs}
        _wait_granting(agent)

        def save() -> None:
            json_out.write_text(json.dumps(results, indent=1))

        try:
            for layout, budgets in layouts.items():
                entry: dict = {"start_s": float("nan"), "leased": []}
                results["layouts"].append(entry)
                run_layout(args, layout, models, budgets, agent, ctx, entry, save)
                save()
        finally:
            _keep_logs(ctx, models, json_out.with_suffix(".logs.txt"))
    return results


def _versions() -> str:
    from importlib import metadata

    found = []
    for name in ("torch", "triton"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join([*found, f"Python {sys.version.split()[0]}"])


def _keep_logs(ctx: dict[str, str], models: dict[str, Model], out: Path) -> None:
    """The tails of the agent's and the runtimes' logs, for the record."""
    tmp = Path(ctx["tmp"])
    parts = []
    for log in [tmp / "agent.log", *(_log(ctx, lay, s) for lay in LAYOUTS for s in models)]:
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-80:]
            parts.append(f"==== {log.name}\n" + "\n".join(tail))
    out.write_text("\n\n".join(parts) + "\n")


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def _mean(values: list[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return sum(good) / len(good) if len(good) == len(values) and good else float("nan")


def report_three(results: dict, note: str = "") -> str:
    s = results["settings"]
    u, unit = (GIB, "GiB") if results["capacity"] >= 4 * GIB else (MIB, "MiB")
    shapes = s["shapes"].split(",")
    weights = results["weights"]
    budgets = {e["layout"]: e["budgets"] for e in results["layouts"]}
    lines = [
        f"## (a) {len(shapes)} models on one GPU: fixed shares vs request/limit pairs",
        "",
        f"{results['date']}, {results['device']} ({results.get('versions', '')}); "
        f"{s['prompt_tokens']} prompt + "
        f"{s['output_tokens']} output tokens per request (random ids, ignore_eos, streamed); "
        f"locust closed loop, {s['warmup']:g} s warm-up, {s['duration']:g} s measured per "
        f"turn; max_num_seqs {s['max_num_seqs']}; one real `berth node-agent` (heartbeat "
        f"0.5 s). Card {results['capacity'] / u:.1f} {unit}, {results['used_before'] / u:.2f} "
        f"{unit} in use before, {results['allocatable'] / u:.1f} {unit} shared by the runtimes "
        f"({(results['capacity'] - results['used_before'] - results['allocatable']) / u:g} "
        f"{unit} margin). Fixed shares: request = limit, "
        f"{'the same for every model' if s.get('fixed_split') == 'equal' else 'proportional to the weights'}"
        f". Request/limit: each request {s['request_fraction']:g} of the fixed share "
        f"(at least the weights + {s.get('request_floor_gib', 0):g} GiB), "
        f"each limit the shared memory minus the other requests. Prompt tokens per step beside "
        f"decodes: {_cap_text(s.get('prefill_cap'))}.",
        "",
        f"| model | weights ({unit}) | fixed share ({unit}) | request / limit ({unit}) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for shape in shapes:
        fixed = budgets.get("fixed", {}).get(shape, [float("nan")] * 2)
        burst = budgets.get("burst", {}).get(shape, [float("nan")] * 2)
        lines.append(
            f"| `{shape}` | {weights[shape] / u:.2f} | {_fmt(fixed[0] / u, '.2f')} | "
            f"{_fmt(burst[0] / u, '.2f')} / {_fmt(burst[1] / u, '.2f')} |"
        )
    lines += [
        "",
        "Taking turns: at each level each model in turn gets that many streams while the other "
        "two are idle. KV held: the busy runtime's peak holding in the agent's ledger "
        "(weights + workspace + mapped KV chunks).",
        "",
        "| layout | streams | busy model | output tok/s | E2E p50 (s) | TTFT p50 (ms) | "
        f"requests | failures | held peak ({unit}) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    # (layout, streams) -> busy model -> (output tok/s, E2E p50 s)
    summary: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    for entry in results["layouts"]:
        layout = entry["layout"]
        for turn in entry["turns"]:
            run, users = turn["run"], turn["users"]
            tput = run.get("output_tokens_per_s", float("nan"))
            e2e = run.get("e2e_s_p50", float("nan"))
            ttft = run.get("ttft_ms", {}).get("50", float("nan"))
            held = turn["memory"].get(turn["busy"], {}).get("held", float("nan"))
            if not math.isnan(tput):
                summary.setdefault((layout, users), {})[turn["busy"]] = (tput, e2e)
            lines.append(
                f"| {LAYOUTS[layout]} | {users} | `{turn['busy']}` | {_fmt(tput, '.0f')} | "
                f"{_fmt(e2e, '.2f')} | {_fmt(ttft, '.0f')} | {run.get('requests', 0)} | "
                f"{run.get('failures', run.get('error', '?'))} | {_fmt(held / u, '.2f')} |"
            )
    lines += [
        "",
        "Per level, over the models measured in both layouts (the card's mean throughput over "
        "the rotation; the mean of the models' p50):",
        "",
        "| streams | models | fixed tok/s | request/limit tok/s | throughput x | fixed p50 (s) | "
        "request/limit p50 (s) | p50 lower by x |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    levels = sorted({users for (_, users) in summary})
    for users in levels:
        fixed_runs, burst_runs = (
            summary.get(("fixed", users), {}),
            summary.get(("burst", users), {}),
        )
        both = [shape for shape in shapes if shape in fixed_runs and shape in burst_runs]
        f_t, f_p = (_mean([fixed_runs[m][i] for m in both]) for i in (0, 1))
        b_t, b_p = (_mean([burst_runs[m][i] for m in both]) for i in (0, 1))
        lines.append(
            f"| {users} | {len(both)} of {len(shapes)} | {_fmt(f_t, '.0f')} | "
            f"{_fmt(b_t, '.0f')} | {_fmt(b_t / f_t, '.2f')} | "
            f"{_fmt(f_p, '.2f')} | {_fmt(b_p, '.2f')} | {_fmt(f_p / b_p, '.2f')} |"
        )
    lines += [
        "",
        "Targets: request/limit >= 1.5x the throughput and >= 1.7x lower p50 than fixed shares "
        "(NVIDIA Run:ai's published dynamic-vs-static figures: up to 1.4x and 1.7x).",
        "",
        "### Memory of (a), read from outside the runtimes",
        "",
        "Over all turns: the peak grant and holding in the agent's ledger, the peak device "
        "memory of each engine process (NVML, sampled every 0.5 s from this process), and the "
        "least headroom, grant - NVML reading, over the samples (a negative value would mean a "
        "runtime held more than it was granted).",
        "",
        f"| layout | model | request / limit ({unit}) | peak granted | peak held | "
        f"peak used (NVML) | least headroom ({unit}) | within its grant |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for entry in results["layouts"]:
        for shape in shapes:
            seen = [t["memory"][shape] for t in entry["turns"] if shape in t["memory"]]
            if not seen:
                continue
            request, limit = entry["budgets"][shape]
            samples = sum(m["samples"] for m in seen)
            heads = [m["headroom"] for m in seen if m["headroom"] is not None]
            least = min(heads) if heads else None
            verdict = "not measured" if least is None else ("yes" if least >= 0 else "NO")
            lines.append(
                f"| {LAYOUTS[entry['layout']]} | `{shape}` | {request / u:.2f} / "
                f"{limit / u:.2f} | {max(m['granted'] for m in seen) / u:.2f} | "
                f"{max(m['held'] for m in seen) / u:.2f} | "
                f"{max(m['used'] for m in seen) / u:.2f} | "
                f"{'n/a' if least is None else f'{least / u:.2f}'} | {verdict} "
                f"({samples} samples) |"
            )
    lines += ["", "Each runtime's own start-up measurement (its log):", ""]
    for entry in results["layouts"]:
        lines.append(
            f"- {LAYOUTS[entry['layout']]} (all ready in {entry['start_s']:.0f} s; leased from "
            f"the agent: {', '.join(entry['leased']) or 'none'}):"
        )
        lines += [f"  - `{shape}`: {line}" for shape, line in entry["startup"].items()]
        for shape, tail in entry.get("failed", {}).items():
            last = tail.strip().splitlines()[-1] if tail.strip() else "(empty log)"
            lines.append(f"  - `{shape}` did not start: {last}")
    lines.append("")
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def report_halves(args: argparse.Namespace, gpu: str, rows: list[dict], memory: dict) -> str:
    lines = [
        f"# Co-location on {gpu}",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; model `{args.shape}` (random weights, bf16); "
        f"{args.prompt_tokens} prompt + {args.output_tokens} output tokens per request (random "
        f"ids, ignore_eos, streamed); locust closed loop, {args.warmup:g} s warm-up, "
        f"{args.duration:g} s measured per level; max_num_seqs {args.max_num_seqs}.",
        "",
        "## (b) two copies at 0.5 of the GPU each vs one copy at 1.0",
        "",
        *(
            [
                "The two halves ran under NVIDIA MPS as Berth runs it (the node agent's control "
                "daemon for the GPU, `runtime/agent/mps.py`; each runtime's budget and "
                "`BERTH_MPS_DIR` in its environment, as a pod gets them): their kernels share "
                "the GPU at once. The whole copy without.",
                "",
                *(
                    f"- runtime {i}: MPS {line}"
                    for i, line in enumerate(memory.get("mps_joined", []))
                ),
                "- the control daemon's servers and their clients (pids): "
                + "; ".join(
                    f"server {s}: {c or '-'}" for s, c in memory.get("mps_clients", {}).items()
                ),
                "- a third client capped at 1,024 MiB asking for 2,048 MiB: "
                + ", ".join(f"{k}: {v}" for k, v in memory.get("mps_cap", {}).items()),
                "",
            ]
            if args.mps
            else []
        ),
        "| layout | streams in all | output tok/s (sum) | E2E p50 (s) | TTFT p50 (ms) | failures |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_users: dict[tuple[str, int], float] = {}
    for row in rows:
        runs = row["runs"]
        tput = sum(r["output_tokens_per_s"] for r in runs)
        e2e = max(r["e2e_s_p50"] for r in runs)
        ttft = max(r["ttft_ms"]["50"] for r in runs)
        fails = sum(r["failures"] for r in runs)
        streams = row["users"] * len(runs)
        by_users[(row["mode"], streams)] = tput
        lines.append(
            f"| {row['mode']} | {streams} | {tput:.0f} | {e2e:.2f} | {ttft:.0f} | {fails} |"
        )
    lines.append("")
    for (mode, streams), tput in by_users.items():
        if mode == "2 x 0.5" and ("1 x 1.0", streams) in by_users:
            whole = by_users[("1 x 1.0", streams)]
            lines.append(
                f"- {streams} streams: two halves give {tput / whole * 100:.0f}% of one whole "
                f"GPU's throughput (target >= 92%; Run:ai's published figure 77%)."
            )
    share, total = memory["share"], memory["capacity"]
    per = memory["per_process"]
    lines += [
        "",
        "## Memory, read from outside the runtimes (NVML, peak over the load)",
        "",
        f"Card {total / GIB:.1f} GiB, {memory['used_before'] / GIB:.2f} GiB in use before; each "
        f"runtime's share {share / GIB:.2f} GiB; both started and turned ready in "
        f"{memory['start_s']:.0f} s.",
        "",
        "| process | peak device memory (GiB) | within its share |",
        "| ---: | ---: | --- |",
    ]
    for pid, used in sorted(per.items()):
        lines.append(f"| {pid} | {used / GIB:.2f} | {'yes' if used <= share else 'NO'} |")
    lines += ["", "Each runtime's own start-up measurement (its log):", ""]
    lines += [f"- {line}" for line in memory["startup"]]
    lines += [
        "",
        f"Sum of the runtimes: {sum(per.values()) / GIB:.2f} GiB; device in use at peak "
        f"{memory['device_used_peak'] / GIB:.2f} GiB of {total / GIB:.1f} GiB.",
        "",
    ]
    if args.note:
        lines += [args.note, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["a", "b"], default="b",
                        help="a: three models, fixed vs request/limit; b: two halves vs one whole")  # fmt: skip
    parser.add_argument("--shape", default="llama-3-8b", help="(b) the model")
    parser.add_argument(
        "--shapes", default="llama-3.2-1b,qwen3-4b,llama-3-8b", help="(a) the models"
    )
    parser.add_argument(
        "--device", default="cuda", help="(a) only: cpu runs against a simulated GPU"
    )
    parser.add_argument("--model-cache", help="where to make (or find) the test models")
    parser.add_argument("--concurrency", help="streams per half (b; default 8,32) or on the busy "
                        "model (a; default 32,128)")  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-num-seqs", type=int, help="default: 64 (b), 128 (a)")
    parser.add_argument("--margin-gib", type=float, default=1.0, help="left free on the card")
    parser.add_argument("--fixed-split", choices=["weights", "equal"], default="weights",
                        help="(a) fixed shares proportional to the weights or equal")  # fmt: skip
    parser.add_argument("--request-fraction", type=float, default=0.5,
                        help="(a) each request as a fraction of the model's fixed share")  # fmt: skip
    # 4: the 8B's measured workspace at 128 sequences is 2.96 GiB with the allocator's slack,
    # and a request must hold one KV chunk beside it.
    parser.add_argument("--request-floor-gib", type=float, default=4.0,
                        help="(a) each request holds at least the weights and this much")  # fmt: skip
    parser.add_argument("--cpu-capacity-mib", type=float, default=8.0,
                        help="(a) on the CPU: the simulated GPU's memory")  # fmt: skip
    parser.add_argument("--mps", action="store_true",
                        help="(b) the two halves under NVIDIA MPS (the whole copy without)")  # fmt: skip
    parser.add_argument("--prefill-cap", type=int,
                        help="prompt tokens per step beside decodes (the runtime's "
                             "--max-prefill-tokens-while-decoding; 0: no cap; default: its own)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-site", help="extra sys.path entry where locust is installed")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", help="results file (a: the raw results go beside it, .json)")
    parser.add_argument("--render", help="(a) only: write the report of this results JSON")
    args = parser.parse_args()
    if args.mode == "a":
        three_models_main(args)
        return
    args.concurrency = args.concurrency or "8,32"
    args.max_num_seqs = args.max_num_seqs or 64
    args.device = "cuda"
    from berth.runtime.engine.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="berth-colocate-") as tmp:
        target = Path(args.model_cache or tmp) / args.shape
        if not (target / "config.json").exists():
            print(f"making the random-weight {args.shape} model in {target} ...", flush=True)
            # In a child process: this one must hold no CUDA context while it measures.
            code = (
                "import sys; from berth.runtime.engine.testmodels import make_model; "
                "make_model(sys.argv[1], sys.argv[2], dtype='bfloat16', device='cuda')"
            )
            subprocess.run([sys.executable, "-c", code, args.shape, str(target)], check=True)
        args.model_dir = str(target)
        vocab = Tokenizer(args.model_dir).vocab_size
        rows, memory = halves_vs_whole(args, Path(tmp), vocab)
    import torch

    text = report_halves(args, torch.cuda.get_device_name(0), rows, memory)
    out = Path(args.out or ROOT / "benchmarks" / "results" / "colocate-h200.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def three_models_main(args: argparse.Namespace) -> None:
    args.concurrency = args.concurrency or "32,128"
    args.max_num_seqs = args.max_num_seqs or 128
    out = Path(args.out or "colocate-a.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.render:
        results = json.loads(Path(args.render).read_text())
    else:
        # A timeout's SIGTERM: stop the runtimes and keep the logs on the way out.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with tempfile.TemporaryDirectory(prefix="berth-colocate-") as tmp:
            results = three_models(args, Path(tmp), out.with_suffix(".json"))
    text = f"# Co-location on {results['device']}\n\n" + report_three(results, args.note)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
