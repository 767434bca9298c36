#!/usr/bin/env bash
# Builds the test-only tools (helm, and the kstatus helper in kstatus/) from published Go modules
# into a cache outside the tree, keyed by their versions in go.mod. Prints the directory holding
# the binaries. A second run with the binaries present is instant.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
helm_version=$(awk '$1 == "helm.sh/helm/v4" {print $2}' "$here/go.mod")
kstatus_version=$(awk '$1 == "sigs.k8s.io/cli-utils" {print $2}' "$here/go.mod")
# The helper's own source is part of the key, so editing main.go rebuilds it.
kstatus_hash=$(sha256sum "$here/kstatus/main.go" | cut -c1-12)
out=${AGENTGATE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agentgate/tools/helm-$helm_version-cli-utils-$kstatus_version-$kstatus_hash}
mkdir -p "$out"
build() { # name package ldflags
  if [ ! -x "$out/$1" ]; then
    echo "building $1 ..." >&2
    (cd "$here" && go build -trimpath -ldflags "-s -w $3" -o "$out/$1.tmp" "$2") >&2
    mv "$out/$1.tmp" "$out/$1"
  fi
}
# helm reports its version from these variables; unset, `helm version` says v4 without the patch.
build helm helm.sh/helm/v4/cmd/helm "-X helm.sh/helm/v4/internal/version.version=$helm_version"
build kstatus ./kstatus ""
echo "$out"
