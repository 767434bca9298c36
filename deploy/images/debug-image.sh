#!/usr/bin/env bash
# debug-image.sh CRANE BINARY OUT.tar NAME
# The operator image from a binary `cargo build` already made (a debug build, dynamically linked),
# in seconds instead of `make image`'s release build: one layer holding the binary (debug info
# stripped, code untouched) and exactly the shared libraries `ldd` says it loads, at the same paths,
# plus the same /etc/passwd (nonroot, 65532), CA certificates and entrypoint as the release image
# (deploy/images/build.sh). The real-node tests (tests/in_cluster.rs) and `make demo` on a real node
# install the chart with it. Not for a registry: `make image` builds the image to push.
set -euo pipefail
crane=$1 bin=$2 out=$3 name=$4
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/home/nonroot"
objcopy --strip-debug "$bin" "$rootfs/usr/local/bin/agentgate"
chmod 0755 "$rootfs/usr/local/bin/agentgate"
# Every library the dynamic loader resolves (`name => /path`) and the loader itself (`/path`).
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
[ -n "$libs" ] || { echo "ldd found no shared libraries in $bin" >&2; exit 1; }
for lib in $libs; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
# Debian's /lib and /lib64 are symlinks into /usr; the loader path the binary names must resolve.
for link in lib lib64; do
  if [ -L "/$link" ] && [ -d "$rootfs/$link" ] && [ ! -e "$rootfs/usr/$link" ]; then
    mkdir -p "$rootfs/usr"
    mv "$rootfs/$link" "$rootfs/usr/$link"
    ln -s "usr/$link" "$rootfs/$link"
  fi
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
"$here/crane-image.sh" "$crane" "$out" "$name" "$rootfs" \
  --entrypoint=/usr/local/bin/agentgate --cmd=run --user=65532:65532 --exposed-ports=8080/tcp \
  --label=org.opencontainers.image.description="agentgate debug build (deploy/images/debug-image.sh), not a release"
