#!/usr/bin/env bash
# Builds the pinned control-plane binaries from the Go module proxy into a cache keyed by version.
#
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet and kube-proxy come from a throw-away Go
# module that requires k8s.io/kubernetes and replaces each k8s.io/* staging module with its
# published v0.X.Y; kwok and helm come from `go install`; etcd from a throw-away module too (its
# own replace lines forbid `go install`). Only a fresh machine pays (about 25 minutes on 2 cores).
# Prints the bin directory on its last line of stdout.
set -euo pipefail

K8S_VERSION=${BERTH_K8S_VERSION:-1.34.4}
KWOK_VERSION=${BERTH_KWOK_VERSION:-v0.7.0}
ETCD_VERSION=${BERTH_ETCD_VERSION:-3.6.16}
HELM_VERSION=${BERTH_HELM_VERSION:-v3.19.0}
CRICTL_VERSION=${BERTH_CRICTL_VERSION:-v1.34.0}
CACHE=${BERTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/berth}
BIN="$CACHE/toolchain/k8s-$K8S_VERSION/bin"
if [ "${1:-}" = --print-bin-dir ]; then echo "$BIN"; exit 0; fi

log() { printf '[berth build-k8s] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v go >/dev/null || die "Go is not on PATH; install Go >= 1.24 (https://go.dev/doc/install) and retry"
mkdir -p "$BIN"
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
# Only the module proxy is reachable here: without the ",direct" fallback, a missing version fails
# at once instead of hanging on a VCS host.
GOPROXY=$(go env GOPROXY)
export GOPROXY=${GOPROXY%,direct}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

timed() {  # timed NAME MINUTES CMD...: runs CMD, saying what is built and how long it usually takes
  local name=$1 minutes=$2; shift 2
  local start=$SECONDS
  log "building $name (about $minutes min on 2 cores, cached afterwards in $BIN)"
  # In the background so that `set -e` holds inside the build function (it is ignored in `||`).
  "$@" >"$WORK/$name.log" 2>&1 &
  wait $! || { tail -n 40 "$WORK/$name.log" >&2; die "building $name failed (log above)"; }
  log "built $name in $((SECONDS - start)) s"
}

have_all() { for b in "$@"; do [ -x "$BIN/$b" ] || return 1; done; }

build_kubernetes() {
  local mod="$WORK/kubernetes" minor=${K8S_VERSION#*.}; minor=${minor%%.*}
  mkdir -p "$mod" && cd "$mod"
  go mod init berth.local/k8s-build
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@v$K8S_VERSION from the Go module proxy"
  {
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/src/.*#replace \1 => \1 v0.'"${K8S_VERSION#*.}"'#p' "$gomod"
  } >>go.mod
  cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
  go mod tidy
  local ld="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  go build -ldflags "-s -w $ld" -o "$BIN/" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
}

build_etcd() {
  local mod="$WORK/etcd"
  mkdir -p "$mod" && cd "$mod"
  go mod init berth.local/etcd-build
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
}

have_all etcd || timed etcd 2 build_etcd
have_all kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy \
  || timed kubernetes-v$K8S_VERSION 17 build_kubernetes
have_all kwok || timed kwok-$KWOK_VERSION 5 env GOBIN="$BIN" go install -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
have_all helm || timed helm-$HELM_VERSION 4 env GOBIN="$BIN" go install -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
# crictl removes the real node's pod sandboxes through the CRI on teardown (CNI DEL included).
have_all crictl || timed crictl-$CRICTL_VERSION 2 env GOBIN="$BIN" go install -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
echo "$BIN"
