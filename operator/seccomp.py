"""The seccomp profile of a sandboxed runtime, generated from ``spec.sandbox.deniedSyscalls``.

Pure. The profile is the JSON the kubelet hands to the container runtime for a ``Localhost``
seccomp profile (the Docker/OCI format that containerd and CRI-O read). Its shape: **allow by
default, refuse a baseline deny list plus the user's names with EPERM** (``ERRNO``, errno 1).
Not an allowlist (the shape of Docker's default profile): an allowlist has to name every system
call that Python, PyTorch, the CUDA driver and their libraries may make, on each architecture and
kernel, and a missing one kills the runtime on some rare path, in production. A ``Localhost``
profile replaces the container runtime's default profile, so the baseline puts back what the
default profile refuses to a container without capabilities and what an inference server never
needs: kernel modules, kexec, reboot, mounts and new namespaces, the keyring, BPF, perf, clock
and swap changes (defence in depth: with every capability dropped most of
these fail anyway, but the filter stops them before the kernel code that checks capabilities).
``execve`` is never in the baseline: the container's own first process is started by an
``execve`` under the filter, so denying it means the pod can never start (a user may still ask).

The profile is deterministic (names sorted, one JSON spelling) and named by its content hash:
``berth/<sha256>.json`` under the kubelet's seccomp folder, so two services with the same policy
share one file, a changed policy never rewrites a file a running pod uses, and a name says
exactly which content it holds. It reaches the node in a pod annotation
(``wire.POD_SECCOMP_PROFILE``); the node agent writes it there (``runtime/agent/seccomp_sync.py``)
before the kubelet starts the container, and the kubelet retries a profile that is not there yet.
"""

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from berth.operator.syscalls import SYSCALL_NAMES

PROFILE_DIR = "berth"  # the profiles' folder under the kubelet's <root-dir>/seccomp
EPERM = 1

# System calls refused to every sandboxed runtime (Docker's default profile refuses each of them
# to a container without the capability that would make it work).
BASELINE_DENIED: tuple[str, ...] = tuple(sorted("""
    acct add_key bpf clock_adjtime clock_settime create_module delete_module finit_module
    fsconfig fsmount fsopen fspick get_kernel_syms init_module ioperm iopl kcmp kexec_file_load
    kexec_load keyctl lookup_dcookie mount mount_setattr move_mount nfsservctl open_by_handle_at
    open_tree perf_event_open pivot_root query_module quotactl reboot request_key setdomainname
    sethostname setns settimeofday swapoff swapon syslog umount2 unshare uselib userfaultfd
    vhangup
""".split()))  # fmt: skip  # noqa: SIM905 (names read better as text)

# Architectures the filter covers: the node's native one and its compatibility modes (a 32-bit
# binary would otherwise slip past a filter written for the 64-bit numbers).
ARCHITECTURES: tuple[str, ...] = (
    "SCMP_ARCH_X86_64",
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_ARM",
)


def denied(user_denied: Iterable[str]) -> list[str]:
    """The system calls the profile refuses: the baseline and the user's, sorted, once each."""
    names = set(BASELINE_DENIED) | set(user_denied)
    unknown = names - SYSCALL_NAMES
    if unknown:  # admission refuses these; a caller that skipped it learns here
        raise ValueError(f"not Linux system call names: {', '.join(sorted(unknown))}")
    return sorted(names)


def profile(user_denied: Iterable[str]) -> dict[str, Any]:
    """The profile as data: allow everything except ``denied(user_denied)``, which get EPERM.

    A name an architecture lacks (``fork`` on arm64) is skipped by the container runtime there."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": list(ARCHITECTURES),
        "syscalls": [
            {"names": denied(user_denied), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        ],
    }


def profile_json(user_denied: Iterable[str]) -> str:
    """The one spelling of the profile: what is hashed, annotated and written on the node."""
    return json.dumps(profile(user_denied), sort_keys=True, separators=(",", ":")) + "\n"


def profile_name(text: str) -> str:
    """``berth/<sha256>.json``: the ``localhostProfile`` path of the profile ``text``, relative
    to the kubelet's seccomp folder."""
    return f"{PROFILE_DIR}/{hashlib.sha256(text.encode()).hexdigest()}.json"
