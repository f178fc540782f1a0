"""Berth's eBPF egress enforcer: loads ``policies/ebpf/egress.c`` and attaches it per sandboxed pod.

libbpf (``libbpf.so.1``, Debian's libbpf1) is reached through ctypes, as NVML is in
:mod:`.gpus`: no bcc, no compiler at run time, torch-free. The object is built by ``make ebpf``
(``build/ebpf/egress.o``; ``BERTH_EGRESS_OBJECT`` names another). Its maps are pinned by name in
bpffs (mounted here if the host has not) and each attachment's links under
``<pin dir>/links/<cgroup id>/``, so enforcement outlives the agent: a restarted agent adopts the
pinned links and rewrites the entries rather than leaving a pod open while it was away.
:mod:`.egress_policy` turns a policy into map entries; this module only moves bytes.

The agent's calls: :meth:`EgressEnforcer.attach_pod` (or ``attach`` with a cgroup path) when a
sandboxed pod runs on the node, again with a changed policy; :meth:`Attachment.denials` for the
pod's metrics and events; :meth:`EgressEnforcer.refresh` when it last said (host names' TTLs);
:meth:`Attachment.detach` when the pod goes; :meth:`EgressEnforcer.prune` after a restart, once
the live pods are attached again, and after pods are deleted.

Where a pod's processes are in cgroup v2 (checked as root on this machine's hybrid hierarchy,
runc 1.1.5, 2026-12-05): cgroup eBPF programs attach only to v2 cgroups, and the node's pods live
in v1 hierarchies under ``/sys/fs/cgroup/<controller>/berth/kubepods/...``. runc in hybrid mode
also creates the container's cgroup at the same path in the v2 hierarchy
(``/sys/fs/cgroup/unified/berth/kubepods/<qos>/pod<uid>/<container>``, parents made as needed)
and puts the container's init there: ``/proc/<pid>/cgroup`` lists ``0::/<that path>`` beside the
v1 lines. This held for a plain ``runc run`` with a v1-style ``cgroupsPath`` and for the project's
real node (its pause and runtime containers, read while another session ran it). ``runc exec``
(what ``kubectl exec`` runs) joins the same v2 cgroup: with the enforcer on the pod's cgroup, a
``runc exec``'d ``bash`` was refused (EPERM, counted) a port outside the allowlist and reached
the allowlisted one. So the agent needs no v2 cgroup of its own and moves no processes:
:func:`find_pod_cgroup` finds ``pod<uid>`` in the v2 hierarchy, and the programs attached there
cover the pause container, every container, their restarts and every exec'd process (all sit
below it; the programs find the sandbox by walking the caller's ancestors). Only a process that
moves itself out of the pod's cgroup escapes, which needs write access to the cgroup tree (a
hardened pod has none). Not covered: ICMP and raw sockets (no cgroup sock_addr hook; hardened
pods drop CAP_NET_RAW), and connections made before the agent attaches, between the pod's start
and the agent's pod watch seeing it.

Host names are enforced at the addresses the agent's resolver returns, for their TTL plus a grace
(:class:`.egress_policy.HostAddresses`); a pod whose resolver answers differently (round-robin
DNS, CDNs, split horizon) can be refused an address the agent never saw. Wildcard names cannot be
resolved ahead of time and allow nothing here (:attr:`Attachment.unresolvable`).
"""

import ctypes
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from berth.runtime.agent import dns
from berth.runtime.agent.egress_policy import (
    HOOKS,
    EgressPolicy,
    HostAddresses,
    MapEntries,
    allowlist,
    denial_counts,
    key_cgroup_id,
    map_entries,
    nameservers,
    sandbox_key,
)

LIBBPF = "libbpf.so.1"
BPFFS = Path("/sys/fs/bpf")
PIN_DIR = BPFFS / "berth" / "egress"
OBJECT = Path(__file__).resolve().parents[2] / "build" / "ebpf" / "egress.o"
BPF_ANY, BPF_NOEXIST = 0, 1
# name -> (key bytes, value bytes), as in policies/ebpf/egress.h
MAPS = {"sandboxes": (8, 32), "allow4": (16, 4), "allow6": (28, 4), "ports": (16, 1)}
POD_SEARCH_DEPTH = 6  # <root>/berth/kubepods/burstable/pod<uid> is 4 deep

Resolver = Callable[[str], Sequence[dns.Answer]]


class EgressError(RuntimeError):
    pass


def _failed(call: str, detail: object = "") -> EgressError:
    errno = ctypes.get_errno()
    return EgressError(f"{call}{detail and f' {detail}'}: {os.strerror(errno)} (errno {errno})")


def _libbpf() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBBPF, use_errno=True)
    except OSError as error:
        raise EgressError(f"cannot load {LIBBPF} (install Debian's libbpf1): {error}") from error
    p, s, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    signatures = {
        "bpf_object__open_file": (p, [s, p]),
        "bpf_object__load": (i, [p]),
        "bpf_object__close": (None, [p]),
        "bpf_object__next_map": (p, [p, p]),
        "bpf_map__name": (s, [p]),
        "bpf_object__find_program_by_name": (p, [p, s]),
        "bpf_map__set_pin_path": (i, [p, s]),
        "bpf_map__fd": (i, [p]),
        "bpf_program__attach_cgroup": (p, [p, i]),
        "bpf_link__open": (p, [s]),
        "bpf_link__pin": (i, [p, s]),
        "bpf_link__unpin": (i, [p]),
        "bpf_link__detach": (i, [p]),
        "bpf_link__destroy": (i, [p]),
        "bpf_map_update_elem": (i, [i, p, p, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (i, [i, p, p]),
        "bpf_map_delete_elem": (i, [i, p]),
        "bpf_map_get_next_key": (i, [i, p, p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


@dataclass(frozen=True)
class _Map:
    lib: ctypes.CDLL
    name: str
    fd: int
    key_size: int
    value_size: int

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> bool:
        """False if ``flags`` is BPF_NOEXIST and the key exists."""
        if self.lib.bpf_map_update_elem(self.fd, key, value, flags) == 0:
            return True
        if flags == BPF_NOEXIST and ctypes.get_errno() == 17:  # EEXIST
            return False
        raise _failed("bpf_map_update_elem", self.name)

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_size)
        if self.lib.bpf_map_lookup_elem(self.fd, key, value) != 0:
            return None
        return value.raw

    def delete(self, key: bytes) -> None:
        self.lib.bpf_map_delete_elem(self.fd, key)

    def keys_of(self, cgroup_id: int | None) -> list[bytes]:
        """The keys that belong to one sandbox (every key starts with its cgroup id), or all."""
        found: list[bytes] = []
        key, following = None, ctypes.create_string_buffer(self.key_size)
        while self.lib.bpf_map_get_next_key(self.fd, key, following) == 0:
            if cgroup_id is None or key_cgroup_id(self.name, following.raw) == cgroup_id:
                found.append(following.raw)
            key = ctypes.create_string_buffer(following.raw, self.key_size)
        return found


def mount_bpffs(path: Path = BPFFS) -> None:
    """Mount bpffs at ``path`` unless it is there (the machine here does not mount it at boot)."""
    with open("/proc/self/mounts") as mounts:
        if any(line.split()[1:3] == [str(path), "bpf"] for line in mounts):
            return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(path).encode(), b"bpf", 0, None) != 0:
        raise _failed("mount -t bpf", path)


def cgroup_id(path: Path) -> int:
    """A cgroup v2 directory's id: its inode number (what bpf_get_current_cgroup_id returns)."""
    return os.stat(path).st_ino


def cgroup2_root() -> Path:
    """The v2 hierarchy: ``/sys/fs/cgroup`` on a pure v2 host, ``/sys/fs/cgroup/unified`` on a
    hybrid one."""
    root = Path("/sys/fs/cgroup")
    return root if (root / "cgroup.controllers").exists() else root / "unified"


def find_pod_cgroup(pod_uid: str, root: Path | None = None) -> Path:
    """The pod's v2 cgroup: ``pod<uid>`` (cgroupfs driver) or ``*-pod<uid_with_underscores>.slice``
    (systemd driver), anywhere in the first few levels of the hierarchy."""
    root = root or cgroup2_root()
    cgroupfs_name = f"pod{pod_uid}"
    slice_suffix = f"pod{pod_uid.replace('-', '_')}.slice"
    for directory, subdirectories, _ in os.walk(root):
        depth = len(Path(directory).relative_to(root).parts)
        for name in subdirectories:
            if name == cgroupfs_name or name.endswith(slice_suffix):
                return Path(directory) / name
        if depth >= POD_SEARCH_DEPTH:
            subdirectories.clear()
    raise EgressError(
        f"pod {pod_uid} has no cgroup in the v2 hierarchy at {root}: is it running on this node, "
        "and does its container runtime place containers in cgroup v2 (runc does)?"
    )


def system_resolver() -> Resolver:
    """Look names up at the resolvers of this host's ``/etc/resolv.conf``."""
    servers = nameservers(Path("/etc/resolv.conf").read_text())
    return lambda name: dns.resolve(name, servers)


class EgressEnforcer:
    """The loaded programs and their pinned maps, shared by every sandbox on the node."""

    def __init__(
        self,
        object_path: Path | None = None,
        pin_dir: Path = PIN_DIR,
        resolve: Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        path = object_path or Path(os.environ.get("BERTH_EGRESS_OBJECT", OBJECT))
        if not path.is_file():
            raise EgressError(f"no eBPF object at {path}: build it with `make ebpf`")
        mount_bpffs()
        pin_dir.mkdir(parents=True, exist_ok=True)
        self.pin_dir, self.resolve, self.clock = pin_dir, resolve or system_resolver(), clock
        self.lib = lib = _libbpf()
        self._object = lib.bpf_object__open_file(str(path).encode(), None)
        if not self._object:
            raise _failed("bpf_object__open_file", path)
        handles: dict[str, int] = {}
        handle = lib.bpf_object__next_map(self._object, None)
        while handle:
            handles[lib.bpf_map__name(handle).decode()] = handle
            handle = lib.bpf_object__next_map(self._object, handle)
        if set(handles) != set(MAPS):
            lib.bpf_object__close(self._object)
            raise EgressError(
                f"{path} has maps {sorted(handles)}, this loader knows {sorted(MAPS)}"
            )
        for name, handle in handles.items():  # pinned by name: libbpf reuses a pinned map
            lib.bpf_map__set_pin_path(handle, str(pin_dir / name).encode())
        if lib.bpf_object__load(self._object) != 0:
            lib.bpf_object__close(self._object)
            raise _failed("bpf_object__load (as root, on a kernel with cgroup BPF)", path)
        self.maps = {
            name: _Map(lib, name, lib.bpf_map__fd(handles[name]), *MAPS[name]) for name in MAPS
        }
        self._programs = {
            hook: lib.bpf_object__find_program_by_name(self._object, hook.encode())
            for hook in HOOKS
        }
        self.attachments: dict[int, Attachment] = {}  # by cgroup id

    def attach(self, cgroup_path: Path, policy: EgressPolicy) -> "Attachment":
        """Sandbox the v2 cgroup at ``cgroup_path`` and everything below it; a cgroup already
        attached gets ``policy`` as an update."""
        known = self.attachments.get(cgroup_id(cgroup_path))
        if known is not None:
            known.update(policy)
            return known
        attachment = Attachment(self, Path(cgroup_path), cgroup_id(cgroup_path), policy)
        attachment.refresh()
        self.maps["sandboxes"].update(sandbox_key(attachment.cgroup_id), bytes(32), BPF_NOEXIST)
        attachment.link()
        self.attachments[attachment.cgroup_id] = attachment
        return attachment

    def attach_pod(self, pod_uid: str, policy: EgressPolicy) -> "Attachment":
        """Sandbox a running pod of this node by its UID (what the agent's pod watch calls)."""
        return self.attach(find_pod_cgroup(pod_uid), policy)

    def refresh(self) -> float:
        """Refresh every attachment's host names; returns when (``clock``) to call again."""
        return min((a.refresh() for a in list(self.attachments.values())), default=math.inf)

    def prune(self) -> list[int]:
        """Remove every sandbox this enforcer has not attached (left by an earlier agent for a
        pod that is gone) and every attachment whose cgroup is gone; returns their cgroup ids.
        A restarted agent calls it once it has re-attached the pods it still sandboxes."""
        for attachment in list(self.attachments.values()):
            if not attachment.cgroup_path.exists():
                attachment.detach()
        pinned = self.pin_dir / "links"
        sandboxes = self.maps["sandboxes"]
        stale = {key_cgroup_id("sandboxes", key) for key in sandboxes.keys_of(None)}
        stale |= {int(p.name) for p in pinned.iterdir()} if pinned.exists() else set()
        stale -= set(self.attachments)
        for cgroup in stale:
            self._remove(cgroup)
        return sorted(stale)

    def _remove(self, cgroup: int) -> None:
        """Detach and unpin a sandbox's links and delete its map entries."""
        link_dir = self.pin_dir / "links" / str(cgroup)
        for pin in sorted(link_dir.glob("*")):
            link = self.lib.bpf_link__open(str(pin).encode())
            if link:
                self.lib.bpf_link__detach(link)
                self.lib.bpf_link__destroy(link)
            pin.unlink()
        if link_dir.exists():
            link_dir.rmdir()
        for bpf_map in self.maps.values():
            for key in bpf_map.keys_of(cgroup):
                bpf_map.delete(key)

    def close(self) -> None:
        """Drop this process's handles; pinned maps and links keep enforcing."""
        if self._object:
            self.lib.bpf_object__close(self._object)
            self._object = None


@dataclass
class Attachment:
    """One sandboxed cgroup: its links, its map entries and its host names' addresses."""

    enforcer: EgressEnforcer
    cgroup_path: Path
    cgroup_id: int
    policy: EgressPolicy
    hosts: HostAddresses = field(default_factory=HostAddresses)
    unresolvable: tuple[str, ...] = ()
    _links: list[int] = field(default_factory=list)

    @property
    def _link_dir(self) -> Path:
        return self.enforcer.pin_dir / "links" / str(self.cgroup_id)

    def link(self) -> None:
        """Attach the four programs, or adopt the links a previous agent pinned."""
        lib = self.enforcer.lib
        self._link_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook, program in self.enforcer._programs.items():
                pin = str(self._link_dir / hook).encode()
                link = lib.bpf_link__open(pin) if os.path.exists(pin) else None
                if not link:
                    link = lib.bpf_program__attach_cgroup(program, fd)
                    if not link:
                        raise _failed("bpf_program__attach_cgroup", f"{hook} {self.cgroup_path}")
                    if lib.bpf_link__pin(link, pin) != 0:
                        raise _failed("bpf_link__pin", pin.decode())
                self._links.append(link)
        except EgressError:
            self.detach()
            raise
        finally:
            os.close(fd)

    def update(self, policy: EgressPolicy) -> None:
        """Enforce ``policy`` from now on: new entries are written before stale ones go."""
        self.policy = policy
        self.hosts.forget(policy.hosts())
        self.hosts.next_lookup.clear()
        self.refresh()

    def refresh(self) -> float:
        """Look up the host names whose TTL ran out and rewrite the entries; returns when
        (``clock`` seconds) to call again."""
        now = self.enforcer.clock()
        names = [name for name in self.policy.hosts() if not name.startswith("*.")]
        for name in self.hosts.due(names, now):
            try:
                answers = self.enforcer.resolve(name)
            except dns.DnsError:
                self.hosts.failed(name, now)
                continue
            self.hosts.record(name, [(answer.address, answer.ttl) for answer in answers], now)
        allowed = allowlist(self.policy, self.hosts.current(now))
        self.unresolvable = allowed.unresolvable
        self._write(map_entries(allowed, self.cgroup_id))
        return self.hosts.next_due(names) if names else math.inf

    def _write(self, entries: MapEntries) -> None:
        maps = self.enforcer.maps
        for name, wanted in (
            ("allow4", entries.allow4),
            ("allow6", entries.allow6),
            ("ports", entries.ports),
        ):
            for key, value in wanted.items():
                maps[name].update(key, value)
            for key in maps[name].keys_of(self.cgroup_id):
                if key not in wanted:
                    maps[name].delete(key)

    def denials(self) -> dict[str, int]:
        """Refused attempts per hook (``connect4``, ``connect6``, ``sendmsg4``, ``sendmsg6``)."""
        value = self.enforcer.maps["sandboxes"].lookup(sandbox_key(self.cgroup_id))
        return denial_counts(value or bytes(32))

    def detach(self) -> None:
        """Detach the programs, unpin their links and remove this cgroup's entries."""
        self.enforcer._remove(self.cgroup_id)
        for link in self._links:
            self.enforcer.lib.bpf_link__destroy(link)
        self._links.clear()
        self.enforcer.attachments.pop(self.cgroup_id, None)
