"""``render(service) -> manifests``: the Deployment, Service and PodDisruptionBudget of one model,
and the policies of its sandbox (``sandbox.py``).

Pure: a parsed InferenceService in, plain dicts out; the reconciler applies them with
server-side apply. How a pod gets its GPU: it requests *no* ``nvidia.com/gpu`` (a fraction is
not an integer device); Berth's scheduler picks the GPU and writes it into the pod's annotations
in the same API call that binds the pod, and the container reads them through the downward API:
``NVIDIA_VISIBLE_DEVICES`` (the GPU's UUID, honoured by the NVIDIA container runtime) and
``BERTH_GPU_MEMORY_REQUEST/LIMIT`` as env vars, plus a downward-API volume at
``/etc/berth/pod`` whose ``annotations`` file follows later budget changes live.
"""

import posixpath
from typing import Any

from berth import wire
from berth.operator.api import InferenceService, InferenceServiceSpec, SandboxSpec, quantity_bytes
from berth.operator.sandbox import NO_ENGINES, PolicyEngines, hardening, policies
from berth.operator.settings import OperatorSettings

PORT = 8000
MODEL_DIR = "/models"  # where the model volume is mounted
FETCHED_MODEL_DIR = f"{MODEL_DIR}/model"  # where the init container puts a uri or random model
ADMIN_TOKEN_KEY = "token"  # the key of the admin Secret's bearer token
AGENT_DIR = "/run/berth-agent"  # where the runtime container sees the node agent's socket folder
MANAGED_BY = "berth"


def labels(name: str) -> dict[str, str]:
    return {
        wire.LABEL_SERVICE: name,
        wire.LABEL_MANAGED_BY: MANAGED_BY,
        "app.kubernetes.io/name": "berth-runtime",
        "app.kubernetes.io/instance": name,
    }


def selector(name: str) -> dict[str, str]:
    return {wire.LABEL_SERVICE: name}


def owner_reference(service: InferenceService) -> dict[str, Any]:
    meta = service.metadata
    return {
        "apiVersion": f"{wire.GROUP}/{wire.VERSION}",
        "kind": service.kind,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(service: InferenceService) -> dict[str, Any]:
    return {
        "name": service.metadata["name"],
        "namespace": service.metadata.get("namespace", "default"),
        "labels": labels(service.metadata["name"]),
        "ownerReferences": [owner_reference(service)],
    }


def gpu_annotations(spec: InferenceServiceSpec) -> dict[str, str]:
    """What each pod asks of its GPU; the scheduler reads these."""
    if spec.gpu.fraction is not None:
        return {wire.POD_WANTS_GPU_FRACTION: repr(spec.gpu.fraction)}
    assert spec.gpu.memory is not None
    wants = {wire.POD_WANTS_GPU_MEMORY: spec.gpu.memory.request}
    if spec.gpu.memory.limit is not None:
        wants[wire.POD_WANTS_GPU_MEMORY_LIMIT] = spec.gpu.memory.limit
    return wants


def _inside(root: str, path: str) -> str:
    """``path`` (relative, as the API gives it) joined under ``root``, normalised."""
    return posixpath.normpath(posixpath.join(root, path.lstrip("/")))


def _model_volume(spec: InferenceServiceSpec) -> tuple[dict[str, Any], str]:
    """The volume holding the weights (mounted at ``MODEL_DIR``) and the path that
    ``berth serve --model`` gets. A ``uri`` gets an emptyDir that the init container of
    ``fetch_container`` fills; the model lands in a folder below the mount point, because the
    fetcher renames a complete download into place and a mount point cannot be renamed."""
    source = spec.model.source
    if source.pvc is not None:
        volume = {"persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True}}
        return {"name": "model", **volume}, _inside(MODEL_DIR, source.pvc.path)
    if source.host_path is not None:
        volume = {"hostPath": {"path": source.host_path.path, "type": "Directory"}}
        return {"name": "model", **volume}, MODEL_DIR
    if source.image is not None:
        image = {"reference": source.image.reference, "pullPolicy": source.image.pull_policy}
        return {"name": "model", "image": image}, _inside(MODEL_DIR, source.image.path)
    assert source.uri is not None or source.random is not None
    return {"name": "model", "emptyDir": {}}, FETCHED_MODEL_DIR


def fetch_container(service: InferenceService, image: str) -> dict[str, Any] | None:
    """The storage initializer of a ``uri`` source (``berth fetch-model``) or a ``random`` one
    (``berth make-model``), from the runtime image, writing into the model volume; the runtime
    container starts only once it exited 0. It gets the user's ``pod.env`` (HF_TOKEN from a
    Secret, HF_ENDPOINT, proxies) and the runtime container's resources."""
    spec = service.spec
    source = spec.model.source
    if source.uri is not None:
        name = "fetch-model"
        args = [source.uri, FETCHED_MODEL_DIR]
        if source.sha256 is not None:
            args += ["--sha256", source.sha256]
    elif source.random is not None:
        name = "make-model"
        args = [source.random.shape, "--out", FETCHED_MODEL_DIR, "--seed", str(source.random.seed)]
    else:
        return None
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "command": ["berth", name],  # the init container is named after its subcommand
        "args": args,
        "env": [e.model_dump(by_alias=True, exclude_none=True) for e in spec.pod.env],
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}],
        "terminationMessagePolicy": "FallbackToLogsOnError",  # a failed fetch names its error
    }
    if spec.pod.resources is not None:
        container["resources"] = spec.pod.resources.model_dump(by_alias=True, exclude_defaults=True)
    return container


def _isolated(sandbox: SandboxSpec | None) -> bool:
    """A pod that shares no MPS server and no /dev/shm with other tenants: a sealed one, or one
    in its own runtime class (a gVisor or Kata sandbox cannot reach the node's MPS pipes)."""
    return sandbox is not None and (sandbox.enabled or sandbox.runtime_class_name is not None)


def _downward_env() -> list[dict[str, Any]]:
    def annotation(name: str, key: str) -> dict[str, Any]:
        path = f"metadata.annotations['{key}']"
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    return [
        annotation(wire.ENV_VISIBLE_DEVICES, wire.POD_VISIBLE_DEVICES),
        annotation(wire.ENV_GPU_UUID, wire.POD_GPU_UUID),
        annotation(wire.ENV_GPU_MEMORY_REQUEST, wire.POD_GPU_MEMORY_REQUEST),
        annotation(wire.ENV_GPU_MEMORY_LIMIT, wire.POD_GPU_MEMORY_LIMIT),
        {"name": wire.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {
            "name": wire.ENV_POD_NAMESPACE,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
    ]


def _serve_args(service: InferenceService, model_path: str) -> list[str]:
    spec = service.spec
    runtime = spec.runtime
    args = [
        "--model", model_path,
        "--served-model-name", spec.model.served_name or service.metadata["name"],
        "--dtype", runtime.dtype,
        "--block-size", str(runtime.block_size),
        "--kv-cache-dtype", runtime.kv_cache_dtype,
        "--max-num-seqs", str(runtime.max_num_seqs),
        "--port", str(PORT),
    ]  # fmt: skip
    if runtime.max_model_len is not None:
        args += ["--max-model-len", str(runtime.max_model_len)]
    if not runtime.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    if spec.sandbox is not None and spec.sandbox.max_request_seconds is not None:
        args += ["--request-timeout", str(spec.sandbox.max_request_seconds)]
    return args + runtime.args


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def deployment(service: InferenceService, settings: OperatorSettings) -> dict[str, Any]:
    spec = service.spec
    name = service.metadata["name"]
    pod = spec.pod
    volume, model_path = _model_volume(spec)
    pod_info = {
        "name": "pod-info",
        "downwardAPI": {
            "items": [
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            ]
        },
    }
    mounts = [
        {"name": "pod-info", "mountPath": wire.POD_INFO_DIR, "readOnly": True},
        {"name": "model", "mountPath": MODEL_DIR, "readOnly": True},
    ]
    volumes = [pod_info, volume]
    env = _downward_env()
    if settings.agent_socket_dir:
        # The node agent's socket folder (a socket needs no write access to its mount). A node
        # without an agent gets an empty folder: the runtime then serves within its request.
        volumes.append({"name": "node-agent",
                        "hostPath": {"path": settings.agent_socket_dir, "type": "DirectoryOrCreate"}})  # fmt: skip
        mounts.append({"name": "node-agent", "mountPath": AGENT_DIR, "readOnly": True})
        env.append({"name": wire.ENV_AGENT_SOCKET, "value": f"{AGENT_DIR}/agent.sock"})
    if settings.mps_host_dir and not _isolated(spec.sandbox):
        # NVIDIA MPS (runtime/agent/mps.py): the node's pipes, and the /dev/shm its servers
        # share with their clients. Type Directory: the node agent makes both (a pod waits for
        # it, with an event saying why, rather than starting on a root-owned /dev/shm).
        shm = posixpath.join(settings.mps_host_dir, wire.MPS_SHM)
        volumes += [{"name": "mps", "hostPath": {"path": settings.mps_host_dir, "type": "Directory"}},
                    {"name": "mps-shm", "hostPath": {"path": shm, "type": "Directory"}}]  # fmt: skip
        mounts += [{"name": "mps", "mountPath": wire.MPS_DIR},
                   {"name": "mps-shm", "mountPath": "/dev/shm"}]  # fmt: skip
        env.append({"name": wire.ENV_MPS_DIR, "value": wire.MPS_DIR})
    env += standby_env(service)
    image = spec.runtime.image or settings.runtime_image
    container: dict[str, Any] = {
        "name": "runtime",
        "image": image,
        # No command: the image's entrypoint (tini, then `python -m berth`) runs `serve`, so
        # SIGTERM reaches the server and its engine process is reaped.
        "args": ["serve", *_serve_args(service, model_path)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env + [e.model_dump(by_alias=True, exclude_none=True) for e in pod.env],
        "volumeMounts": mounts,
        # Loading weights can take minutes: the startup probe holds liveness off until then.
        "startupProbe": _probe("/health", period=5, failures=120),
        "livenessProbe": _probe("/health", period=10, failures=3),
        "readinessProbe": _probe("/ready", period=5, failures=2),
        # The kubelet's own sleep (GA in 1.34; the image needs no sleep binary): the pod leaves
        # the Service's endpoints everywhere before SIGTERM starts the drain (wire.PRESTOP_*).
        "lifecycle": {"preStop": {"sleep": {"seconds": wire.PRESTOP_SLEEP_S}}},
        # A runtime that cannot start writes why to the termination log (a budget too small
        # for its weights, say); one that dies without writing leaves its last log lines. The
        # status board names either in the service's Ready condition.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = (
        pod.resources.model_dump(by_alias=True, exclude_defaults=True) if pod.resources else {}
    )
    if spec.standby is not None and spec.standby.enabled and spec.standby.host_memory:
        resources = with_host_memory(resources, quantity_bytes(spec.standby.host_memory))
    if resources:
        container["resources"] = resources
    node_selector = dict(pod.node_selector)
    if spec.gpu.product:
        node_selector[wire.NODE_GPU_PRODUCT] = spec.gpu.product
    pod_spec: dict[str, Any] = {
        "schedulerName": wire.SCHEDULER_NAME,
        "containers": [container],
        "volumes": volumes,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": wire.TERMINATION_GRACE_PERIOD_S,
    }
    if (fetch := fetch_container(service, image)) is not None:
        pod_spec["initContainers"] = [fetch]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if pod.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in pod.tolerations
        ]
    if pod.service_account_name:
        pod_spec["serviceAccountName"] = pod.service_account_name
    if spec.sandbox is not None and spec.sandbox.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.sandbox.runtime_class_name
    annotations = {**pod.annotations, **gpu_annotations(spec)}
    if (hardened := hardening(spec.sandbox)) is not None:
        pod_spec["securityContext"] = hardened.pod_security_context
        pod_spec["volumes"] = volumes + hardened.volumes
        for each in [container, *pod_spec.get("initContainers", [])]:
            each["securityContext"] = hardened.container_security_context
            each["volumeMounts"] = each["volumeMounts"] + hardened.mounts
        annotations.update(hardened.annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(service),
        "spec": {
            "replicas": spec.desired_replicas(),
            "selector": {"matchLabels": selector(name)},
            # Surge first: a replacement is placed before the old pod frees its GPU share.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": {**pod.labels, **labels(name), wire.LABEL_ROUTED: "true"},
                    "annotations": annotations,
                },
                "spec": pod_spec,
            },
        },
    }


def with_host_memory(resources: dict[str, Any], extra: int) -> dict[str, Any]:
    """``resources`` asking for ``extra`` more bytes of memory (a limit, if set, grows alike)."""
    grown = {kind: dict(values) for kind, values in resources.items()}
    for kind in ("requests", "limits"):
        if kind == "requests" or "memory" in grown.get(kind, {}):
            values = grown.setdefault(kind, {})
            values["memory"] = str(quantity_bytes(values.get("memory", "0")) + extra)
    return grown


def standby_enabled(service: InferenceService) -> bool:
    return service.spec.standby is not None and service.spec.standby.enabled


def standby_env(service: InferenceService) -> list[dict[str, Any]]:
    """Warm standby (ARCHITECTURE section 5): the runtime parks after ``idleSeconds`` without
    requests, registers with the node agent as able to park, and opens its admin endpoints
    (``POST /admin/park``, ``/admin/wake``, ``/admin/rotation``) to the bearer token in the
    service's admin Secret."""
    standby = service.spec.standby
    if standby is None or not standby.enabled:
        return []
    secret = admin_secret_name(service.metadata["name"])
    token = {"secretKeyRef": {"name": secret, "key": ADMIN_TOKEN_KEY}}
    return [
        {"name": wire.ENV_STANDBY_IDLE_SECONDS, "value": str(standby.idle_seconds)},
        {"name": wire.ENV_ADMIN_TOKEN, "valueFrom": token},
    ]


def admin_secret_name(service: str) -> str:
    return f"{service}-berth-admin"


def admin_secret(service: InferenceService, token: str) -> dict[str, Any]:
    """The Secret holding the token of the runtimes' admin endpoints. The reconciler creates it
    once with a random token (applying it again would rotate the token under running pods); it
    is owned by the service, so it goes with it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {**_metadata(service), "name": admin_secret_name(service.metadata["name"])},
        "type": "Opaque",
        "stringData": {ADMIN_TOKEN_KEY: token},
    }


def service_object(service: InferenceService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service),
        "spec": {
            # Only routed pods: the autoscaler takes parked replicas out (operator/routing.py).
            "selector": {**selector(service.metadata["name"]), wire.LABEL_ROUTED: "true"},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(service: InferenceService) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(service),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(service.metadata["name"])},
        },
    }


def endpoint_url(service: InferenceService) -> str:
    meta = service.metadata
    return f"http://{meta['name']}.{meta.get('namespace', 'default')}.svc:{PORT}/v1"


def render(
    service: InferenceService, settings: OperatorSettings, engines: PolicyEngines = NO_ENGINES
) -> list[dict[str, Any]]:
    """Every object the service owns, the Deployment first; the PDB only when more than one
    replica can run; the sandbox's policies when it is enabled (those of ``engines`` the cluster
    has). The operator's pods are let in from ``settings.reservation_namespace``: the chart
    runs the operator there."""
    objects = [deployment(service, settings), service_object(service)]
    if service.spec.desired_replicas() > 1:
        objects.append(disruption_budget(service))
    if service.spec.sandbox is not None:
        namespace = settings.reservation_namespace
        objects += policies(service.spec.sandbox, _metadata(service), engines, PORT, namespace)
    return objects
