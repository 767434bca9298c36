#!/usr/bin/env bash
# crane-image.sh CRANE OUT.tar NAME ROOTFS [crane mutate flags...]
# Makes a single-layer image NAME from the directory ROOTFS (files owned by root, mtimes zeroed,
# sorted: the same inputs give the same digest) and writes it to OUT.tar (docker-archive tarball:
# `ctr images import`, `docker load`, `crane push OUT.tar REF`). No container engine: crane builds
# the image, and because `crane mutate` (entrypoint, user, ...) only works against a registry, a
# throwaway in-memory `crane registry serve` on a loopback port holds it meanwhile.
set -euo pipefail
crane=$1 out=$2 name=$3 rootfs=$4
shift 4
work=$(mktemp -d)
reg_pid=
cleanup() { [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$work/layer.tar" .
for _ in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 20000))
  "$crane" registry serve --address "127.0.0.1:$port" >"$work/registry.log" 2>&1 &
  reg_pid=$!
  for _ in $(seq 1 100); do
    "$crane" catalog --insecure "127.0.0.1:$port" >/dev/null 2>&1 && break 2
    kill -0 "$reg_pid" 2>/dev/null || break
    sleep 0.05
  done
  kill "$reg_pid" 2>/dev/null || true
  reg_pid=
done
[ -n "$reg_pid" ] || { echo "crane registry serve did not start" >&2; cat "$work/registry.log" >&2; exit 1; }
tmp_ref=127.0.0.1:$port/build/image:tmp
quiet() { "$@" >"$work/crane.log" 2>&1 || { cat "$work/crane.log" >&2; exit 1; }; }
quiet "$crane" append --insecure --oci-empty-base -f "$work/layer.tar" -t "$tmp_ref"
quiet "$crane" mutate --insecure --set-platform linux/amd64 "$@" -t "$name" -o "$work/image.tar" "$tmp_ref"
mv "$work/image.tar" "$out"
