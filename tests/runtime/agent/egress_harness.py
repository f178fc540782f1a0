"""The real egress enforcer for the kernel tests: its eBPF object built by the project's Makefile,
loaded with its maps pinned in a bpffs folder of the test's own, removed afterwards. Skips (with
the reason) where the tests cannot load BPF: not root, or a kernel that refuses it."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from berth.runtime.agent.egress import EgressEnforcer, EgressError

REPO = Path(__file__).resolve().parents[3]


@contextmanager
def loaded_enforcer(name: str, **options: Any) -> Iterator[EgressEnforcer]:
    """``EgressEnforcer(**options)`` pinned under ``/sys/fs/bpf/<name>-<pid>``."""
    if os.geteuid() != 0:
        pytest.skip("the egress enforcer loads BPF programs and makes cgroups: run as root")
    subprocess.run(["make", "-s", "ebpf"], cwd=REPO, check=True)
    pins = Path(f"/sys/fs/bpf/{name}-{os.getpid()}")
    try:
        loaded = EgressEnforcer(pin_dir=pins, **options)
    except EgressError as error:
        pytest.skip(f"the kernel refused BPF here: {error}")
    try:
        yield loaded
    finally:
        loaded.close()
        shutil.rmtree(pins)
