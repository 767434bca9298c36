#!/bin/sh
# The reference agent (image ghcr.io/agentgate/reference-agent, built by `make image`): a small
# but real agent Pod as README "What an agent Pod sees and reports" describes it. It reads
# AGENTGATE_INPUT, does some work on it (digest, sizes, word count), looks at the limits it
# runs under (cgroup v1 or v2), and writes its report to /dev/termination-log.
#
# It calls no model yet: the usage it reports is the token count of what it read and wrote
# (4 bytes a token, the usual rough rule), under AGENTGATE_MODEL. Once the meter proxy exists,
# an agent reports what the meter counted instead.
set -eu

input=${AGENTGATE_INPUT:-'{}'}
bytes=$(printf '%s' "$input" | wc -c)
words=$(printf '%s' "$input" | tr -c 'A-Za-z0-9_' ' ' | wc -w)
digest=$(printf '%s' "$input" | sha256sum | cut -d' ' -f1)

# Limits as the kernel enforces them; -1 for unlimited.
read_first() { [ -r "$1" ] && head -n1 "$1" || echo ""; }
if [ -r /sys/fs/cgroup/memory.max ]; then # cgroup v2
  mem=$(read_first /sys/fs/cgroup/memory.max)
  set -- $(read_first /sys/fs/cgroup/cpu.max)
  quota=${1:-max}
  period=${2:-100000}
else # cgroup v1
  mem=$(read_first /sys/fs/cgroup/memory/memory.limit_in_bytes)
  quota=$(read_first /sys/fs/cgroup/cpu/cpu.cfs_quota_us)
  period=$(read_first /sys/fs/cgroup/cpu/cpu.cfs_period_us)
fi
num() { case "$1" in '' | max) echo -1 ;; *) echo "$1" ;; esac; }
# cgroup v1 writes "no limit" as a huge page-aligned number
case "$(num "$mem")" in 9223372036854771712) mem=-1 ;; esac

output=$(printf '{"agent":"%s","attempt":%s,"inputBytes":%s,"inputWords":%s,"inputSha256":"%s","limits":{"memoryBytes":%s,"cpuQuotaMicros":%s,"cpuPeriodMicros":%s}}' \
  "${AGENTGATE_AGENT:-}" "${AGENTGATE_ATTEMPT:-0}" "$bytes" "$words" "$digest" "$(num "$mem")" "$(num "$quota")" "$(num "$period")")
input_tokens=$(((bytes + 3) / 4))
output_tokens=$(((${#output} + 3) / 4))
report=$(printf '{"usage":[{"model":"%s","inputTokens":%s,"cachedInputTokens":0,"outputTokens":%s}],"output":%s}' \
  "${AGENTGATE_MODEL:-unknown}" "$input_tokens" "$output_tokens" "$output")
echo "$report"
printf '%s' "$report" >/dev/termination-log
