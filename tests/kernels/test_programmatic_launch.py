"""When the decode path's kernels launch with programmatic dependent launch: on a CUDA device of
compute capability 9 or later unless ``BERTH_PDL=0``, never in the interpreter."""

from __future__ import annotations

import pytest
import torch

from berth.kernels import checks

CUDA = torch.device("cuda", 0)


@pytest.fixture
def compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """As on a GPU machine: kernels compiled, not interpreted."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), True), ((10, 0), True),
                                                      ((8, 9), False), ((8, 0), False)])  # fmt: skip
def test_on_by_default_from_hopper_on(
    compiled_kernels: pytest.MonkeyPatch, capability: tuple[int, int], expected: bool
) -> None:
    compiled_kernels.delenv("BERTH_PDL", raising=False)
    compiled_kernels.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert checks.programmatic_launch(CUDA) is expected
    assert checks.launch_options(CUDA) == ({"PDL": True, "launch_pdl": True} if expected else {})


@pytest.mark.parametrize(("value", "expected"), [("0", False), ("1", True), ("", True)])
def test_off_only_when_set_to_0(
    compiled_kernels: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    compiled_kernels.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    compiled_kernels.setenv("BERTH_PDL", value)
    assert checks.programmatic_launch(CUDA) is expected


def test_never_in_the_interpreter_or_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BERTH_PDL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert checks.programmatic_launch(CUDA) is False
    monkeypatch.delenv("TRITON_INTERPRET")
    assert checks.programmatic_launch(torch.device("cpu")) is False
