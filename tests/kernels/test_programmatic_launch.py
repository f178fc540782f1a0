"""When the decode path's kernels launch with programmatic dependent launch: only when asked
(``BERTH_PDL=1``), on a CUDA device of compute capability 9 or later, never in the interpreter."""

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
def test_asked_for_it_takes_hopper_or_later(
    compiled_kernels: pytest.MonkeyPatch, capability: tuple[int, int], expected: bool
) -> None:
    compiled_kernels.setenv("BERTH_PDL", "1")
    compiled_kernels.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert checks.programmatic_launch(CUDA) is expected
    assert checks.launch_options(CUDA) == ({"PDL": True, "launch_pdl": True} if expected else {})


@pytest.mark.parametrize("value", [None, "0", "", "yes"])
def test_off_unless_asked_for_with_1(
    compiled_kernels: pytest.MonkeyPatch, value: str | None
) -> None:
    compiled_kernels.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    if value is None:
        compiled_kernels.delenv("BERTH_PDL", raising=False)
    else:
        compiled_kernels.setenv("BERTH_PDL", value)
    assert checks.programmatic_launch(CUDA) is False


def test_never_in_the_interpreter_or_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTH_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert checks.programmatic_launch(CUDA) is False
    monkeypatch.delenv("TRITON_INTERPRET")
    assert checks.programmatic_launch(torch.device("cpu")) is False
