"""``spec.pod``: settings merged into the rendered pod, checked as the API server checks them.

Whatever the Deployment would refuse later (a toleration's operator without a key, a request
above its limit) is refused here at admission instead, naming the field; and a tenant cannot
reach the GPU assignment through the pod: the env vars Berth derives from the assigned GPU and
the ``nvidia.com/gpu`` resource are refused (``spec.gpu`` is the only way to ask for a GPU).
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from berth import wire
from berth.operator.api_types import (
    LABEL_KEY,
    ApiModel,
    DnsSubdomain,
    LabelKey,
    Labels,
    Quantity,
    quantity_value,
    validations,
)

# Env vars Berth sets itself (the GPU the scheduler assigned and its budget, the pod's identity
# with the node agent and its socket, MPS, standby and the admin token); a tenant may not
# override them: a user value would come after Berth's and win. A test renders every kind of
# pod and checks that each variable Berth sets is here.
RESERVED_ENV = (
    wire.ENV_VISIBLE_DEVICES,
    wire.ENV_POD_NAME,
    wire.ENV_POD_NAMESPACE,
    wire.ENV_AGENT_SOCKET,
    wire.ENV_MPS_DIR,
    wire.ENV_STANDBY_IDLE_SECONDS,
    wire.ENV_ADMIN_TOKEN,
)
RESERVED_ENV_PREFIX = "BERTH_GPU_"
# Label and annotation keys under Berth's domain are Berth's: the scheduler's GPU ledger, the
# standby mark, the sandbox's policies, routing. A tenant's would be overwritten, or worse, read
# (a pod marked as parked books no GPU memory).
RESERVED_KEY_PREFIX = f"{wire.GROUP}/"


class Toleration(ApiModel):
    """A core/v1 Toleration, with the API server's rules for it checked at admission."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            {
                "rule": "self.operator != 'Exists' || !has(self.value)",
                "message": "value must be empty when operator is Exists",
                "fieldPath": ".value",
            },
            {
                "rule": "has(self.key) || self.operator == 'Exists'",
                "message": "operator must be Exists when key is empty",
                "fieldPath": ".operator",
            },
            {
                "rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "message": "tolerationSeconds needs effect NoExecute",
                "fieldPath": ".tolerationSeconds",
            },
        )
    )

    key: LabelKey | None = Field(default=None, description="Taint key; empty with Exists: all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value, with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty: all."
    )
    toleration_seconds: int | None = Field(
        default=None, description="With NoExecute: seconds the pod stays after the taint."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "Toleration":
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("value must be empty when operator is Exists")
        if self.key is None and self.operator != "Exists":
            raise ValueError("operator must be Exists when key is empty")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


def _not_reserved(name: str) -> str:
    if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX):
        raise ValueError(f"{name} is reserved for Berth, which sets it, and cannot be overridden")
    return name


_RESERVED_ENV_RULE = {
    "rule": f"!(self in {list(RESERVED_ENV)!r}) && !self.startsWith({RESERVED_ENV_PREFIX!r})",
    "message": f"is reserved for Berth, which sets it "
    f"({', '.join(RESERVED_ENV)}, {RESERVED_ENV_PREFIX}*), and cannot be overridden",
}


def _no_berth_keys(keys: dict[str, str]) -> dict[str, str]:
    if taken := sorted(k for k in keys if k.startswith(RESERVED_KEY_PREFIX)):
        raise ValueError(f"keys under {RESERVED_KEY_PREFIX} are reserved for Berth: {taken}")
    return keys


_NO_BERTH_KEYS_RULE = {
    "rule": f"self.all(k, !k.startsWith({RESERVED_KEY_PREFIX!r}))",
    "message": f"keys under {RESERVED_KEY_PREFIX} are reserved for Berth",
}
# A map of pod labels or annotations without Berth's keys, checked by pydantic and by the CRD.
_NO_BERTH_KEYS = (
    Field(json_schema_extra=validations(_NO_BERTH_KEYS_RULE)),
    AfterValidator(_no_berth_keys),
)


class EnvVar(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            {
                "rule": "!(has(self.value) && has(self.valueFrom))",
                "message": "set value or valueFrom, not both",
                "fieldPath": ".valueFrom",
            }
        )
    )

    # Printable ASCII but '=' (the API server's relaxed env var names).
    name: Annotated[
        str,
        Field(
            min_length=1,
            max_length=256,
            pattern="^[ -<>-~]+$",
            description="Variable name (those Berth sets, BERTH_GPU_* among them, are reserved).",
            json_schema_extra=validations(_RESERVED_ENV_RULE),
        ),
        AfterValidator(_not_reserved),
    ]
    value: str | None = Field(default=None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="A core/v1 EnvVarSource.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @model_validator(mode="after")
    def _one_source(self) -> "EnvVar":
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        return self


ResourceName = Annotated[str, Field(max_length=317, pattern=LABEL_KEY)]
_NO_GPU_RULE = {
    "rule": f"!('{wire.GPU_RESOURCE}' in self)",
    "message": f"{wire.GPU_RESOURCE} may not be set here: spec.gpu says what GPU share to book",
}


class Resources(ApiModel):
    """CPU and memory of the runtime container; GPUs come from ``spec.gpu`` alone."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            {
                "rule": "!has(self.requests) || !has(self.limits) || self.requests.all(k, "
                "!(k in self.limits) || !quantity(self.requests[k]).isGreaterThan("
                "quantity(self.limits[k])))",
                "message": "a request must not exceed its limit",
                "fieldPath": ".requests",
            }
        )
    )

    requests: dict[ResourceName, Quantity] = Field(
        default_factory=dict,
        max_length=16,
        description="Guaranteed amounts (cpu, memory, ...).",
        json_schema_extra=validations(_NO_GPU_RULE),
    )
    limits: dict[ResourceName, Quantity] = Field(
        default_factory=dict,
        max_length=16,
        description="Ceilings (cpu, memory, ...).",
        json_schema_extra=validations(_NO_GPU_RULE),
    )

    @model_validator(mode="after")
    def _no_gpu_and_within_limits(self) -> "Resources":
        for kind in (self.requests, self.limits):
            if wire.GPU_RESOURCE in kind:
                raise ValueError(_NO_GPU_RULE["message"])
        for name, request in self.requests.items():
            if name in self.limits and quantity_value(request) > quantity_value(self.limits[name]):
                raise ValueError(f"the {name} request must not exceed its limit")
        return self


class PodOverrides(ApiModel):
    """Pod-level settings merged into the rendered Deployment's pod template."""

    node_selector: Labels = Field(
        default_factory=dict, max_length=32, description="Node labels the pods must land on."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the pods tolerate."
    )
    resources: Resources | None = Field(
        default=None, description="CPU and memory for the runtime container (not GPUs)."
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=128, description="Extra environment of the runtime."
    )
    service_account_name: DnsSubdomain | None = Field(
        default=None, description="ServiceAccount of the pods (e.g. for a hub token's Secret)."
    )
    labels: Annotated[Labels, *_NO_BERTH_KEYS] = Field(
        default_factory=dict,
        max_length=64,
        description=f"Extra labels on the pods (not under {RESERVED_KEY_PREFIX}).",
    )
    annotations: Annotated[dict[LabelKey, str], *_NO_BERTH_KEYS] = Field(
        default_factory=dict,
        max_length=64,
        description=f"Extra annotations on the pods (not under {RESERVED_KEY_PREFIX}).",
    )
