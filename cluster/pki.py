"""Certificates and tokens for the loopback control plane, made with the openssl CLI.

One CA signs the API server's serving certificate (valid for 127.0.0.1 and localhost), so
clients verify TLS instead of skipping it. Components authenticate with static bearer tokens,
each under the user name that Kubernetes' bootstrap RBAC policy already binds.
"""

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The real node's address: the pods' gateway on their bridge, which the cluster creates (the
# CNI bridge plugin insists the bridge holds only that address; the kubelet refuses
# loopback, and the machine's own address is never used).
NODE_IP = "10.251.0.1"

# user -> groups; the bootstrap policy grants these users what their component needs.
IDENTITIES: dict[str, tuple[str, ...]] = {
    "berth-admin": ("system:masters",),
    "system:kube-controller-manager": (),
    "system:kube-scheduler": (),
    "system:kwok": ("system:masters",),
    # The real kubelet node: the Node authorizer grants a kubelet what its own node needs.
    "system:node:berth-node": ("system:nodes",),
    "system:kube-proxy": (),
}


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    service_account_key: Path  # RSA private key that signs service-account tokens
    service_account_pub: Path
    token_file: Path  # kube-apiserver --token-auth-file
    tokens: dict[str, str]  # user -> bearer token
    # The real node: the kubelet's serving certificate and the client certificate with which the
    # API server reaches kubelets (logs, exec), in system:masters so the kubelet's webhook
    # authorizer admits it.
    kubelet_cert: Path
    kubelet_key: Path
    kubelet_client_cert: Path
    kubelet_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def make_pki(directory: Path) -> Pki:
    """Create (or reuse) the CA, serving certificate, service-account key pair and tokens."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not on PATH; install it (apt-get install -y openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    if not (d / "apiserver.crt").exists():
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                 "-out", "ca.crt", "-days", "3650", "-subj", "/CN=berth-local-ca", cwd=d)  # fmt: skip
        _signed(d, "apiserver", "/CN=kube-apiserver",
                "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
                f"DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.96.0.1,IP:{NODE_IP}\n"
                "extendedKeyUsage=serverAuth")  # fmt: skip
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    if not (d / "kubelet.crt").exists():
        _signed(d, "kubelet", "/CN=berth-node", f"subjectAltName=IP:{NODE_IP},DNS:berth-node\n"
                "extendedKeyUsage=serverAuth")  # fmt: skip
        _signed(d, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
                "extendedKeyUsage=clientAuth")  # fmt: skip
    token_file = d / "tokens.csv"
    tokens: dict[str, str] = {}
    if token_file.exists():
        for line in token_file.read_text().splitlines():
            token, user = line.split(",")[:2]
            tokens[user] = token
    if set(tokens) != set(IDENTITIES):
        tokens = {user: secrets.token_hex(24) for user in IDENTITIES}
        token_file.write_text(
            "".join(
                f'{tokens[user]},{user},{user},"{",".join(groups)}"\n'
                for user, groups in IDENTITIES.items()
            )
        )
        token_file.chmod(0o600)
    return Pki(
        ca_cert=d / "ca.crt",
        serving_cert=d / "apiserver.crt",
        serving_key=d / "apiserver.key",
        service_account_key=d / "sa.key",
        service_account_pub=d / "sa.pub",
        token_file=token_file,
        tokens=tokens,
        kubelet_cert=d / "kubelet.crt",
        kubelet_key=d / "kubelet.key",
        kubelet_client_cert=d / "apiserver-kubelet-client.crt",
        kubelet_client_key=d / "apiserver-kubelet-client.key",
    )


def _signed(d: Path, name: str, subject: str, extensions: str) -> None:
    """A key and a certificate signed by the cluster's CA, with the given v3 extensions."""
    (d / f"{name}.cnf").write_text(f"[v3]\n{extensions}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650",
             "-extfile", f"{name}.cnf", "-extensions", "v3", cwd=d)  # fmt: skip
