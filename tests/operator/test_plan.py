"""`berth plan`: the scheduler's placement, dry-run, on manifests and an inventory."""

from pathlib import Path

import yaml
from click.testing import CliRunner

from berth.cli import main
from berth.cluster.realnode import NODE_NAME, TAINT_KEY, RealNodeShape
from berth.operator.inventory import DEFAULT_INVENTORY

ROOT = Path(__file__).resolve().parents[2]


def write_services(tmp_path: Path, fractions: list[float], replicas: int = 1) -> Path:
    docs = [
        {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": f"m{i}"},
            "spec": {
                "model": {"source": {"uri": "hf://o/m"}},
                "gpu": {"fraction": f},
                "replicas": replicas,
            },
        }
        for i, f in enumerate(fractions)
    ]
    path = tmp_path / "services.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_plan_prints_a_table_of_gpus_and_tenants(tmp_path: Path) -> None:
    manifests = write_services(tmp_path, [0.5, 0.5, 0.25, 0.75])
    result = CliRunner().invoke(main, ["plan", str(manifests)])
    assert result.exit_code == 0, result.output
    assert "4/4 pods placed on 2 GPUs (lower bound 2)" in result.output
    assert "m0-0 (39.8Gi), m1-0 (39.8Gi)" in result.output


def test_plan_reads_the_inventory_and_reports_what_does_not_fit(tmp_path: Path) -> None:
    inventory = tmp_path / "nodes.yaml"
    inventory.write_text(
        yaml.safe_dump(
            {"nodes": [{"name": "g", "gpus": 1, "gpuProduct": "L4", "gpuMemoryMiB": 23034}]}
        )
    )
    manifests = write_services(tmp_path, [0.75, 0.5])
    result = CliRunner().invoke(
        main, ["plan", str(manifests), "--inventory", str(inventory), "-o", "yaml"]
    )
    assert result.exit_code == 2
    summary = yaml.safe_load(result.output)
    assert summary["gpusUsed"] == 1 and summary["lowerBound"] == 2
    assert "0/1 GPUs fit" in summary["placements"][1]["unplaced"]


def test_plan_accepts_the_examples(tmp_path: Path) -> None:
    """On the local cluster's nodes: the default kwok inventory plus the real node, where the
    CPU demo's services go."""
    shape = RealNodeShape()
    inventory = DEFAULT_INVENTORY.model_dump(by_alias=True, exclude_defaults=True)
    inventory["nodes"].append({
        "name": NODE_NAME, "gpus": shape.gpus, "gpuProduct": shape.gpu_product,
        "gpuMemoryMiB": shape.gpu_memory_mib,
        "taints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
    })  # fmt: skip
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(inventory))
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    result = CliRunner().invoke(
        main, ["plan", *examples, "--inventory", str(tmp_path / "nodes.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert "placed on" in result.output


def test_plan_names_the_invalid_manifest(tmp_path: Path) -> None:
    manifests = write_services(tmp_path, [1.5])
    result = CliRunner().invoke(main, ["plan", str(manifests)])
    assert result.exit_code == 1 and "'m0'" in result.output and "fraction" in result.output
