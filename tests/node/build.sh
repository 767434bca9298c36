#!/usr/bin/env bash
# Builds what a real test node needs (tests/support/node.rs) from published Go modules and this
# directory, into a cache outside the tree, and prints that directory:
#   bin/    kubelet, kube-scheduler, kube-proxy (tests/controlplane's wrapper module, same
#           Kubernetes version), coredns (tests/node/coredns: cluster DNS), containerd, containerd-shim-runc-v2, ctr (tests/node/containerd), crane and crictl
#           (tests/node/tools)
#   cni/bin bridge, host-local, loopback, portmap (tests/node/tools)
#   images/ pause.tar (static pause.c), busybox.tar (Debian's busybox-static) and
#           reference-agent.tar (deploy/images/reference-agent), docker-archive tarballs for
#           `ctr images import`, made with crane (no engine, no registry).
# runc comes from the host (Debian `runc`). A second run with everything present is instant;
# the images are remade when their inputs change. `build.sh --crane` builds only crane
# (for `make image`) and prints the same directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cp_mod=$here/../controlplane
version=$(awk '/^require k8s.io\/kubernetes/ {print $3}' "$cp_mod/go.mod")
out=${AGENTGATE_NODE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agentgate/node/$version}
mkdir -p "$out/bin" "$out/cni/bin" "$out/images"

timed() { # what command...
  local t0=$SECONDS
  echo "building $1 ..." >&2
  "${@:2}" >&2
  echo "built $1 in $((SECONDS - t0)) s" >&2
}
gobuild() { # dir output package [extra go build args...]
  local dir=$1 o=$2 pkg=$3
  shift 3
  [ -x "$o" ] && return 0
  timed "$(basename "$o")" bash -c 'cd "$0" && go build -trimpath "${@:3}" -o "$1.tmp" "$2"' "$dir" "$o" "$pkg" "$@"
  mv "$o.tmp" "$o"
}

if [ "${1:-}" = "--crane" ]; then
  CGO_ENABLED=0 gobuild "$here/tools" "$out/bin/crane" github.com/google/go-containerregistry/cmd/crane -ldflags "-s -w"
  echo "$out"
  exit 0
fi

k8s_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$version" | cut -d. -f2)"
gobuild "$cp_mod" "$out/bin/kubelet" k8s.io/kubernetes/cmd/kubelet -ldflags "$k8s_ldflags"
gobuild "$cp_mod" "$out/bin/kube-scheduler" k8s.io/kubernetes/cmd/kube-scheduler -ldflags "$k8s_ldflags"
gobuild "$cp_mod" "$out/bin/kube-proxy" k8s.io/kubernetes/cmd/kube-proxy -ldflags "$k8s_ldflags"
CGO_ENABLED=0 gobuild "$here/coredns" "$out/bin/coredns" . -ldflags "-s -w"

ctrd_version=$(cd "$here/containerd" && go list -m -f '{{.Version}}' github.com/containerd/containerd/v2)
[ -n "$ctrd_version" ] || { echo "no containerd version in tests/node/containerd/go.mod" >&2; exit 1; }
for c in containerd containerd-shim-runc-v2 ctr; do
  CGO_ENABLED=0 gobuild "$here/containerd" "$out/bin/$c" "github.com/containerd/containerd/v2/cmd/$c" \
    -tags no_btrfs -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$ctrd_version"
done
for p in ipam/host-local main/bridge main/loopback meta/portmap; do
  CGO_ENABLED=0 gobuild "$here/tools" "$out/cni/bin/$(basename $p)" "github.com/containernetworking/plugins/plugins/$p" -ldflags "-s -w"
done
CGO_ENABLED=0 gobuild "$here/tools" "$out/bin/crane" github.com/google/go-containerregistry/cmd/crane -ldflags "-s -w"
CGO_ENABLED=0 gobuild "$here/tools" "$out/bin/crictl" sigs.k8s.io/cri-tools/cmd/crictl -ldflags "-s -w"

# Images, single-layer, made by deploy/images/crane-image.sh (crane, no engine): pause (PID 1 of every
# sandbox), busybox (test Pods) and the reference agent (deploy/images/reference-agent).
version_crate=$(awk -F'"' '/^version = / {print $2; exit}' "$here/../../Cargo.toml")
stamp=$(cat "$0" "$here/pause.c" "$here/../../deploy/images/crane-image.sh" "$here/../../deploy/images/reference-agent/agent.sh" "$here/../../deploy/images/reference-agent/rootfs.sh" | sha256sum | cut -c1-16)
if [ "$(cat "$out/images/stamp" 2>/dev/null)" != "$stamp" ]; then
  t0=$SECONDS
  command -v gcc >/dev/null || { echo "gcc is needed for the pause image (Debian: apt-get install gcc libc6-dev)" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/pause"
  gcc -Os -static -Wall -o "$work/pause/pause" "$here/pause.c"
  strip "$work/pause/pause"
  "$here/../../deploy/images/reference-agent/rootfs.sh" "$work/busybox" --no-agent
  "$here/../../deploy/images/reference-agent/rootfs.sh" "$work/agent"
  image() { "$here/../../deploy/images/crane-image.sh" "$out/bin/crane" "$@"; }
  image "$out/images/pause.tar" local.test/pause:1.0 "$work/pause" --entrypoint=/pause
  image "$out/images/busybox.tar" local.test/busybox:1.0 "$work/busybox" --cmd=/bin/sh
  image "$out/images/reference-agent.tar" "ghcr.io/agentgate/reference-agent:$version_crate" "$work/agent" \
    --entrypoint=/agent --user=65532:65532 --label=org.opencontainers.image.version="$version_crate"
  echo "$stamp" >"$out/images/stamp"
  echo "built images in $((SECONDS - t0)) s" >&2
fi
echo "$out"
