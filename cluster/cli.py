"""``berth cluster up|down|status``: the loopback control plane for development and demos."""

import time
from pathlib import Path

import click

from berth.cluster.cluster import IMAGES, ClusterError, LocalCluster, default_state_dir
from berth.cluster.images import ImageError, build, build_pause
from berth.cluster.realnode import RealNodeError
from berth.cluster.toolchain import ToolchainError
from berth.operator.inventory import DEFAULT_INVENTORY, load_inventory

NODE_COLUMNS = (
    "NAME:.metadata.name,STATUS:.status.conditions[?(@.type=='Ready')].status,"
    "GPUS:.status.capacity.nvidia\\.com/gpu,"
    "PRODUCT:.metadata.labels.nvidia\\.com/gpu\\.product,"
    "GPU-MEMORY-MIB:.metadata.labels.nvidia\\.com/gpu\\.memory"
)

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_state_dir,
    show_default="~/.cache/berth/cluster",
    help="Folder for certificates, kubeconfig, logs and process ids.",
)


@click.group()
def cluster() -> None:
    """A real local cluster: etcd, kube-apiserver, controller-manager, scheduler, kwok GPU nodes
    and one real kubelet node."""


@cluster.command()
@state_dir_option
@click.option("--nodes", "nodes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Inventory YAML of simulated nodes (default: 4 nodes x 8 H100 + 1 CPU node).")  # fmt: skip
@click.option("--port", default=6443, show_default=True, help="kube-apiserver port; 0 = any free.")
@click.option("--real-node/--no-real-node", default=True, show_default=True,
              help="Also start a real kubelet node (containerd, runc, CNI; needs root) that runs "
                   "Berth's images, built and imported on first use.")  # fmt: skip
def up(state_dir: Path, nodes_file: Path | None, port: int, real_node: bool) -> None:
    """Start the control plane in the background and print its nodes."""
    started = time.monotonic()
    try:
        inventory = load_inventory(nodes_file) if nodes_file else DEFAULT_INVENTORY
        local = LocalCluster(state_dir=state_dir, inventory=inventory, api_port=port, attach=False,
                             real_node=real_node, say=lambda m: click.echo(f"[berth] {m}"))  # fmt: skip
        local.up()
    except (ClusterError, ToolchainError, RealNodeError, ImageError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"control plane ready in {time.monotonic() - started:.1f} s at {local.server}")
    click.echo(local.kubectl("get", "nodes", "-o", f"custom-columns={NODE_COLUMNS}").rstrip())
    click.echo(f"\nexport KUBECONFIG={local.kubeconfig}\nexport PATH={local.bin_dir}:$PATH")


@cluster.command("images")
def build_images() -> None:
    """Build Berth's images for the real node (cached by what goes in) without a cluster."""
    try:
        for image in (build_pause(echo), *(build(spec, echo) for spec in IMAGES)):
            click.echo(f"{image.name}  {image.size_bytes / 2**20:.0f} MiB")
    except ImageError as error:
        raise click.ClickException(str(error)) from error


def echo(message: str) -> None:
    click.echo(f"[berth] {message}")


@cluster.command()
@state_dir_option
def down(state_dir: Path) -> None:
    """Stop every component and check that none is left."""
    try:
        LocalCluster(state_dir=state_dir).down()
    except (ClusterError, RealNodeError) as error:
        raise click.ClickException(str(error)) from error
    click.echo("control plane stopped")


@cluster.command()
@state_dir_option
def status(state_dir: Path) -> None:
    """Show each component's process and, when it runs, the nodes."""
    local = LocalCluster(state_dir=state_dir)
    states = local.status()
    for component, state in states.items():
        click.echo(f"{component:25} {state}")
    if states["kube-apiserver"].startswith("running"):
        local = LocalCluster.attach_existing(state_dir)
        click.echo(local.kubectl("get", "nodes", "-o", f"custom-columns={NODE_COLUMNS}").rstrip())
