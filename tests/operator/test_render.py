"""What the reconciler renders for one InferenceService."""

from typing import Any

import pytest
from pydantic import ValidationError

from berth import wire
from berth.operator import api, gpus, render
from berth.operator.pod_overrides import EnvVar
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
    assert "command" not in container  # the image's entrypoint: tini, then python -m berth
    assert container["args"][:3] == ["serve", "--model", "/models/llama"]
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


def test_the_runtime_reaches_the_node_agent_through_its_socket_folder_only() -> None:
    pod = render.deployment(service(), SETTINGS)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "node-agent"]
    assert volume["hostPath"] == {"path": SETTINGS.agent_socket_dir, "type": "DirectoryOrCreate"}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "node-agent"]
    assert mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[wire.ENV_AGENT_SOCKET] == f"{mount['mountPath']}/agent.sock"
    # Without an agent folder configured nothing of the host is mounted and no socket named.
    bare = OperatorSettings(runtime_image="x", agent_socket_dir="")
    pod = render.deployment(service(), bare)["spec"]["template"]["spec"]
    assert all(v["name"] != "node-agent" for v in pod["volumes"])
    assert all(e["name"] != wire.ENV_AGENT_SOCKET for e in pod["containers"][0]["env"])


def test_with_mps_a_runtime_mounts_the_nodes_pipes_and_shared_shm_but_a_sandbox_does_not() -> None:
    mps = OperatorSettings(runtime_image="x", mps_host_dir="/run/berth/mps")
    pod = render.deployment(service(), mps)["spec"]["template"]["spec"]
    volumes = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    assert volumes["mps"] == {"path": "/run/berth/mps", "type": "Directory"}
    assert volumes["mps-shm"] == {"path": "/run/berth/mps/shm", "type": "Directory"}
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert (mounts["mps"], mounts["mps-shm"]) == (wire.MPS_DIR, "/dev/shm")
    assert {"name": wire.ENV_MPS_DIR, "value": wire.MPS_DIR} in container["env"]
    # A sealed agent workload, or one in its own runtime class, shares no server and no
    # /dev/shm with other tenants.
    for sandbox in ({"enabled": True}, {"runtimeClassName": "gvisor"}):
        sealed = render.deployment(service(sandbox=sandbox), mps)["spec"]["template"]["spec"]
        assert not {"mps", "mps-shm"} & {v["name"] for v in sealed["volumes"]}, sandbox
        assert all(e["name"] != wire.ENV_MPS_DIR for e in sealed["containers"][0]["env"])
    # A sandbox that only limits request time seals nothing: the pod joins MPS as any other.
    timed = service(sandbox={"maxRequestSeconds": 30})
    timed_pod = render.deployment(timed, mps)["spec"]["template"]["spec"]
    assert {"mps", "mps-shm"} <= {v["name"] for v in timed_pod["volumes"]}
    # Off by default: time-sliced, nothing of it mounted.
    plain = render.deployment(service(), SETTINGS)["spec"]["template"]["spec"]
    assert not {"mps", "mps-shm"} & {v["name"] for v in plain["volumes"]}


def test_a_failed_start_leaves_its_reason_for_the_status() -> None:
    pod = render.deployment(service(), SETTINGS)["spec"]["template"]["spec"]
    assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"


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


def pod_of(rendered: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = rendered["spec"]["template"]["spec"]
    return pod


@pytest.mark.parametrize(
    ("source", "volume", "model_path"),
    [
        (
            {"pvc": {"claimName": "models", "path": "llama"}},
            {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
            "/models/llama",
        ),
        (
            {"pvc": {"claimName": "models", "path": "/team/llama/"}},
            {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
            "/models/team/llama",
        ),
        (
            {"pvc": {"claimName": "models"}},
            {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
            "/models",
        ),
        (
            {"hostPath": {"path": "/var/lib/berth/smollm2"}},
            {"hostPath": {"path": "/var/lib/berth/smollm2", "type": "Directory"}},
            "/models",
        ),
        (
            {"image": {"reference": "registry.local/weights:1", "path": "smollm2"}},
            {"image": {"reference": "registry.local/weights:1", "pullPolicy": "IfNotPresent"}},
            "/models/smollm2",
        ),
    ],
)
def test_volume_sources_mount_read_only_and_serve_points_at_the_model(
    source: dict[str, Any], volume: dict[str, Any], model_path: str
) -> None:
    pod = pod_of(render.deployment(service(model={"source": source}), SETTINGS))
    assert {"name": "model", **volume} in pod["volumes"]
    runtime = pod["containers"][0]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in runtime["volumeMounts"]
    assert runtime["args"][runtime["args"].index("--model") + 1] == model_path
    assert "initContainers" not in pod


def test_uri_source_is_fetched_by_an_init_container_into_an_empty_dir() -> None:
    digest = "ab" * 32
    source = {"uri": "https://models.internal/smollm2.tar.gz", "sha256": digest}
    pod_env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}]
    overrides = {"env": pod_env, "resources": {"limits": {"memory": "2Gi"}}}
    pod = pod_of(render.deployment(service(model={"source": source}, pod=overrides), SETTINGS))
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    [fetch] = pod["initContainers"]
    runtime = pod["containers"][0]
    assert fetch["image"] == runtime["image"] == SETTINGS.runtime_image
    assert fetch["command"] == ["berth", "fetch-model"]
    assert fetch["args"] == [source["uri"], "/models/model", "--sha256", digest]
    assert fetch["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]  # writable
    assert fetch["env"] == pod_env
    assert fetch["resources"] == {"limits": {"memory": "2Gi"}}
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in runtime["volumeMounts"]
    assert runtime["args"][runtime["args"].index("--model") + 1] == "/models/model"


def test_random_source_is_written_by_make_model_in_an_init_container() -> None:
    source = {"random": {"shape": "tiny", "seed": 7}}
    pod = pod_of(render.deployment(service(model={"source": source}), SETTINGS))
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    [make] = pod["initContainers"]
    assert make["name"] == "make-model" and make["image"] == SETTINGS.runtime_image
    assert make["command"] == ["berth", "make-model"]
    assert make["args"] == ["tiny", "--out", "/models/model", "--seed", "7"]
    assert make["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]
    runtime = pod["containers"][0]
    assert runtime["args"][runtime["args"].index("--model") + 1] == "/models/model"


def test_random_shapes_are_the_ones_make_model_writes() -> None:
    from typing import get_args

    from berth.operator.api import RandomShape
    from berth.runtime.engine.testmodels import SHAPES

    assert sorted(get_args(RandomShape)) == sorted(SHAPES)


def test_hf_uri_init_container_passes_the_uri_without_a_checksum() -> None:
    pod = pod_of(render.deployment(service(model={"source": {"uri": "hf://org/m@v1"}}), SETTINGS))
    assert pod["initContainers"][0]["args"] == ["hf://org/m@v1", "/models/model"]
    assert "resources" not in pod["initContainers"][0]


def test_standby_reaches_the_runtime_as_its_idle_time_and_admin_token() -> None:
    standby = service(standby={"idleSeconds": 45})
    assert render.standby_enabled(standby)
    container = render.deployment(standby, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env[wire.ENV_STANDBY_IDLE_SECONDS]["value"] == "45"
    ref = env[wire.ENV_ADMIN_TOKEN]["valueFrom"]["secretKeyRef"]
    secret = render.admin_secret(standby, "t0ken")
    assert ref == {"name": secret["metadata"]["name"], "key": render.ADMIN_TOKEN_KEY}
    assert secret["stringData"] == {render.ADMIN_TOKEN_KEY: "t0ken"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_without_standby_or_with_it_disabled_the_runtime_never_parks() -> None:
    for spec in ({}, {"standby": {"enabled": False}}):
        s = service(**spec)
        assert not render.standby_enabled(s)
        container = render.deployment(s, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
        names = {e["name"] for e in container["env"]}
        assert wire.ENV_STANDBY_IDLE_SECONDS not in names and wire.ENV_ADMIN_TOKEN not in names


def test_standby_host_memory_grows_the_memory_request_and_a_set_limit() -> None:
    standby = {"idleSeconds": 60, "hostMemory": "2Gi"}
    alone = render.deployment(service(standby=standby), SETTINGS)
    resources = alone["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"memory": str(2 * 2**30)}}
    bounded = service(
        standby=standby,
        pod={"resources": {"requests": {"memory": "1Gi", "cpu": "2"}, "limits": {"memory": "3Gi"}}},
    )
    container = render.deployment(bounded, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"memory": str(3 * 2**30), "cpu": "2"},
        "limits": {"memory": str(5 * 2**30)},
    }
    # Standby off: the host memory is not asked for.
    off = service(standby={**standby, "enabled": False})
    assert (
        "resources"
        not in render.deployment(off, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    )


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_the_runtime_settings_reach_berth_serve(kv: str) -> None:
    """``spec.runtime`` as ``berth serve`` parses the rendered arguments."""
    from test_sandbox import serve_params

    runtime = {"dtype": "bfloat16", "kvCacheDtype": kv, "maxNumSeqs": 32, "blockSize": 32}
    container = render.deployment(service(runtime=runtime), SETTINGS)["spec"]["template"]["spec"]
    params = serve_params(container["containers"][0]["args"])
    assert (params["dtype"], params["kv_cache_dtype"]) == ("bfloat16", kv)
    assert (params["max_num_seqs"], params["block_size"]) == (32, 32)


def test_every_variable_berth_sets_is_refused_in_spec_pod_env() -> None:
    """A tenant's env comes after Berth's and would win: each name Berth renders, with every
    setting that adds one (the agent's socket, MPS, standby and its admin token), is reserved."""
    everything = OperatorSettings(
        runtime_image="x", agent_socket_dir="/run/berth/agent", mps_host_dir="/run/berth/mps"
    )
    svc = service(standby={"enabled": True, "idleSeconds": 60})
    container = render.deployment(svc, everything)["spec"]["template"]["spec"]["containers"][0]
    names = {e["name"] for e in container["env"]}
    assert {wire.ENV_AGENT_SOCKET, wire.ENV_MPS_DIR, wire.ENV_ADMIN_TOKEN} <= names
    for name in names:
        with pytest.raises(ValidationError, match="cannot be overridden"):
            EnvVar(name=name, value="x")
