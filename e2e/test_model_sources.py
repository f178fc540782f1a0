"""The real API server admits the model sources Berth can fetch or mount and refuses the rest
with the CRD's own message (CEL rules from operator/api.py), before any pod exists; and it
accepts the Deployment that render() makes for each source (volumes, fetch-model init container).
"""

from typing import Any

import pytest
import yaml

from berth.cluster.cluster import ClusterError, LocalCluster
from berth.e2e.operator_fixtures import install_crds, service_manifest
from berth.operator import api, render
from berth.operator.settings import OperatorSettings

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def crds(cluster: LocalCluster) -> LocalCluster:
    install_crds(cluster)
    return cluster


def dry_run(cluster: LocalCluster, source: dict[str, Any]) -> str:
    """Server-side dry run: the whole admission chain, nothing stored."""
    manifest = service_manifest("sources", "default", 0.5)
    manifest["spec"]["model"] = {"source": source}
    return cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(manifest))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"uri": "s3://bucket/llama"}, "s3:// and gs:// model URIs are not implemented"),
        ({"uri": "gs://bucket/llama"}, "s3:// and gs:// model URIs are not implemented"),
        ({"uri": "ftp://host/m.tar"}, "uri must start with https://, http:// or hf://"),
        ({"uri": "hf://just-a-name"}, "hf://org/repo or hf://org/repo@revision"),
        ({"uri": "hf://org/repo", "sha256": "a" * 64}, "pin hf:// with @revision"),
        ({"pvc": {"claimName": "m", "path": "../other"}}, "inside the volume"),
    ],
)
def test_api_server_refuses_unfetchable_sources_with_the_reason(
    crds: LocalCluster, source: dict[str, Any], message: str
) -> None:
    with pytest.raises(ClusterError, match=message.replace(".", r"\.")):
        dry_run(crds, source)


@pytest.mark.parametrize(
    "source",
    [
        {"uri": "https://models.internal/smollm2.tar.gz", "sha256": "0" * 64},
        {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"},
        {"pvc": {"claimName": "m", "path": "team/llama"}},
        {"image": {"reference": "registry.local/weights:1", "path": "smollm2"}},
    ],
)
def test_api_server_admits_fetchable_sources(crds: LocalCluster, source: dict[str, Any]) -> None:
    assert "(server dry run)" in dry_run(crds, source)


@pytest.mark.parametrize(
    "source",
    [
        {"uri": "https://models.internal/smollm2.tar.gz", "sha256": "0" * 64},
        {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
        {"pvc": {"claimName": "m", "path": "team/llama"}},
        {"hostPath": {"path": "/var/lib/berth/models/smollm2"}},
        {"image": {"reference": "registry.local/weights:1", "path": "smollm2"}},
    ],
)
def test_api_server_accepts_the_rendered_pod_of_each_source(
    cluster: LocalCluster, source: dict[str, Any]
) -> None:
    """The Deployment render() makes (volumes, the fetch-model init container) is valid."""
    manifest = service_manifest("sources", "default", 0.5)
    manifest["spec"]["model"] = {"source": source}
    manifest["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    service = api.InferenceService.model_validate(manifest)
    deployment = render.deployment(service, OperatorSettings(runtime_image="berth-runtime:e2e"))
    deployment["metadata"].pop("ownerReferences")  # the owner does not exist in a dry run
    output = cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(deployment)
    )
    assert "(server dry run)" in output
