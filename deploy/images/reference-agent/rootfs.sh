#!/usr/bin/env bash
# rootfs.sh DIR [--no-agent]: fills DIR with the reference agent's root filesystem: Debian's
# static busybox with the applets an agent script uses, /etc/passwd with nonroot (65532), a
# world-writable /tmp, and /agent (agent.sh). --no-agent leaves out /agent (the plain busybox test
# image of tests/node/build.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$1
busybox=/bin/busybox
[ -x "$busybox" ] || busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! { ldd "$busybox" 2>&1 || true; } | grep -q -e 'not a dynamic executable' -e 'statically linked'; then
  echo "a static busybox is needed (Debian: apt-get install busybox-static)" >&2
  exit 1
fi
umask 022
mkdir -p "$dir/bin" "$dir/tmp" "$dir/etc" "$dir/home/nonroot"
cp "$busybox" "$dir/bin/busybox"
chmod 0755 "$dir/bin/busybox"
for a in sh cat echo ls sleep head dd mkdir printf tr id env wc sed awk date expr seq sha256sum yes true false grep cut nc wget; do
  ln -sf busybox "$dir/bin/$a"
done
chmod 1777 "$dir/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh\n' >"$dir/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
if [ "${2:-}" != "--no-agent" ]; then
  install -m 0755 "$here/agent.sh" "$dir/agent"
fi
