"""The generated seccomp profile, deterministic and named by its content, and applied for real: a
child process under it gets EPERM from the denied system calls while the others work.

The child loads the profile as runc does: the default action, the architectures, then each rule's
action for each of its names that the machine's architecture has (libseccomp through
``pyseccomp``).
"""

import hashlib
import json
import subprocess
import sys
from typing import Any

import pytest

from berth.operator import seccomp
from berth.operator.syscalls import SYSCALL_NAMES

pyseccomp = pytest.importorskip("pyseccomp", reason="pyseccomp (requirements.lock) loads profiles")

# Runs in the child: load the profile from stdin, then try each probe and print what it met.
CHILD = r"""
import ctypes, errno, json, os, subprocess, sys, tempfile
import pyseccomp

libc = ctypes.CDLL(None, use_errno=True)

def libc_call(name, *args):
    if getattr(libc, name)(*args) != 0:
        raise OSError(ctypes.get_errno(), name)

profile = json.load(sys.stdin)
actions = {"SCMP_ACT_ALLOW": lambda rule: pyseccomp.ALLOW,
           "SCMP_ACT_ERRNO": lambda rule: pyseccomp.ERRNO(rule.get("errnoRet", errno.EPERM))}
work = tempfile.mkdtemp()  # before the filter: mkdir is allowed anyway, but be plain
flt = pyseccomp.SyscallFilter(actions[profile["defaultAction"]]({}))
for arch in profile["architectures"]:
    try:
        flt.add_arch(getattr(pyseccomp.Arch, arch.removeprefix("SCMP_ARCH_")))
    except FileExistsError:
        pass  # the native one is there from the start
for rule in profile["syscalls"]:
    for name in rule["names"]:
        try:
            flt.add_rule(actions[rule["action"]](rule), name)
        except OSError:
            pass  # not a system call of this architecture: runc skips it too
flt.load()

def probe(call):
    try:
        call()
    except OSError as error:
        return errno.errorcode[error.errno]
    return "ok"

def write():
    with open(os.path.join(work, "file"), "w") as f:
        f.write("hello")

print(json.dumps({
    "getpid": probe(os.getpid),
    "write": probe(write),
    "exec": probe(lambda: subprocess.run(["/bin/true"], check=True)),
    "mkfifo": probe(lambda: os.mkfifo(os.path.join(work, "fifo"))),
    "unshare": probe(lambda: libc_call("unshare", 0x04000000)),  # CLONE_NEWUTS
    # the same name again: harmless even where the filter failed to refuse it
    "sethostname": probe(lambda: libc_call("sethostname", os.uname().nodename.encode(),
                                           len(os.uname().nodename))),
}))
"""


def under(profile_text: str) -> dict[str, str]:
    """What each probe met in a child process under ``profile_text``."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=profile_text,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    outcome: dict[str, str] = json.loads(result.stdout)
    return outcome


def test_a_denied_syscall_gets_eperm_while_allowed_ones_work() -> None:
    met = under(seccomp.profile_json(["execve", "mknodat", "mknod"]))
    assert met["exec"] == "EPERM"
    assert met["mkfifo"] == "EPERM"
    assert met["getpid"] == "ok" and met["write"] == "ok"


def test_the_baseline_is_denied_and_exec_is_not() -> None:
    """As root (CI), unshare and sethostname succeed unless the filter refuses them."""
    met = under(seccomp.profile_json([]))
    assert met["exec"] == "ok" and met["mkfifo"] == "ok" and met["write"] == "ok"
    assert met["unshare"] == "EPERM"
    assert met["sethostname"] == "EPERM"


def test_the_profile_is_deterministic_and_named_by_its_content() -> None:
    text = seccomp.profile_json(["ptrace", "mknodat", "ptrace"])
    assert text == seccomp.profile_json(["mknodat", "ptrace"])
    name = seccomp.profile_name(text)
    assert name == f"berth/{hashlib.sha256(text.encode()).hexdigest()}.json"
    assert seccomp.profile_name(seccomp.profile_json(["ptrace"])) != name
    profile: dict[str, Any] = json.loads(text)
    (rule,) = profile["syscalls"]
    assert rule["names"] == sorted(rule["names"]) and "mknodat" in rule["names"]
    assert rule == {**rule, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"


def test_the_baseline_names_real_syscalls_and_never_exec() -> None:
    assert set(seccomp.BASELINE_DENIED) <= SYSCALL_NAMES
    assert not {"execve", "execveat"} & set(seccomp.BASELINE_DENIED)
    with pytest.raises(ValueError, match="fork_bomb"):
        seccomp.profile_json(["fork_bomb"])
