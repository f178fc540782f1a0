"""The real node's configuration holds the settings this kind of machine needs (PLATFORM.md) and
keeps every address on the project's own interfaces; the daemons themselves run in e2e/."""

import ipaddress
import tomllib
from pathlib import Path

from berth.cluster.images import PAUSE_IMAGE
from berth.cluster.pki import NODE_IP, make_pki
from berth.cluster.realnode import BRIDGE, POD_CIDR, TAINT, RealNode

PORTS = {"kube-proxy": 20001, "kube-proxy-metrics": 20002}


def node(tmp_path: Path) -> RealNode:
    return RealNode(
        state_dir=tmp_path / "state", bin_dir=tmp_path / "bin", content_dir=tmp_path / "content"
    )


def test_containerd_runs_on_this_vm_and_uses_the_imported_pause_image(tmp_path: Path) -> None:
    config = tomllib.loads(node(tmp_path)._containerd_config())
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE here
    assert cri["disable_apparmor"] is True
    assert cri["sandbox_image"] == PAUSE_IMAGE
    assert cri["cni"]["conf_dir"].startswith(str(tmp_path))
    assert config["root"] == str(tmp_path / "content")
    assert len(config["grpc"]["address"]) < 108  # a unix socket path


def test_kubelet_serves_on_the_node_address_with_authentication_and_cgroupfs(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    config = node(tmp_path)._kubelet_config(pki)
    assert config["address"] == NODE_IP and not ipaddress.ip_address(NODE_IP).is_loopback
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authorization"]["mode"] == "Webhook"
    assert config["cgroupDriver"] == "cgroupfs" and config["failCgroupV1"] is False
    assert config["imageGCHighThresholdPercent"] == 100  # imported images are never pulled again
    assert config["podLogsDir"].startswith(str(tmp_path))
    assert config["readOnlyPort"] == 0


def test_pods_get_addresses_of_their_own_and_no_masquerade_to_the_outside(tmp_path: Path) -> None:
    (plugin,) = node(tmp_path)._cni_config()["plugins"]
    assert plugin["bridge"] == BRIDGE and plugin["ipMasq"] is False
    subnet = ipaddress.ip_network(plugin["ipam"]["ranges"][0][0]["subnet"])
    assert subnet == ipaddress.ip_network(POD_CIDR) and subnet.is_private
    # The node's address is the pods' gateway: the bridge plugin accepts no other on its bridge.
    assert ipaddress.ip_address(NODE_IP) == next(subnet.hosts())


def test_kube_proxy_leaves_host_conntrack_settings_and_localhost_alone(tmp_path: Path) -> None:
    command = node(tmp_path).command("kube-proxy", PORTS)
    for flag in ("--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                 "--iptables-localhost-nodeports=false", f"--nodeport-addresses={NODE_IP}/32"):  # fmt: skip
        assert flag in command
    assert "--healthz-bind-address=127.0.0.1:20001" in command


def test_kubelet_registers_the_node_tainted_with_simulated_gpu_labels(tmp_path: Path) -> None:
    command = node(tmp_path).command("kubelet", PORTS)
    assert f"--register-with-taints={TAINT}" in command
    assert f"--node-ip={NODE_IP}" in command
    labels = next(c for c in command if c.startswith("--node-labels="))
    assert "nvidia.com/gpu.product=Berth-CPU-Simulated" in labels
