#!/usr/bin/env bash
# Builds the local control plane from published Go modules into a cache outside the tree.
# Prints the directory holding the binaries. A second run with the binaries present is instant.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(awk '/^require k8s.io\/kubernetes/ {print $3}' "$here/go.mod")
out=${AGENTGATE_CONTROLPLANE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agentgate/controlplane/$version}
mkdir -p "$out"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$version" | cut -d. -f2)"
build() { # name package
  if [ ! -x "$out/$1" ]; then
    echo "building $1 ($version) ..." >&2
    (cd "$here" && go build -trimpath -ldflags "$ldflags" -o "$out/$1.tmp" "$2") >&2
    mv "$out/$1.tmp" "$out/$1"
  fi
}
build etcd go.etcd.io/etcd/server/v3
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kubectl k8s.io/kubernetes/cmd/kubectl
if [ "${1:-}" = "--with-controller-manager" ]; then
  build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
fi
echo "$out"
