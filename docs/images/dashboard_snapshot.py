"""How ``dashboard.png`` was made: the Grafana dashboard's own PromQL, answered by a real Prometheus
that scraped a real run, drawn with matplotlib (no Grafana installs here).

``record``: a real node agent over one simulated GPU, three real ``berth serve`` runtimes of the
random-weight tiny model on the CPU (leasing their GPU memory from the agent as pods do), a real
Prometheus scraping them every second (the agent's ``/metrics`` on its ``--metrics-port``), and a
scripted load: two busy services, a burst, and a rarely used
one that parks when idle and wakes on its next request. Every panel query of
``charts/berth/dashboards/berth.json`` is then read back over the run (``query_range``) into a
JSON file. ``plot``: that file as one picture (needs matplotlib; the scheduler row needs an
operator and is left out).

    python docs/images/dashboard_snapshot.py record /tmp/snapshot.json
    python docs/images/dashboard_snapshot.py plot /tmp/snapshot.json docs/images/dashboard.png
"""

import json
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "berth" / "dashboards" / "berth.json"
GPU = "GPU-dashboard-snapshot"
WEIGHTS = 886_016  # the tiny model's fp32 weights
CHUNK = 65_536  # a KV chunk of the tiny model on the CPU
REQUEST = WEIGHTS + 8 * CHUNK
CAPACITY = 2 * REQUEST + 6 * CHUNK  # two resident tenants and a burst; a third waits or parks
# name -> (request, limit, idle seconds before it parks; 0 = only when the agent asks)
TENANTS = {
    "chat": (REQUEST, REQUEST + 6 * CHUNK, 0),
    "coder": (REQUEST, REQUEST, 0),
    "summarizer": (REQUEST, REQUEST, 15),
}
RATE_WINDOW = "10s"
Obj = dict[str, Any]


def load(url: str, name: str, streams: int, seconds: float, errors: list[str]) -> None:
    """``streams`` closed-loop clients of 32-token completions for ``seconds``."""
    import httpx

    def client(seed: int) -> None:
        deadline = time.monotonic() + seconds
        prompt = [(7 * j + seed) % 500 + 3 for j in range(40)]
        while time.monotonic() < deadline:
            body = {"model": name, "prompt": prompt, "max_tokens": 32, "temperature": 0.0,
                    "ignore_eos": True}  # fmt: skip
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=180)
            if response.status_code != 200:
                errors.append(f"{name}: {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def panel_queries() -> list[tuple[str, list[tuple[str, str]], str]]:
    """(title, [(PromQL, legend)], unit) per panel, Grafana's variables filled in."""
    board = json.loads(DASHBOARD.read_text())
    filled = {"$__rate_interval": RATE_WINDOW, "$gpu": ".*", "$model": ".*"}
    out = []
    for panel in board["panels"]:
        if panel["type"] != "timeseries":
            continue
        targets = []
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in filled.items():
                expr = expr.replace(variable, value)
            targets.append((expr, target["legendFormat"]))
        out.append((panel["title"], targets, panel["fieldConfig"]["defaults"]["unit"]))
    return out


def query_range(url: str, expr: str, start: float, end: float) -> list[Obj]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 2})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as response:
        result: list[Obj] = json.loads(response.read())["data"]["result"]
        return result


@click.group()
def main() -> None:
    """Record a run's metrics, or plot them."""


@main.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def record(out: Path) -> None:
    """Run the agent, three runtimes, Prometheus and the load; write every panel's series."""
    sys.path.insert(0, str(ROOT / "tests" / "runtime" / "server"))
    from processes import child, serve_tiny

    from berth import wire
    from berth.cluster.cluster import free_port
    from berth.e2e import prometheus

    tmp = Path(tempfile.mkdtemp(prefix="berth-snapshot-"))
    sock, agent_port = tmp / "agent.sock", free_port()
    with ExitStack() as stack:
        stack.enter_context(child(
            [sys.executable, "-m", "berth", "node-agent", "--socket", str(sock),
             "--simulate-gpus", f"{GPU}:{CAPACITY}", "--heartbeat-interval", "0.5",
             "--lease", "5", "--park-deadline", "20", "--metrics-port", str(agent_port)],
            tmp / "agent.log"))  # fmt: skip
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline:
                raise click.ClickException(f"no agent socket; see {tmp / 'agent.log'}")
            time.sleep(0.2)
        urls = {}
        for name, (request, limit, idle) in TENANTS.items():
            urls[name], _ = serve_tiny(
                stack, tmp / f"{name}.log", name, (request, limit, GPU), sock,
                env={wire.ENV_STANDBY_IDLE_SECONDS: str(idle)},
                flags=("--served-model-name", name, "--max-num-seqs", "8", "--wake-timeout", "120"),
            )  # fmt: skip
        targets = [u.removeprefix("http://") for u in urls.values()]
        targets.append(f"127.0.0.1:{agent_port}")
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                  "scrape_configs": [{"job_name": "berth", "static_configs": [{"targets": targets}]}]}  # fmt: skip
        url = stack.enter_context(prometheus.serving(config, tmp))
        import httpx

        for runtime in urls.values():  # every runtime up before the clock starts
            while True:
                try:
                    if httpx.get(f"{runtime}/health", timeout=5).json().get("state") != "loading":
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        start, errors = time.time(), list[str]()
        phases = [
            threading.Thread(target=load, args=(urls["chat"], "chat", 3, 150, errors)),
            threading.Thread(target=load, args=(urls["coder"], "coder", 2, 70, errors)),
            threading.Thread(target=load, args=(urls["summarizer"], "summarizer", 1, 10, errors)),
        ]
        for thread in phases:
            thread.start()
        time.sleep(60)
        burst = threading.Thread(target=load, args=(urls["chat"], "chat", 6, 30, errors))
        burst.start()
        time.sleep(40)
        wake = threading.Thread(target=load, args=(urls["summarizer"], "summarizer", 2, 40, errors))
        wake.start()
        for thread in [*phases, burst, wake]:
            thread.join()
        time.sleep(10)
        end = time.time()
        series = [
            {"title": title, "unit": unit,
             "targets": [{"expr": expr, "legend": legend, "result": query_range(url, expr, start, end)}
                         for expr, legend in targets]}
            for title, targets, unit in panel_queries()
        ]  # fmt: skip
    out.write_text(json.dumps({"start": start, "end": end, "errors": errors, "panels": series}))
    click.echo(f"{len(series)} panels, {end - start:.0f} s, {len(errors)} failed requests -> {out}")


class Labels(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend; the run's one GPU is just "GPU"."""
    filled = template.replace("{{", "{").replace("}}", "}")
    return filled.format_map(Labels(labels, gpu="GPU")).strip()


@main.command()
@click.argument("recorded", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("png", type=click.Path(dir_okay=False, path_type=Path))
def plot(recorded: Path, png: Path) -> None:
    """Draw the recorded panels that have data, two to a row, as the dashboard lays them out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.loads(recorded.read_text())
    panels = [p for p in run["panels"] if any(t["result"] for t in p["targets"])]
    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(16, 3.4 * rows), squeeze=False)
    scale = {"bytes": (2**20, "MiB"), "s": (1e-3, "ms")}
    for axis, panel in zip(axes.flat, panels, strict=False):
        divisor, unit = scale.get(panel["unit"], (1, panel["unit"]))
        for target in panel["targets"]:
            for series in target["result"]:
                times = [float(t) - run["start"] for t, _ in series["values"]]
                values = [float(v) / divisor for _, v in series["values"]]
                axis.plot(times, values, label=legend(target["legend"], series["metric"]), lw=1.4)
        axis.set_title(panel["title"], fontsize=11, loc="left")
        axis.set_ylabel({"ops": "per s", "short": "", "percentunit": "fraction"}.get(unit, unit))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left", ncol=2)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("seconds into the run")
    figure.suptitle("Berth dashboard: one simulated GPU, three tiny-model runtimes on the CPU, "
                    "a real Prometheus", fontsize=13)  # fmt: skip
    figure.tight_layout()
    figure.savefig(png, dpi=90)
    click.echo(f"{len(panels)} panels -> {png}")


if __name__ == "__main__":
    main()
