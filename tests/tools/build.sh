#!/usr/bin/env bash
# Builds the test-only tools (helm, and the kstatus helper in kstatus/) from published Go modules
# into a cache outside the tree, keyed by their versions in go.mod. Prints the directory holding
# the binaries. A second run with the binaries present is instant.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
helm_version=$(awk '$1 == "helm.sh/helm/v4" {print $2}' "$here/go.mod")
kstatus_version=$(awk '$1 == "sigs.k8s.io/cli-utils" {print $2}' "$here/go.mod")
out=${AGENTGATE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/agentgate/tools/helm-$helm_version-cli-utils-$kstatus_version}
mkdir -p "$out"
# The helper is rebuilt when its source changes: the hash of main.go it was built from is kept
# next to it.
kstatus_hash=$(sha256sum "$here/kstatus/main.go" | cut -d' ' -f1)
if [ "$(cat "$out/kstatus.sha256" 2>/dev/null)" != "$kstatus_hash" ]; then
  rm -f "$out/kstatus"
fi
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
echo "$kstatus_hash" > "$out/kstatus.sha256"
echo "$out"
