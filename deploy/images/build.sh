#!/usr/bin/env bash
# `make image`: the operator image without a container engine. Builds agentgate as a static
# binary (glibc, -C target-feature=+crt-static; TLS is rustls, no OpenSSL), puts it with
# /etc/passwd (nonroot, 65532) and CA certificates into one layer, and writes
#   target/images/agentgate-<version>.tar        ghcr.io/agentgate/agentgate:<version>
#   target/images/reference-agent-<version>.tar  ghcr.io/agentgate/reference-agent:<version>
# (docker-archive tarballs; `crane push FILE REF` uploads one). <version> is the crate's version,
# which is also the chart's appVersion and so its default image tag.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
version=$(awk -F'"' '/^version = / {print $2; exit}' Cargo.toml)
out=$root/target/images
mkdir -p "$out"
node=$(tests/node/build.sh --crane)
target=x86_64-unknown-linux-gnu
t0=$SECONDS
# --target keeps RUSTFLAGS off build scripts and proc macros, which must stay dynamic.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" cargo build --release --locked --target "$target" --bin agentgate ${FEATURES:+--features "$FEATURES"}
bin=target/$target/release/agentgate
{ ldd "$bin" 2>&1 || true; } | grep -q -e 'not a dynamic executable' -e 'statically linked' || { echo "$bin is not static" >&2; exit 1; }
echo "built the static operator binary in $((SECONDS - t0)) s" >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/home/nonroot"
install -m 0755 -s "$bin" "$rootfs/usr/local/bin/agentgate"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
# For HTTPS to anything but the apiserver (whose CA comes with the ServiceAccount token).
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
deploy/images/crane-image.sh "$node/bin/crane" "$out/agentgate-$version.tar" "ghcr.io/agentgate/agentgate:$version" "$rootfs" \
  --entrypoint=/usr/local/bin/agentgate --cmd=run --user=65532:65532 --exposed-ports=8080/tcp \
  --label=org.opencontainers.image.version="$version" --label=org.opencontainers.image.source=https://github.com/agentgate/agentgate

# The reference agent: the same image tests/node/build.sh makes for the real node's tests.
agent=$work/agent
deploy/images/reference-agent/rootfs.sh "$agent"
deploy/images/crane-image.sh "$node/bin/crane" "$out/reference-agent-$version.tar" "ghcr.io/agentgate/reference-agent:$version" "$agent" \
  --entrypoint=/agent --user=65532:65532 --label=org.opencontainers.image.version="$version"

for f in "$out/agentgate-$version.tar" "$out/reference-agent-$version.tar"; do
  echo "$f $(du -h "$f" | cut -f1) $("$node/bin/crane" digest --tarball "$f")" >&2
done
echo "$out/agentgate-$version.tar"
