"""The value types of the ``InferenceService`` API, each checked twice with one meaning.

Every type here carries a pydantic check (``berth plan`` and the reconciler parse with it) and
the CEL rule or OpenAPI constraint that the API server runs at admission, side by side, so the
two cannot drift apart unnoticed: ``e2e/admission_cases.py`` is one table of refused values that
both must refuse, naming the same field. CEL functions used are those of Kubernetes 1.34's
libraries (``isQuantity``/``quantity``, ``isCIDR``/``cidr``, ``isIP``).
"""

import ipaddress
from decimal import Decimal
from typing import Annotated, Any

from kubernetes.utils import parse_quantity
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from berth.operator.syscalls import SYSCALL_NAMES


class ApiModel(BaseModel):
    """camelCase on the wire, unknown fields refused (the API server prunes them anyway)."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """Attach CEL rules (``x-kubernetes-validations``) to a model or field schema."""
    return {"x-kubernetes-validations": list(rules)}


def quantity_value(value: str) -> Decimal:
    try:
        return Decimal(parse_quantity(value))
    except ValueError as error:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 20Gi)") from error


def _positive_quantity(value: str) -> str:
    if quantity_value(value) <= 0:
        raise ValueError(f"must be a positive quantity such as 20Gi, not {value!r}")
    return value


def _non_negative_quantity(value: str) -> str:
    if quantity_value(value) < 0:
        raise ValueError(f"must be a non-negative quantity such as 500m or 2Gi, not {value!r}")
    return value


# A quantity that must be above zero (GPU memory) and one that may be zero (CPU, memory).
PositiveQuantity = Annotated[
    str,
    Field(
        max_length=64,
        json_schema_extra=validations(
            {
                "rule": "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
                "message": "must be a positive quantity such as 20Gi",
            }
        ),
    ),
    AfterValidator(_positive_quantity),
]
Quantity = Annotated[
    str,
    Field(
        max_length=64,
        json_schema_extra=validations(
            {
                "rule": "isQuantity(self) && !quantity(self).isLessThan(quantity('0'))",
                "message": "must be a non-negative quantity such as 500m or 2Gi",
            }
        ),
    ),
    AfterValidator(_non_negative_quantity),
]


def _cidr(value: str) -> str:
    """What the API server's ``isCIDR`` accepts, in its network form (no host bits set)."""
    try:
        network = ipaddress.ip_network(value, strict=True) if "/" in value else None
    except ValueError:
        network = None
    mapped = isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped
    if network is None or mapped:
        raise ValueError(f"must be a CIDR such as 10.0.0.0/8 with no host bits set, not {value!r}")
    return value


Cidr = Annotated[
    str,
    Field(
        max_length=64,
        json_schema_extra=validations(
            {
                "rule": "isCIDR(self) && cidr(self).ip() == cidr(self).masked().ip()",
                "message": "must be a CIDR such as 10.0.0.0/8 with no host bits set",
            }
        ),
    ),
    AfterValidator(_cidr),
]

DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_SUBDOMAIN = rf"^{DNS_LABEL}(\.{DNS_LABEL})*$"


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return value
    raise ValueError(f"{value!r} is an address: list it under cidrs as {value}/32 (or /128)")


# A DNS name to allow, optionally one leading wildcard label (``*.example.com``); not an address.
HostName = Annotated[
    str,
    Field(
        max_length=253,
        pattern=rf"^(\*\.)?{DNS_LABEL}(\.{DNS_LABEL})*$",
        json_schema_extra=validations(
            {"rule": "!isIP(self)", "message": "an address belongs under cidrs, not hosts"}
        ),
    ),
    AfterValidator(_host),
]
DnsSubdomain = Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _syscall(name: str) -> str:
    if name not in SYSCALL_NAMES:
        raise ValueError(f"{name!r} is not a Linux system call name")
    return name


SyscallName = Annotated[
    str,
    Field(max_length=64, json_schema_extra={"enum": sorted(SYSCALL_NAMES)}),
    AfterValidator(_syscall),
]


# Label keys and values as Kubernetes defines them (a qualified name, an optional DNS prefix).
_QUALIFIED = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = rf"^({DNS_LABEL}(\.{DNS_LABEL})*/)?{_QUALIFIED}$"
LabelKey = Annotated[str, Field(max_length=317, pattern=LABEL_KEY)]
LabelValue = Annotated[str, Field(max_length=63, pattern=rf"^({_QUALIFIED})?$")]
Labels = dict[LabelKey, LabelValue]


def quantity_bytes(value: str) -> int:
    """A memory quantity in whole bytes (``20Gi`` -> 21474836480)."""
    return int(quantity_value(value))


def field_errors(error: ValidationError) -> str:
    """Each error as ``spec.sandbox.egress[0].cidrs[0]: message``, the API server's spelling."""
    lines = []
    for item in error.errors():
        path = ""
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
        lines.append(f"{path}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)
