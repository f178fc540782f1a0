"""The ``InferenceService`` API (``berth.dev/v1alpha1``): the pydantic models are the source.

``berth crds`` turns these models into the CRD's structural OpenAPI schema (see ``crd.py``), so
every default, bound and description here is also what the API server enforces. Rules that span
fields are CEL rules attached with ``validations(...)``; the API server runs them at admission,
and ``InferenceService.model_validate`` runs the same checks in Python (``berth plan`` and the
reconciler parse manifests with these models too).
"""

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from berth import wire
from berth.operator.api_types import (
    ApiModel,
    Cidr,
    DnsSubdomain,
    HostName,
    Labels,
    LabelValue,
    Port,
    PositiveQuantity,
    SyscallName,
    quantity_bytes,
    validations,
)
from berth.operator.pod_overrides import PodOverrides

KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ["bis"]  # KServe owns "isvc"


# --- model source -------------------------------------------------------------------------

_OUTSIDE_VOLUME = "path must stay inside the volume (no '..' segments)"


def _inside_volume(value: str) -> str:
    if ".." in value.split("/"):
        raise ValueError(_OUTSIDE_VOLUME)
    return value


VolumePath = Annotated[
    str,
    AfterValidator(_inside_volume),
    Field(
        max_length=1024,
        description="Directory of the model inside the volume.",
        json_schema_extra=validations(
            {"rule": "!self.matches('(^|/)[.][.](/|$)')", "message": _OUTSIDE_VOLUME}
        ),
    ),
]


class PvcSource(ApiModel):
    """Weights on a PersistentVolumeClaim, mounted read-only."""

    claim_name: str = Field(min_length=1, description="Name of the PVC in the service's namespace.")
    path: VolumePath = ""


class HostPathSource(ApiModel):
    """Weights in a directory on the node (single-node clusters, pre-seeded nodes)."""

    path: str = Field(pattern="^/", description="Absolute directory on the node.")


class ImageSource(ApiModel):
    """Weights packaged as an OCI image, mounted as an image volume (Kubernetes 1.31+)."""

    reference: str = Field(min_length=1, description="OCI image reference holding the weights.")
    path: VolumePath = ""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="When the kubelet pulls the image."
    )


# Model URIs: the schemes the storage initializer (``berth fetch-model``) fetches, and the
# message for those it does not. Each rule is a CEL rule at admission and a check in Python.
_URI_NOT_IMPLEMENTED = (
    "s3:// and gs:// model URIs are not implemented: use https://, http://, hf://, "
    "or a pvc, hostPath or image source"
)
_URI_SCHEME = "uri must start with https://, http:// or hf://"
_HF_URI = "hf:// URIs name a Hub repository: hf://org/repo or hf://org/repo@revision"


def _fetchable_uri(value: str) -> str:
    if re.match(r"^(s3|gs)://", value):
        raise ValueError(_URI_NOT_IMPLEMENTED)
    if not re.match(r"^(https?|hf)://", value):
        raise ValueError(_URI_SCHEME)
    if value.startswith("hf://") and not re.match(wire.HF_MODEL_URI, value):
        raise ValueError(_HF_URI)
    return value


ModelUri = Annotated[
    str,
    AfterValidator(_fetchable_uri),
    Field(
        min_length=1,
        max_length=2048,
        description=(
            "Download location, fetched by an init container into an emptyDir before the "
            "runtime starts: https:// or http:// (a .tar, .tar.gz or .tgz archive of the model "
            "folder is unpacked; any other URL is saved as one file), or hf://org/repo[@revision] "
            "(the Hub's configs, safetensors and tokenizer; HF_TOKEN and HF_ENDPOINT come from "
            "pod.env). s3:// and gs:// are refused."
        ),
        json_schema_extra=validations(
            {"rule": "!self.matches('^(s3|gs)://')", "message": _URI_NOT_IMPLEMENTED},
            {"rule": "self.matches('^(https?|hf|s3|gs)://')", "message": _URI_SCHEME},
            {"rule": f"!self.startsWith('hf://') || self.matches('{wire.HF_MODEL_URI}')",
             "message": _HF_URI},
        ),
    ),
]  # fmt: skip


# Shapes ``berth make-model`` writes (``runtime/engine/testmodels.py``; a test keeps them equal).
RandomShape = Literal[
    "tiny", "tiny-qwen2", "tiny-qwen3", "tiny-llama-3.2", "llama-3-8b", "llama-3.2-1b", "qwen3-4b"
]


class RandomSource(ApiModel):
    """A random-weight model of a known shape, written in the pod by ``berth make-model`` (an
    init container, nothing downloaded): for smoke and load tests and ``helm test``. Its tokens
    are noise; its speed and memory are those of the real shape."""

    shape: RandomShape = Field(description="Architecture and size, e.g. tiny or llama-3-8b.")
    seed: int = Field(default=0, ge=0, description="Weights and tokenizer are a function of it.")


class ModelSource(ApiModel):
    """Where the weights come from: exactly one of pvc, hostPath, image, uri or random."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            {
                "rule": "[has(self.pvc), has(self.hostPath), has(self.image), has(self.uri), "
                "has(self.random)].filter(x, x).size() == 1",
                "message": "set exactly one of pvc, hostPath, image, uri or random",
            },
            {
                "rule": "!has(self.sha256) || (has(self.uri) && self.uri.matches('^https?://'))",
                "message": "sha256 checks an https:// or http:// download; pin hf:// with @revision",
                "fieldPath": ".sha256",
            },
        )
    )

    pvc: PvcSource | None = None
    host_path: HostPathSource | None = None
    image: ImageSource | None = None
    uri: ModelUri | None = None
    random: RandomSource | None = None
    sha256: str | None = Field(
        default=None,
        pattern="^[0-9a-f]{64}$",
        description="SHA-256 (lowercase hex) the downloaded file or archive of an https:// uri must have.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSource":
        chosen = [self.pvc, self.host_path, self.image, self.uri, self.random]
        if sum(x is not None for x in chosen) != 1:
            raise ValueError("set exactly one of pvc, hostPath, image, uri or random")
        if self.sha256 is not None and not (self.uri or "").startswith(("https://", "http://")):
            raise ValueError(
                "sha256 checks an https:// or http:// download; pin hf:// with @revision"
            )
        return self


class ModelSpec(ApiModel):
    source: ModelSource
    served_name: str | None = Field(
        default=None,
        max_length=253,
        description="Model name clients send in the OpenAI API; defaults to the service's name.",
    )


# --- runtime, GPU, scaling ---------------------------------------------------------------


class RuntimeSpec(ApiModel):
    """Engine settings passed to ``berth serve``."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weight and KV-cache dtype; auto takes the model's."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, le=1_048_576, description="Longest prompt + output in tokens."
    )
    block_size: Literal[8, 16, 32] = Field(default=16, description="Tokens per KV-cache block.")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        default="auto",
        description="KV-cache element type: auto (the weights' dtype) or fp8 (e4m3 with a "
        "scale per token and KV head: about half the bytes of bf16, twice the context per GB; "
        "needs a GPU of compute capability 8.9 or later, Ada or Hopper: on an older one the "
        "runtime refuses to start and the status says why).",
    )
    max_num_seqs: int = Field(default=256, ge=1, le=4096, description="Most sequences per batch.")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse KV blocks of shared prefixes."
    )
    image: str | None = Field(
        default=None, description="Runtime image; defaults to the operator's BERTH_RUNTIME_IMAGE."
    )
    args: list[str] = Field(default_factory=list, description="Extra arguments to berth serve.")


class GpuMemory(ApiModel):
    """Memory on one GPU: the request is reserved by the scheduler, the limit is the burst ceiling."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            {
                "rule": "!has(self.limit) || quantity(self.request).compareTo(quantity(self.limit)) <= 0",
                "message": "request must not exceed limit",
                "fieldPath": ".request",
                "reason": "FieldValueInvalid",
            }
        )
    )

    request: PositiveQuantity = Field(description="Guaranteed GPU memory, e.g. 20Gi.")
    limit: PositiveQuantity | None = Field(
        default=None, description="Burst ceiling; defaults to the request."
    )

    @model_validator(mode="after")
    def _request_within_limit(self) -> "GpuMemory":
        if self.limit is not None and quantity_bytes(self.request) > quantity_bytes(self.limit):
            raise ValueError("request must not exceed limit")
        return self


class GpuSpec(ApiModel):
    """A share of one GPU: a fraction of its memory, or an absolute request/limit."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            {
                "rule": "has(self.fraction) != has(self.memory)",
                "message": "set exactly one of fraction or memory",
            }
        )
    )

    fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of one GPU's memory (0 < fraction <= 1); request = limit = fraction x capacity.",
    )
    memory: GpuMemory | None = None
    product: LabelValue | None = Field(
        default=None,
        description="Only GPUs whose nvidia.com/gpu.product label equals this, e.g. NVIDIA-H100-80GB-HBM3.",
    )

    @model_validator(mode="after")
    def _fraction_or_memory(self) -> "GpuSpec":
        if (self.fraction is None) == (self.memory is None):
            raise ValueError("set exactly one of fraction or memory")
        return self


class AutoscalingSpec(ApiModel):
    """Concurrency-based scaling (stable and panic windows, as in Knative's KPA).

    ``mode: berth`` runs Berth's autoscaler (``autoscaler.py``), which sets ``spec.replicas``;
    ``mode: external`` leaves ``spec.replicas`` to the user's HPA or KEDA, pointed at the
    service's ``scale`` subresource.
    """

    model_config = ConfigDict(
        json_schema_extra=validations(
            {
                "rule": "self.panicWindowSeconds <= self.stableWindowSeconds",
                "message": "panicWindowSeconds must not exceed stableWindowSeconds",
                "fieldPath": ".panicWindowSeconds",
            },
            {
                "rule": "has(self.prometheusUrl) == (self.metrics == 'Prometheus')",
                "message": "prometheusUrl is required with metrics: Prometheus and only then",
                "fieldPath": ".prometheusUrl",
            },
        )
    )

    mode: Literal["berth", "external"] = Field(
        default="berth",
        description="berth: Berth's autoscaler sets spec.replicas; external: an HPA or KEDA "
        "scales the service through its scale subresource.",
    )
    target_concurrency: float = Field(
        default=8, gt=0, description="In-flight requests per replica."
    )
    target_utilization: float = Field(
        default=0.7,
        gt=0,
        le=1,
        description="Share of targetConcurrency to aim for, leaving headroom for bursts.",
    )
    scale_down_delay_seconds: int = Field(
        default=120,
        ge=0,
        le=3600,
        description="Remove replicas only down to the most wanted over this many seconds; the "
        "surplus parks meanwhile (Knative's default is 0; a removed replica costs a cold start).",
    )
    stable_window_seconds: int = Field(
        default=60, ge=6, le=3600, description="Seconds of concurrency averaged for steady scaling."
    )
    panic_window_seconds: int = Field(
        default=6, ge=1, le=600, description="Seconds averaged to detect a burst (panic mode)."
    )
    panic_threshold: float = Field(
        default=2.0, gt=1, description="Panic when demand exceeds this multiple of capacity."
    )
    max_scale_up_rate: float = Field(default=10.0, gt=1, description="Most growth factor per step.")
    max_scale_down_rate: float = Field(
        default=2.0, gt=1, description="Most shrink factor per step."
    )
    metrics: Literal["Pods", "Prometheus"] = Field(
        default="Pods",
        description="Read concurrency from the runtimes' /metrics or from Prometheus.",
    )
    prometheus_url: str | None = Field(
        default=None,
        pattern="^https?://",
        max_length=2048,
        description="Prometheus' base URL, with metrics: Prometheus (its /api/v1/query is read).",
    )
    prometheus_selector: str | None = Field(
        default=None,
        max_length=1024,
        description="PromQL label matchers of one service's runtime series; {namespace} and "
        '{name} are filled in. Default: namespace="{namespace}",pod=~"{name}-[a-z0-9]+-[a-z0-9]+".',
    )

    @model_validator(mode="after")
    def _consistent(self) -> "AutoscalingSpec":
        if self.panic_window_seconds > self.stable_window_seconds:
            raise ValueError("panicWindowSeconds must not exceed stableWindowSeconds")
        if (self.prometheus_url is not None) != (self.metrics == "Prometheus"):
            raise ValueError("prometheusUrl is required with metrics: Prometheus and only then")
        return self


class StandbySpec(ApiModel):
    """Warm standby: idle replicas park in host RAM instead of being deleted."""

    enabled: bool = Field(default=True, description="Park idle replicas rather than remove them.")
    idle_seconds: int = Field(default=300, ge=0, description="Idle time before a replica parks.")
    min_active_replicas: int = Field(
        default=0, ge=0, description="Replicas that never park (0 = scale to standby)."
    )
    host_memory: PositiveQuantity | None = Field(
        default=None,
        description="Host memory for a replica's parked copy of its weights, e.g. 16Gi: added to "
        "the runtime container's memory request (and limit, if one is set), so that the "
        "scheduler places replicas only on nodes whose memory holds their standby copies.",
    )


Protocol = Literal["TCP", "UDP"]


class EgressRule(ApiModel):
    cidrs: list[Cidr] = Field(
        default_factory=list, max_length=64, description="Allowed destination CIDRs."
    )
    hosts: list[HostName] = Field(
        default_factory=list,
        max_length=64,
        description="Allowed destination host names (one leading `*.` wildcard label allowed).",
    )
    ports: list[Port] = Field(
        default_factory=list, max_length=64, description="Allowed ports; empty means all ports."
    )
    protocols: list[Protocol] = Field(
        default_factory=lambda: ["TCP"],  # type: ignore[arg-type]
        min_length=1,
        max_length=2,
        description="Transport protocols the ports are allowed for.",
        json_schema_extra={"default": ["TCP"]},
    )


class IngressRule(ApiModel):
    cidrs: list[Cidr] = Field(
        default_factory=list, max_length=64, description="Allowed source CIDRs."
    )
    namespace_labels: Labels = Field(
        default_factory=dict, max_length=32, description="Allowed source namespaces, by label."
    )
    pod_labels: Labels = Field(
        default_factory=dict, max_length=32, description="Allowed source pods, by label."
    )


# ``enabled`` seals the pods (``sandbox.py``: a NetworkPolicy and, where installed, Cilium and
# Tetragon policies; pod hardening; the seccomp profile); ``egress``, ``ingress`` and
# ``deniedSyscalls`` say what the seal lets through. ``runtimeClassName`` and
# ``maxRequestSeconds`` act either way.
class SandboxSpec(ApiModel):
    """Seal the runtime for agent workloads: network allowlists, syscall denials, limits."""

    enabled: bool = Field(default=False, description="Seal the pods with the policies below.")
    egress: list[EgressRule] = Field(
        default_factory=list, max_length=32, description="Default deny; allow these."
    )
    ingress: list[IngressRule] = Field(
        default_factory=list, max_length=32, description="Default deny; allow these."
    )
    denied_syscalls: list[SyscallName] = Field(
        default_factory=list, max_length=512, description="Syscalls refused (EPERM)."
    )
    runtime_class_name: DnsSubdomain | None = Field(
        default=None, description="RuntimeClass of the runtime's pods (e.g. gvisor, kata)."
    )
    max_request_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Longest a request may run, arrival to last token; then 408 and it is aborted.",
    )


class InferenceServiceSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            {
                "rule": "!has(self.maxReplicas) || self.maxReplicas >= self.minReplicas",
                "message": "maxReplicas must be at least minReplicas",
                "fieldPath": ".maxReplicas",
            },
            {
                "rule": "!has(self.replicas) || !has(self.maxReplicas) || self.replicas <= self.maxReplicas",
                "message": "replicas must not exceed maxReplicas",
                "fieldPath": ".replicas",
            },
            {
                "rule": "!has(self.standby) || !has(self.maxReplicas) "
                "|| self.standby.minActiveReplicas <= self.maxReplicas",
                "message": "standby.minActiveReplicas must not exceed maxReplicas",
                "fieldPath": ".standby.minActiveReplicas",
            },
        )
    )

    model: ModelSpec = Field(description="The model to serve and where its weights come from.")
    gpu: GpuSpec
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, json_schema_extra={"default": {}})
    replicas: int | None = Field(
        default=None,
        ge=0,
        description="Desired replicas (the scale subresource); unset means minReplicas.",
    )
    min_replicas: int = Field(
        default=1,
        ge=0,
        description="Fewest replicas (active or standby). 0 runs none; Berth's autoscaler keeps "
        "at least one (it scales to standby, not to zero: a request is what wakes a parked one).",
    )
    max_replicas: int | None = Field(default=None, ge=1, description="Most replicas.")
    autoscaling: AutoscalingSpec | None = None
    standby: StandbySpec | None = None
    sandbox: SandboxSpec | None = None
    pod: PodOverrides = Field(default_factory=PodOverrides, json_schema_extra={"default": {}})

    @model_validator(mode="after")
    def _replica_bounds(self) -> "InferenceServiceSpec":
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError("maxReplicas must be at least minReplicas")
        too_many = (
            self.replicas is not None
            and self.max_replicas is not None
            and self.replicas > self.max_replicas
        )
        if too_many:
            raise ValueError("replicas must not exceed maxReplicas")
        active = self.standby.min_active_replicas if self.standby else 0
        if self.max_replicas is not None and active > self.max_replicas:
            raise ValueError("standby.minActiveReplicas must not exceed maxReplicas")
        return self

    def desired_replicas(self) -> int:
        """The replica count to run: ``replicas`` (or ``minReplicas``) clamped to the bounds."""
        wanted = self.min_replicas if self.replicas is None else self.replicas
        wanted = max(wanted, self.min_replicas)
        return wanted if self.max_replicas is None else min(wanted, self.max_replicas)


# Spec fields that the API accepts but no controller acts on yet, as camelCase paths under
# ``spec``. A service that sets one gets the condition ``FieldsNotActedOn`` naming it; whoever
# makes a field act removes it from this tuple.
NOT_ACTED_ON: tuple[str, ...] = ()
# The sandbox's allowlists and denials act only under ``sandbox.enabled: true``; set without it,
# they are reported as not acted on too.
SEALED_ONLY: tuple[str, ...] = ("sandbox.egress", "sandbox.ingress", "sandbox.deniedSyscalls")
# Read by Berth's autoscaler alone, so acted on only under ``autoscaling.mode: berth``: without
# it each replica parks on its own idle timer, and an external HPA or KEDA reads none of them.
AUTOSCALER_ONLY: tuple[str, ...] = (
    "standby.minActiveReplicas",
    *(
        f"autoscaling.{field.alias or name}"
        for name, field in AutoscalingSpec.model_fields.items()
        if name != "mode"
    ),
)


def fields_not_acted_on(spec: InferenceServiceSpec) -> tuple[str, ...]:
    """The ``NOT_ACTED_ON`` paths (and ``SEALED_ONLY`` ones without an enabled sandbox,
    ``AUTOSCALER_ONLY`` ones without Berth's autoscaler) that ``spec`` sets to something other
    than their default (the API server fills defaults in, so "present" alone would flag every
    default)."""
    sealed = spec.sandbox is not None and spec.sandbox.enabled
    autoscaled = spec.autoscaling is not None and spec.autoscaling.mode == "berth"
    found = []
    paths = NOT_ACTED_ON + (() if sealed else SEALED_ONLY) + (() if autoscaled else AUTOSCALER_ONLY)
    for path in paths:
        node: Any = spec
        for depth, part in enumerate(parts := path.split(".")):
            model = type(node)
            name = next(n for n, f in model.model_fields.items() if (f.alias or n) == part)
            value = getattr(node, name)
            if value == model.model_fields[name].get_default(call_default_factory=True):
                break
            if depth == len(parts) - 1:
                found.append(f"spec.{path}")
            node = value
    return tuple(found)


# --- status --------------------------------------------------------------------------------


class Condition(ApiModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern="^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time.")


class AutoscalerDecision(ApiModel):
    reason: str = Field(description="CamelCase, e.g. ScaledUp, Panic, MetricsStale.")
    message: str = ""
    time: str | None = Field(default=None, description="RFC 3339 time.")


class InferenceServiceStatus(ApiModel):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    replicas: int = Field(default=0, description="Pods that exist.")
    ready_replicas: int = Field(default=0, description="Pods passing readiness.")
    standby_replicas: int = Field(default=0, description="Pods parked in host memory.")
    selector: str = Field(default="", description="Label selector of the pods (scale subresource).")
    desired_replicas: int | None = Field(
        default=None, description="Replicas the autoscaler last asked for (active + standby)."
    )
    active_replicas: int | None = Field(
        default=None, description="Of those, replicas the autoscaler wants active (not parked)."
    )
    last_scale_time: str | None = Field(
        default=None, description="RFC 3339 time the autoscaler last changed spec.replicas."
    )
    last_decision: AutoscalerDecision | None = Field(
        default=None, description="The autoscaler's last decision that changed something."
    )
    url: str | None = Field(default=None, description="In-cluster endpoint of the OpenAI API.")


class InferenceService(ApiModel):
    """A model served on a share of a GPU, packed next to others by Berth's scheduler."""

    api_version: str = "berth.dev/v1alpha1"
    kind: Literal["InferenceService"] = "InferenceService"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: InferenceServiceSpec
    status: InferenceServiceStatus | None = None
