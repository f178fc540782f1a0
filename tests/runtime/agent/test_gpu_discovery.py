"""GPU discovery: the simulation spec (CI) and NVML (on the GPU machine)."""

import ctypes
import shutil
import subprocess

import pytest

from berth.runtime.agent.gpus import DriverFree, GpuDiscoveryError, nvml, simulated

GIB = 2**30


def nvml_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_a_counted_spec_gives_stable_uuids_per_node() -> None:
    gpus = simulated("2x80Gi", node="node-a", reserved=GIB)
    assert [g.index for g in gpus] == [0, 1]
    assert all(g.capacity == 80 * GIB and g.allocatable == 79 * GIB for g in gpus)
    assert len({g.uuid for g in gpus}) == 2
    assert [g.uuid for g in simulated("2x80Gi", node="node-a")] == [g.uuid for g in gpus]
    assert simulated("2x80Gi", node="node-b")[0].uuid != gpus[0].uuid


def test_an_explicit_spec_keeps_its_uuids_and_order() -> None:
    gpus = simulated("GPU-x:40Gi,GPU-y:1000Mi")
    assert [(g.uuid, g.index, g.capacity) for g in gpus] == [
        ("GPU-x", 0, 40 * GIB),
        ("GPU-y", 1, 1000 * 2**20),
    ]


@pytest.mark.parametrize("spec", ["", "0x80Gi", "2xlots", "GPU-a", "GPU-a:1Gi,GPU-a:2Gi", ":1Gi"])
def test_a_bad_spec_is_an_error_that_shows_the_expected_form(spec: str) -> None:
    with pytest.raises(GpuDiscoveryError, match=r"expected e\.g\. 2x80Gi|describes no GPU|repeats"):
        simulated(spec)


@pytest.mark.gpu
@pytest.mark.skipif(not nvml_present(), reason="needs NVML (a GPU machine)")
def test_nvml_finds_every_gpu_with_the_uuid_and_memory_nvidia_smi_reports() -> None:
    smi = shutil.which("nvidia-smi")
    assert smi, "NVML is present but nvidia-smi is not"
    rows = subprocess.run(
        [smi, "--query-gpu=index,uuid,memory.total,name", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()  # fmt: skip
    expected = [[part.strip() for part in row.split(",")] for row in rows]
    gpus = nvml(reserved=GIB)
    assert [(str(g.index), g.uuid, str(g.capacity // 2**20), g.name) for g in gpus] == [
        tuple(row) for row in expected
    ]
    assert all(g.allocatable == g.capacity - GIB for g in gpus)


@pytest.mark.gpu
@pytest.mark.skipif(not nvml_present(), reason="needs NVML (a GPU machine)")
def test_the_drivers_free_memory_is_read_for_every_gpu_and_tracks_an_allocation() -> None:
    gpus = nvml()
    free = DriverFree([g.uuid for g in gpus])
    try:
        before = free()
        assert set(before) == {g.uuid for g in gpus}
        assert all(0 < before[g.uuid] <= g.capacity for g in gpus)
        torch = pytest.importorskip("torch")
        block = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda:0")
        after = free()[gpus[0].uuid]
        assert before[gpus[0].uuid] - after >= 2 * GIB - 64 * 2**20  # seen by the driver
        del block
    finally:
        free.close()
