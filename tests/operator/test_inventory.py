"""The node inventory: one YAML shape for kwok clusters, e2e tests and `berth plan`."""

from pathlib import Path

import pytest

from berth.operator.inventory import DEFAULT_INVENTORY, Inventory, load_inventory


def test_default_inventory_is_four_nodes_of_eight_gpus_and_one_cpu_node() -> None:
    names = [n for group in DEFAULT_INVENTORY.nodes for n in group.node_names()]
    assert names == ["gpu-node-0", "gpu-node-1", "gpu-node-2", "gpu-node-3", "cpu-node"]
    assert DEFAULT_INVENTORY.gpu_count == 32
    labels = DEFAULT_INVENTORY.nodes[0].node_labels()
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.memory"] == "81559"
    assert DEFAULT_INVENTORY.nodes[1].node_labels() == {}


def test_load_inventory_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "nodes.yaml"
    path.write_text(
        "nodes:\n- name: l4\n  count: 2\n  gpus: 4\n  gpuProduct: NVIDIA-L4\n  gpuMemoryMiB: 23034\n"
        "  taints: [{key: gpu, value: l4, effect: NoSchedule}]\n"
    )
    inventory = load_inventory(path)
    assert inventory.gpu_count == 8
    assert inventory.nodes[0].node_names() == ["l4-0", "l4-1"]
    assert inventory.nodes[0].taints[0].effect == "NoSchedule"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes: []", "at least 1 item"),
        ("nodes:\n- name: a\n  gpus: 2\n", "set gpuProduct and gpuMemoryMiB"),
        ("nodes:\n- name: a\n  gpuProduct: X\n", "sets GPU fields but gpus is 0"),
        ("nodes:\n- name: a\n- name: a\n", "duplicate node names: a"),
        ("nodes:\n- name: a\n  colour: red\n", "colour"),
        ("nodes:\n- name: Bad_Name\n", "name"),
        ("nodes: [\n", "cannot read inventory"),
    ],
)
def test_bad_inventory_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "nodes.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_inventory(path)


def test_inventory_round_trips_through_its_yaml_aliases() -> None:
    dumped = DEFAULT_INVENTORY.model_dump(by_alias=True)
    assert Inventory.model_validate(dumped) == DEFAULT_INVENTORY


def test_example_inventory_file_is_the_built_in_default() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "inventory.yaml"
    assert load_inventory(example) == DEFAULT_INVENTORY
