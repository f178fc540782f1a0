"""``berth crds``, ``berth plan`` and ``berth operator``."""

import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
import yaml

from berth.operator import crd
from berth.operator.settings import OperatorSettings

if TYPE_CHECKING:
    from berth.operator.leader import LeaderElector

DEFAULT_CRD_DIR = Path(__file__).resolve().parent.parent / "crds"


@click.command("crds")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_CRD_DIR,
    show_default=True,
    help="Directory to write the CRD YAML into.",
)
@click.option("--stdout", is_flag=True, help="Print the CRDs instead of writing files.")
def crds(out: Path, stdout: bool) -> None:
    """Generate the CustomResourceDefinitions from the API models."""
    if stdout:
        click.echo("---\n".join(crd.render_crds().values()), nl=False)
        return
    for path in crd.write_crds(out):
        click.echo(f"wrote {path}")


@click.command("plan")
@click.argument(
    "manifests",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--inventory",
    "inventory_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Node inventory YAML (as for `berth cluster up --nodes`); default: 4 x 8 H100 + 1 CPU node.",
)
@click.option("--output", "-o", type=click.Choice(["table", "yaml"]), default="table")
@click.option("--gpu-reserve-mib", type=int, default=None, help="Memory kept free per GPU.")
def plan(
    manifests: tuple[Path, ...],
    inventory_path: Path | None,
    output: str,
    gpu_reserve_mib: int | None,
) -> None:
    """Place InferenceService manifests onto an inventory without a cluster (dry run)."""
    from berth.operator import gpus
    from berth.operator import plan as planning
    from berth.operator.inventory import DEFAULT_INVENTORY, load_inventory

    try:
        inventory = load_inventory(inventory_path) if inventory_path else DEFAULT_INVENTORY
        services = planning.load_services(p.read_text() for p in manifests)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    settings = OperatorSettings.from_env(gpu_reserve_mib=gpu_reserve_mib)
    result = planning.make_plan(
        gpus.nodes_from_inventory(inventory), services, settings.placement_policy
    )
    if output == "yaml":
        click.echo(yaml.safe_dump(planning.plan_summary(result), sort_keys=False), nl=False)
    else:
        click.echo(planning.format_plan(result))
    if any(d.allocation is None for d in result.decisions):
        sys.exit(2)


@click.command("operator")
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Default: $KUBECONFIG, then in-cluster.",
)
@click.option(
    "--namespace", "namespaces", multiple=True, help="Watch only these namespaces (repeatable)."
)
@click.option(
    "--runtime-image", default=None, help="Image of the model runtime (env BERTH_RUNTIME_IMAGE)."
)
@click.option(
    "--scheduler/--no-scheduler", "run_scheduler", default=True, help="Run the GPU scheduler."
)
@click.option(
    "--reconciler/--no-reconciler", "run_reconciler", default=True, help="Run the kopf reconciler."
)
@click.option(
    "--health-port",
    type=int,
    default=None,
    help="Port of /healthz, /readyz and /metrics (env BERTH_HEALTH_PORT, default 8081; 0: any; -1: off).",
)
@click.option(
    "--leader-elect/--no-leader-elect",
    "leader_elect",
    default=None,
    help="Act only while holding the Lease (env BERTH_LEADER_ELECT, default on).",
)
@click.option("--verbose", "-v", is_flag=True)
def operator(
    kubeconfig: Path | None,
    namespaces: tuple[str, ...],
    runtime_image: str | None,
    run_scheduler: bool,
    run_reconciler: bool,
    health_port: int | None,
    leader_elect: bool | None,
    verbose: bool,
) -> None:
    """Run the reconciler (kopf) and the GPU scheduler in one process, once it leads."""
    import threading

    import kopf

    from berth.operator.health import Health, HealthServer
    from berth.operator.kube import KubeClient
    from berth.operator.scheduler import GpuScheduler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    if kubeconfig:
        os.environ["KUBECONFIG"] = str(kubeconfig)  # kopf logs in through the same file
    settings = OperatorSettings.from_env(
        runtime_image=runtime_image,
        namespaces=namespaces or None,
        run_scheduler=run_scheduler,
        run_reconciler=run_reconciler,
        health_port=health_port,
        leader_elect=leader_elect,
    )
    client = KubeClient.from_config(kubeconfig, pool=settings.connections)
    # Liveness answers from the start, followers included; readiness once the loops synced.
    health = Health(stuck_after_s=settings.loop_stuck_s)
    server = HealthServer(health, "", settings.health_port) if settings.health_port >= 0 else None
    if server:
        server.start()
    # Neither loop starts before this process leads; losing the lease ends the process.
    elector = campaign(settings, kubeconfig) if settings.leader_elect else None
    if elector is not None:
        if not elector.acquire():
            return
        elector.keep(on_lost=step_down)
    scheduler = GpuScheduler(client, settings, health) if run_scheduler else None
    if scheduler:
        scheduler.start()
    try:
        if run_reconciler:
            from berth.operator import autoscale_loop, reconciler  # noqa: F401 (registers handlers)

            kopf.run(
                standalone=True,
                clusterwide=not settings.namespaces,
                namespaces=list(settings.namespaces),
                memo=reconciler.shared(settings, client),
            )
        else:
            threading.Event().wait()
    finally:
        if scheduler:
            scheduler.shutdown()
        if server:
            server.close()
        if elector is not None:
            elector.release()
        client.close()


def campaign(settings: OperatorSettings, kubeconfig: Path | None) -> "LeaderElector":
    """A candidate for the operator's Lease, on a connection of its own with a timeout shorter
    than a retry period, so that a renewal never waits behind the other loops' requests."""
    import httpx

    from berth.operator.kube import KubeClient
    from berth.operator.leader import LeaderElector, Timing, default_identity, default_namespace

    client = KubeClient.from_config(kubeconfig, pool=2)
    client.http.timeout = httpx.Timeout(settings.retry_period_s)
    timing = Timing(settings.lease_duration_s, settings.renew_deadline_s, settings.retry_period_s)
    return LeaderElector(
        client,
        settings.lease_namespace or default_namespace(str(kubeconfig) if kubeconfig else None),
        settings.lease_name,
        settings.leader_identity or default_identity(),
        timing,
    )


def step_down() -> None:
    """Leadership lost: exit at once (``os._exit``). kopf's handlers and the scheduler's binders
    are tasks and threads with requests in flight that cannot all be stopped within the renew
    deadline; an exit stops them all, and the Deployment restarts the process, which campaigns
    again as a follower."""
    logging.getLogger(__name__).critical("leadership lost: exiting so that nothing acts")
    logging.shutdown()
    os._exit(75)
