"""The ``berth`` command. Each subcommand lives beside the code it drives and is imported lazily,
so that ``berth version`` or ``berth crds`` never pays for importing torch."""

import importlib

import click

import berth

# name -> "module:attribute" of a click command; imported only when that subcommand runs.
SUBCOMMANDS: dict[str, str] = {
    "cluster": "berth.cluster.cli:cluster",
    "crds": "berth.operator.cli:crds",
    "plan": "berth.operator.cli:plan",
    "operator": "berth.operator.cli:operator",
    "serve": "berth.runtime.server.cli:serve",
    "node-agent": "berth.runtime.agent.cli:node_agent",
    "make-model": "berth.runtime.engine.cli:make_model_command",
    "generate": "berth.runtime.engine.cli:generate_command",
    "import-model": "berth.runtime.engine.cli:import_model_command",
    "fetch-model": "berth.runtime.engine.cli:fetch_model_command",
    "smoke-test": "berth.operator.smoke:smoke_test",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: object, lazy: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = self.lazy[cmd_name].split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command), f"{self.lazy[cmd_name]} is not a click command"
        return command


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS)
def main() -> None:
    """Berth: pack LLMs onto fractional GPUs, burst, park and wake them."""


@main.command()
def version() -> None:
    """Print Berth's version."""
    click.echo(f"berth {berth.__version__}")


@main.command()
@click.option("--local", is_flag=True,
              help="Skip the cluster: serve `tiny` in a local process and chat with it.")  # fmt: skip
def demo(local: bool) -> None:
    """The whole path: a local cluster with a real kubelet node, Berth installed with Helm, two
    InferenceServices sharing one simulated GPU, and a chat with the real SmolLM2 model through
    its Service (the cluster stays up; `berth cluster down` removes it)."""
    if local:
        from berth.runtime.server.demo import run_demo

        run_demo(say=click.echo)
        return
    from berth.cluster.demo import run

    run(say=lambda message: click.echo(f"[berth demo] {message}"))
