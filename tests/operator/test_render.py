"""What the reconciler renders for one InferenceService."""

from typing import Any

from berth import wire
from berth.operator import api, gpus, render
from berth.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(runtime_image="registry.local/berth-runtime:test")


def service(**spec: Any) -> api.InferenceService:
    base: dict[str, Any] = {
        "model": {"source": {"pvc": {"claimName": "models", "path": "llama"}}},
        "gpu": {"fraction": 0.25, "product": "NVIDIA-H100-80GB-HBM3"},
    }
    return api.InferenceService.model_validate(
        {"metadata": {"name": "llama", "namespace": "team", "uid": "u-1"}, "spec": {**base, **spec}}
    )


def test_deployment_is_scheduled_by_berth_and_requests_no_whole_gpu() -> None:
    deployment = render.deployment(service(), SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["schedulerName"] == wire.SCHEDULER_NAME
    assert wire.GPU_RESOURCE not in str(container.get("resources", {}))
    assert pod["nodeSelector"] == {wire.NODE_GPU_PRODUCT: "NVIDIA-H100-80GB-HBM3"}
    assert container["image"] == "registry.local/berth-runtime:test"
    assert container["command"] == ["berth", "serve"]
    assert container["args"][:2] == ["--model", "/models/llama"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": wire.PRESTOP_SLEEP_S}}
    assert pod["terminationGracePeriodSeconds"] == wire.TERMINATION_GRACE_PERIOD_S
    assert container["ports"][0]["containerPort"] == 8000
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_the_gpu_reaches_the_container_through_the_downward_api() -> None:
    container = render.deployment(service(), SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    env = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        for e in container["env"]
    }
    assert env[wire.ENV_VISIBLE_DEVICES] == f"metadata.annotations['{wire.POD_VISIBLE_DEVICES}']"
    assert (
        env[wire.ENV_GPU_MEMORY_REQUEST] == f"metadata.annotations['{wire.POD_GPU_MEMORY_REQUEST}']"
    )
    assert any(m["mountPath"] == wire.POD_INFO_DIR for m in container["volumeMounts"])


def test_the_pod_template_is_what_the_scheduler_reads() -> None:
    template = render.deployment(service(), SETTINGS)["spec"]["template"]
    pod = {
        "metadata": {**template["metadata"], "name": "llama-x", "namespace": "team"},
        "spec": template["spec"],
    }
    request = gpus.pod_request(pod)
    assert request.demand.fraction == 0.25 and request.service == "team/llama"
    assert request.node_selector == {wire.NODE_GPU_PRODUCT: "NVIDIA-H100-80GB-HBM3"}


def test_memory_requests_render_as_quantities() -> None:
    spec = {"gpu": {"memory": {"request": "12Gi", "limit": "30Gi"}}}
    annotations = render.deployment(service(**spec), SETTINGS)["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations == {
        wire.POD_WANTS_GPU_MEMORY: "12Gi",
        wire.POD_WANTS_GPU_MEMORY_LIMIT: "30Gi",
    }


def test_disruption_budget_only_with_more_than_one_replica() -> None:
    assert [o["kind"] for o in render.render(service(), SETTINGS)] == ["Deployment", "Service"]
    kinds = [o["kind"] for o in render.render(service(replicas=3), SETTINGS)]
    assert kinds == ["Deployment", "Service", "PodDisruptionBudget"]


def test_pod_overrides_reach_the_pod() -> None:
    overrides = {
        "nodeSelector": {"zone": "a"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "serviceAccountName": "llm",
        "env": [{"name": "HF_HOME", "value": "/cache"}],
        "resources": {"requests": {"cpu": "2"}},
    }
    pod = render.deployment(service(pod=overrides), SETTINGS)["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["zone"] == "a" and pod["serviceAccountName"] == "llm"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "HF_HOME", "value": "/cache"} in pod["containers"][0]["env"]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "2"}}


def test_uri_sources_mount_nothing_and_pass_the_uri() -> None:
    rendered = render.deployment(service(model={"source": {"uri": "hf://org/m"}}), SETTINGS)
    container = rendered["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][1] == "hf://org/m"
    assert all(v["name"] != "model" for v in rendered["spec"]["template"]["spec"]["volumes"])
