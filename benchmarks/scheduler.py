"""GPU scheduler benchmark on the local control plane: N kwok nodes x 8 GPUs, M InferenceServices.

    python benchmarks/scheduler.py --nodes 500 --services 5000

1. A real control plane (etcd, kube-apiserver, controller-manager, kube-scheduler, kwok) with
   the GPU nodes; the CRDs installed.
2. The reconciler (``berth operator --no-scheduler``) turns M InferenceServices with random
   fractions (1/8 .. 1) into Deployments and Services; the controller-manager makes M Pending
   pods. The benchmark then waits until the control plane is quiet (writes other than kwok's
   node heartbeats below 5/s), so that the next phase measures binding, not the tail of this one.
3. The scheduler (``berth operator --no-reconciler``, a second process; the reconciler keeps
   running and writes each service's status as its pod is bound) starts on that backlog: the
   clock runs from its process start until every pod is bound; a watch timestamps every bind.
   Pods turn Ready ``--pod-ready-delay`` seconds after their bind (a kwok stage), as a model
   server does once its weights are loaded.
4. Packing is read back from the pods' annotations and compared with the lower bound
   (ceil(sum of requests / capacity)) and with the offline best-fit-decreasing plan of the same
   workload, computed in this process (the reference of the same run).

Prints one table and writes benchmarks/results/scheduler.md.
"""

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from berth import wire
from berth.cluster.cluster import LocalCluster
from berth.e2e.operator_fixtures import OperatorProcess, install_crds
from berth.operator import gpus, render
from berth.operator.api import InferenceService
from berth.operator.inventory import Inventory
from berth.operator.kube import KubeClient, reflect, resource_path
from berth.operator.placement import GpuDemand, GpuLedger, PodRequest, lower_bound_gpus, place
from berth.operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parent.parent
GPU_MIB = 81559
FRACTIONS = [k / 8 for k in range(1, 9)]
NAMESPACE = "bench"


def workload(count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.choice(FRACTIONS) for _ in range(count)]


def service(i: int, fraction: float) -> dict[str, Any]:
    return {
        "apiVersion": f"{wire.GROUP}/{wire.VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": f"svc-{i:05d}", "namespace": NAMESPACE},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/m"}}},
            "gpu": {"fraction": fraction},
        },
    }


def rendered_pod(i: int, fraction: float) -> dict[str, Any]:
    """The pod the Deployment controller would make from ``render.deployment`` for service i."""
    model = InferenceService.model_validate({**service(i, fraction), "metadata": {
        **service(i, fraction)["metadata"], "uid": "benchmark"}})  # fmt: skip
    template = render.deployment(model, OperatorSettings())["spec"]["template"]
    metadata = {**template["metadata"], "name": f"svc-{i:05d}-0", "namespace": NAMESPACE}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


class BindClock:
    """Watches berth pods and stamps the moment each is first seen bound."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.bound: dict[str, float] = {}
        self.pods = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.seen: set[str] = set()

    def _listed(self, items: list[dict[str, Any]]) -> None:
        for pod in items:
            self._event("ADDED", pod)

    def _event(self, kind: str, pod: dict[str, Any]) -> None:
        key = gpus.pod_key(pod)
        with self.lock:
            if kind != "DELETED":
                self.seen.add(key)
            if pod["spec"].get("nodeName") and key not in self.bound:
                self.bound[key] = time.monotonic()

    def start(self) -> None:
        path = resource_path("v1", "Pod", NAMESPACE)
        threading.Thread(target=reflect, daemon=True, args=(self.client, path, self._listed, self._event, self.stop),
                         kwargs={"fieldSelector": f"spec.schedulerName={wire.SCHEDULER_NAME}"}).start()  # fmt: skip

    def wait(
        self, what: str, done: Callable[[], bool], timeout: float, every: float = 0.5
    ) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return time.monotonic()
            time.sleep(every)
        raise TimeoutError(f"{what} not done in {timeout:.0f}s")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def operator_process(cluster: LocalCluster, log_dir: Path, *flags: str) -> OperatorProcess:
    """``berth operator`` with ``flags``, started; it dies with the benchmark. The benchmark runs
    the two loops as two processes on purpose, so neither campaigns for the one Lease."""
    log_dir.mkdir(parents=True, exist_ok=True)
    process = OperatorProcess(cluster, log_dir, "--no-leader-elect", *flags)
    process.start()
    return process


MUTATING = {"POST", "PUT", "PATCH", "DELETE", "APPLY", "CREATE", "UPDATE"}
REQUESTS = "apiserver_request_total"


def api_writes(client: KubeClient) -> dict[str, float]:
    """Mutating requests the API server has served so far, by resource[/subresource]."""
    text = client.http.get("/metrics").text  # megabytes: parse only the lines wanted
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(REQUESTS + "{"))
    writes: dict[str, float] = {}
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            labels = sample.labels
            if sample.name != REQUESTS or labels.get("verb") not in MUTATING:
                continue
            key = labels["resource"] + (
                f"/{labels['subresource']}" if labels.get("subresource") else ""
            )
            writes[key] = writes.get(key, 0.0) + sample.value
    return writes


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (0 for one that is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used[name] = (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, ProcessLookupError):
            used[name] = 0.0
    return used


class Costs:
    """API writes and CPU seconds per phase: where a machine's capacity went."""

    def __init__(self, client: KubeClient, pids: dict[str, int]) -> None:
        self.client, self.pids = client, pids
        self.phases: dict[str, dict[str, dict[str, float]]] = {}
        self._mark = self._snapshot()

    def _snapshot(self) -> tuple[dict[str, float], dict[str, float]]:
        return api_writes(self.client), cpu_seconds(self.pids)

    def phase(self, name: str) -> None:
        (writes0, cpu0), (writes1, cpu1) = self._mark, self._snapshot()
        self._mark = (writes1, cpu1)
        self.phases[name] = {
            "writes": {
                k: v - writes0.get(k, 0.0) for k, v in writes1.items() if v > writes0.get(k, 0.0)
            },
            "cpu_s": {k: round(v - cpu0.get(k, 0.0), 1) for k, v in cpu1.items()},
        }


HEARTBEATS = {"leases", "nodes/status"}  # kwok's simulated kubelets, whatever else happens


def settle(client: KubeClient, timeout: float, quiet_per_s: float = 5.0) -> float:
    """Wait until the control plane has caught up (writes other than heartbeats below
    ``quiet_per_s`` for two samples in a row); returns the seconds waited."""
    started, quiet = time.monotonic(), 0
    before = api_writes(client)
    while time.monotonic() - started < timeout:
        time.sleep(2.0)
        now = api_writes(client)
        busy = sum(v - before.get(k, 0.0) for k, v in now.items() if k not in HEARTBEATS) / 2.0
        before = now
        quiet = quiet + 1 if busy < quiet_per_s else 0
        if quiet == 2:
            return time.monotonic() - started
    raise TimeoutError(f"the control plane did not settle in {timeout:.0f}s")


def list_all(client: KubeClient, path: str) -> list[dict[str, Any]]:
    """Every object under ``path``, 500 per request (one big list can outlast a busy server)."""
    items: list[dict[str, Any]] = []
    token = ""
    while True:
        page = client.get(path, limit="500", **({"continue": token} if token else {}))
        items += page.get("items") or []
        token = page["metadata"].get("continue", "")
        if not token:
            return items


def packing(cluster_pods: list[dict[str, Any]], capacity: int) -> tuple[int, int]:
    """(GPUs used, GPUs over capacity), from the pods' annotations."""
    ledger = gpus.ledger_from_pods(cluster_pods)
    over = sum(1 for used in ledger.resident.values() if used > capacity)
    return len(ledger.used_gpus()), over


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    inventory = Inventory.model_validate(
        {"nodes": [{"name": "gpu", "count": args.nodes, "gpus": 8, "gpuProduct": "NVIDIA-H100-80GB-HBM3",
                    "gpuMemoryMiB": GPU_MIB, "cpu": "192", "memory": "2Ti", "pods": 250}]}
    )  # fmt: skip
    fractions = workload(args.services, args.seed)
    capacity = GPU_MIB * 2**20
    result: dict[str, Any] = {
        "nodes": args.nodes,
        "gpus": args.nodes * 8,
        "services": args.services,
        "via": args.via,
        "pod_ready_delay_s": args.pod_ready_delay,
    }
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        state = Path(tmp)
        t = time.monotonic()
        cluster = LocalCluster(state_dir=state / "cluster", inventory=inventory, attach=True,
                               pod_ready_delay_s=args.pod_ready_delay)  # fmt: skip
        say(f"starting the control plane with {args.nodes} GPU nodes")
        cluster.up(timeout=600)
        result["cluster_up_s"] = time.monotonic() - t
        install_crds(cluster)
        cluster.kubectl("create", "namespace", NAMESPACE)
        client = KubeClient.from_config(cluster.kubeconfig, pool=16)
        clock = BindClock(client)
        clock.start()
        costs = Costs(client, {**cluster.pids, "benchmark": os.getpid()})

        t = time.monotonic()
        reconciler: OperatorProcess | None = None
        if args.via == "reconciler":
            say(f"reconciler only: creating {args.services} InferenceServices")
            reconciler = operator_process(cluster, state / "reconciler", "--no-scheduler")
            costs.pids["operator (reconciler)"] = reconciler.pid
            path = resource_path(f"{wire.GROUP}/{wire.VERSION}", "InferenceService", NAMESPACE)
            bodies = [service(i, f) for i, f in enumerate(fractions)]
        else:
            say(f"creating {args.services} pods from the reconciler's rendered pod template")
            os.environ["BERTH_REQUIRE_OWNER"] = "false"  # bare pods: no InferenceService owns them
            path = resource_path("v1", "Pod", NAMESPACE)
            bodies = [rendered_pod(i, f) for i, f in enumerate(fractions)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda body: client.post(path, body), bodies))
        result["create_s"] = time.monotonic() - t
        clock.wait(
            "all pods created", lambda: len(clock.seen) >= args.services, timeout=args.timeout
        )
        result["pods_created_s"] = time.monotonic() - t
        say(f"{len(clock.seen)} pods Pending; waiting for the control plane to catch up")
        result["settle_s"] = settle(client, timeout=args.timeout)
        if reconciler is not None:
            result["reconciler_rss_mib"] = peak_rss_mib(reconciler.pid)
        costs.phase("create")

        say("starting the scheduler")
        scheduler = operator_process(cluster, state / "scheduler", "--no-reconciler")
        costs.pids["operator (scheduler)"] = scheduler.pid
        start = time.monotonic()
        done = clock.wait(
            "all pods bound", lambda: len(clock.bound) >= args.services, timeout=args.timeout
        )
        result["scheduler_rss_mib"] = peak_rss_mib(scheduler.pid)
        stamps = sorted(clock.bound.values())
        result["all_bound_s"] = done - start
        result["first_bind_s"] = stamps[0] - start
        result["binds_per_s"] = len(stamps) / max(stamps[-1] - stamps[0], 1e-9)
        per_second: dict[int, int] = {}
        for s in stamps:
            per_second[int(s - stamps[0])] = per_second.get(int(s - stamps[0]), 0) + 1
        full_seconds = [per_second.get(i, 0) for i in range(int(stamps[-1] - stamps[0]))]
        result["slowest_full_second"] = min(full_seconds or [len(stamps)])
        windows = [sum(full_seconds[i : i + 5]) / 5 for i in range(len(full_seconds) - 4)]
        result["slowest_5s_window"] = min(windows or [result["binds_per_s"]])
        costs.phase("bind")
        result["costs"] = costs.phases

        say("all bound; reading the placements back")
        pods = list_all(client, resource_path("v1", "Pod", NAMESPACE))
        result["gpus_used"], result["gpus_over_capacity"] = packing(pods, capacity)
        demands = [GpuDemand(fraction=f) for f in fractions]
        result["lower_bound"] = lower_bound_gpus(demands, capacity)
        nodes = gpus.nodes_from_inventory(inventory)
        requests = [
            PodRequest(f"{NAMESPACE}/p{i}", f"{NAMESPACE}/s{i}", d) for i, d in enumerate(demands)
        ]
        offline = GpuLedger(
            d.allocation for d in place(nodes, GpuLedger(), requests) if d.allocation
        )
        result["offline_bfd_gpus"] = len(offline.used_gpus())
        for process in (reconciler, scheduler):
            if process is not None:
                process.stop()
        clock.stop.set()
        client.close()
        cluster.down()
    return result


def table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in [header, *rows])
    lines = [f"| {header[0].ljust(width)} | {header[1]} |", f"| {'-' * width} | --- |"]
    return "\n".join(lines + [f"| {k.ljust(width)} | {v} |" for k, v in rows]) + "\n"


def report(r: dict[str, Any]) -> str:
    over = r["gpus_used"] / r["lower_bound"] - 1
    delay = r["pod_ready_delay_s"]
    rows = [
        ("cluster", f"{r['nodes']} kwok nodes x 8 GPUs = {r['gpus']} GPUs (H100 80GB labels)"),
        ("workload", f"{r['services']} InferenceServices x 1 replica, fraction uniform in 1/8..1"),
        ("pods made via", r["via"]),
        ("pod start-up (bind -> Ready)", f"{delay:.0f} s (kwok stage)" if delay else "instant"),
        (
            "objects posted -> all pods Pending",
            f"{r['pods_created_s']:.1f} s (create requests {r['create_s']:.1f} s)",
        ),
        ("then until the control plane is quiet", f"{r['settle_s']:.1f} s"),
        (
            "scheduler: start -> all pods bound",
            f"{r['all_bound_s']:.1f} s (first bind at {r['first_bind_s']:.1f} s)",
        ),
        ("binds per second (first to last bind)", f"{r['binds_per_s']:.0f}"),
        ("slowest 5-second window", f"{r['slowest_5s_window']:.0f} binds/s"),
        ("slowest full second", f"{r['slowest_full_second']} binds"),
        ("GPUs used / lower bound", f"{r['gpus_used']} / {r['lower_bound']} (+{100 * over:.2f}%)"),
        ("offline BFD plan of the same workload", f"{r['offline_bfd_gpus']} GPUs"),
        ("GPUs over capacity", str(r["gpus_over_capacity"])),
        ("peak RSS: scheduler process", f"{r['scheduler_rss_mib']:.0f} MiB"),
    ]
    if "reconciler_rss_mib" in r:
        rows.append(("peak RSS: reconciler process", f"{r['reconciler_rss_mib']:.0f} MiB"))
    text = table(("metric", "value"), rows)
    for phase, cost in r.get("costs", {}).items():
        writes = cost["writes"]
        total = sum(writes.values())
        top = sorted(writes.items(), key=lambda kv: -kv[1])
        rows = [("all", f"{total:.0f} ({total / r['services']:.1f} per service)")]
        rows += [
            (k, f"{v:.0f} ({v / r['services']:.2f})") for k, v in top if v >= r["services"] / 20
        ]
        rows += [
            (f"CPU s: {k}", f"{v:.1f}")
            for k, v in sorted(cost["cpu_s"].items(), key=lambda kv: -kv[1])
            if v
        ]
        text += f"\n**Phase `{phase}`: API writes by resource, CPU seconds by process**\n\n"
        text += table(("", "value"), rows)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--via",
        choices=["reconciler", "pods"],
        default="reconciler",
        help="make the pods through the reconciler (InferenceServices), or post the pods it "
        "would render directly (measures the scheduler alone, where kopf cannot keep up)",
    )
    parser.add_argument(
        "--pod-ready-delay",
        type=float,
        default=60.0,
        help="seconds from bind to Running/Ready (kwok), the model load of a real pod; 0 = kwok's "
        "instant start, whose status writes then compete with the binds",
    )
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "scheduler.md"
    )
    args = parser.parse_args()
    result = run(args)
    say(json.dumps(result))  # the raw numbers, whatever happens to the table
    table = report(result)
    print(table)
    if args.out:
        header = (
            "# GPU scheduler benchmark\n\n"
            f"`python benchmarks/scheduler.py --nodes {args.nodes} --services {args.services} --via {args.via}` on "
            f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, shared), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + table)
    ok = result["binds_per_s"] >= 100 and result["gpus_used"] <= math.ceil(
        1.03 * result["lower_bound"]
    )
    print("targets (>= 100 binds/s, within 3% of the lower bound):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
