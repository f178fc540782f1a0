"""Cilium's own ``CiliumNetworkPolicy`` CRD, for checking the policies Berth renders for Cilium.

Taken from Cilium's Go module on the Go module proxy (where the control plane's build comes
from), pinned by version and by the checksum of the module's zip, cached, never committed: the
API server then validates Berth's policy against Cilium's real schema, not against a copy of its
docs.
"""

import hashlib
import io
import os
import urllib.request
import zipfile
from pathlib import Path

CILIUM_VERSION = "v1.20.2"
ZIP_SHA256 = "8876f17c696b7bd0e629708df542ca2ec0c3bf5b158fafac5ebd9c250223d50f"
CRD_IN_MODULE = "pkg/k8s/apis/cilium.io/client/crds/v2/ciliumnetworkpolicies.yaml"
CRD_NAME = "ciliumnetworkpolicies.cilium.io"


def _proxy() -> str:
    """The first HTTP(S) entry of GOPROXY, as the Go build uses it."""
    entries = os.environ.get("GOPROXY", "https://proxy.golang.org").split(",")
    urls = [e.strip().rstrip("/") for e in entries if e.strip().startswith("http")]
    return urls[0] if urls else "https://proxy.golang.org"


def cilium_network_policy_crd() -> Path:
    """The CRD's YAML, downloaded once (38 MB zip, one file kept)."""
    cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    path = Path(cache) / "berth" / f"cilium-{CILIUM_VERSION}" / Path(CRD_IN_MODULE).name
    if path.exists():
        return path
    url = f"{_proxy()}/github.com/cilium/cilium/@v/{CILIUM_VERSION}.zip"
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != ZIP_SHA256:
        raise RuntimeError(f"{url}: sha256 {digest}, expected {ZIP_SHA256}")
    member = f"github.com/cilium/cilium@{CILIUM_VERSION}/{CRD_IN_MODULE}"
    crd = zipfile.ZipFile(io.BytesIO(data)).read(member)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(crd)
    partial.rename(path)
    return path
