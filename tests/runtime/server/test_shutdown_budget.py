"""The rendered pod's grace period holds its preStop sleep and the runtime's whole shutdown."""

from berth import wire
from berth.operator import api, render
from berth.operator.settings import OperatorSettings
from berth.runtime.engine import EngineConfig
from berth.runtime.server.cli import serve
from berth.runtime.server.lifecycle import ShutdownBudget
from berth.runtime.server.settings import ServerSettings

MARGIN_S = 5  # for the kubelet, the interpreter's exit and a loaded node


def rendered_pod() -> dict[str, object]:
    service = api.InferenceService.model_validate({
        "metadata": {"name": "llama", "namespace": "team", "uid": "u-1"},
        "spec": {"model": {"source": {"pvc": {"claimName": "m", "path": "llama"}}},
                 "gpu": {"fraction": 0.5}},
    })  # fmt: skip
    deployment = render.deployment(service, OperatorSettings(runtime_image="berth:test"))
    pod: dict[str, object] = deployment["spec"]["template"]["spec"]
    return pod


def test_grace_period_holds_prestop_and_the_shutdown_of_the_rendered_runtime() -> None:
    pod = rendered_pod()
    container = pod["containers"][0]  # type: ignore[index]
    # The settings `berth serve` builds from the rendered arguments (and its defaults).
    subcommand, *args = container["args"]  # the image's entrypoint runs `berth <args>`
    assert subcommand == "serve"
    params = serve.make_context("serve", args).params
    settings = ServerSettings(
        engine=EngineConfig(model=params["model"]),
        shutdown_delay_s=params["shutdown_delay_s"],
        drain_grace_s=params["drain_grace_s"],
    )
    budget = ShutdownBudget.of(settings)
    prestop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert budget.drain_s == wire.RUNTIME_DRAIN_TIMEOUT_S
    assert budget.delay_s == wire.RUNTIME_SHUTDOWN_DELAY_S
    assert pod["terminationGracePeriodSeconds"] >= prestop + budget.total_s + MARGIN_S


def test_every_step_after_sigterm_is_counted_in_the_budget() -> None:
    budget = ShutdownBudget(delay_s=2, drain_s=30)
    assert budget.total_s == 2 + 30 + budget.abort_flush_s + budget.connection_close_s + (
        budget.engine_stop_s
    )
    assert budget.engine_stop_s > 0 and budget.connection_close_s > 0
