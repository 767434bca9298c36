# agentgate: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build crds controlplane test unit demo lint clean-controlplane chaos

all: build

build:
	$(CARGO) build --bins

# Regenerate crds/ from the Rust types in src/api, and refresh the chart's copies (tests/packaging.rs checks them).
crds:
	$(CARGO) run -q -- crds --out-dir crds
	cp crds/*.yaml charts/agentgate/crds/
	cp deploy/admission/identity.yaml charts/agentgate/templates/admission-policies.yaml

# Build (once; cached in ~/.cache/agentgate) etcd, kube-apiserver, kubectl and kube-controller-manager.
controlplane:
	tests/controlplane/build.sh --with-controller-manager

# Every test: unit tests of the pure logic and integration tests against a real control plane.
test: controlplane
	$(CARGO) test --all-targets --no-fail-fast

unit:
	$(CARGO) test --lib

# Local control plane + operator + the example jobs; the demo plays the kubelet. Ctrl-C stops everything.
demo: controlplane build
	$(CARGO) run -q --example demo

# Throughput, latency, API requests and memory of the operator next to raw Pod creation and the
# Job controller (not part of `make test`). N=1000 STEADY_SECONDS=60 SCALE_JOBS=10000 by default.
.PHONY: bench
bench: controlplane
	$(CARGO) build --release --bin agentgate
	AGENTGATE_BIN=$(CURDIR)/target/release/agentgate N=$${N:-1000} $(CARGO) run --release --example bench

# The crash storm at full size (`make test` runs it with 100 jobs): 500 pre-approved AgentJobs
# while the operator is SIGKILLed every 1-5 s; prints kills, Pods, duplicates and usage lost.
# CHAOS_JOBS=500 CHAOS_MIN_KILLS=10 by default; CHAOS_SEED replays a run.
chaos: controlplane
	CHAOS_JOBS=$${CHAOS_JOBS:-500} $(CARGO) test --release --test chaos -- --nocapture

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

clean-controlplane:
	rm -rf $${XDG_CACHE_HOME:-$$HOME/.cache}/agentgate/controlplane
