#!/bin/sh
# The reference agent (image ghcr.io/agentgate/reference-agent, built by `make image`): a small
# but real agent Pod as README "What an agent Pod sees and reports" describes it. It reads
# AGENTGATE_INPUT, does some work on it (digest, sizes, word count), looks at the limits it
# runs under (cgroup v1 or v2), and writes its report to /dev/termination-log.
#
# With `"chat": "<prompt>"` in its input it makes one OpenAI Chat Completions call through
# OPENAI_BASE_URL (the meter beside it, README "The agent meter") with busybox wget, and reports
# the usage the response carries and the reply. Without it, it calls no model, and the usage it
# reports is the token count of what it read and wrote (4 bytes a token, the usual rough rule),
# under AGENTGATE_MODEL.
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

# One chat completion when asked: a prompt of plain characters (no quotes or backslashes).
field() { sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\{0,1\}\([^\"\\,}]*\).*/\1/p" | head -n1; }
prompt=$(printf '%s' "$input" | field chat)
reply=
metered=null
if [ -n "$prompt" ]; then
  body=$(printf '{"model":"%s","messages":[{"role":"user","content":"%s"}],"max_tokens":64}' "${AGENTGATE_MODEL:-gpt-4o-mini}" "$prompt")
  # The meter starts just before the agent; a few tries cover the moment it takes to listen
  # (the SDKs retry a refused connection the same way).
  for try in 1 2 3 4 5 6 7 8 9 10; do
    if answer=$(wget -q -O - --header "Authorization: Bearer ${OPENAI_API_KEY:-}" --header 'Content-Type: application/json' \
      --post-data "$body" "${OPENAI_BASE_URL:?no OPENAI_BASE_URL}/chat/completions"); then
      break
    fi
    [ "$try" = 10 ] && { echo "the chat completion through $OPENAI_BASE_URL failed" >&2; exit 1; }
    sleep 1
  done
  reply=$(printf '%s' "$answer" | field content | tr -d '"\\')
  # The meter's running totals, as it serves them to whoever shares its loopback.
  metered=$(wget -q -O - "${OPENAI_BASE_URL%/v1}/usage") && [ -n "$metered" ] || metered=null
  metered=$(printf '%s' "$metered" | tr -d '\n')
fi

output=$(printf '{"agent":"%s","attempt":%s,"inputBytes":%s,"inputWords":%s,"inputSha256":"%s","limits":{"memoryBytes":%s,"cpuQuotaMicros":%s,"cpuPeriodMicros":%s},"reply":"%s","meterUsage":%s}' \
  "${AGENTGATE_AGENT:-}" "${AGENTGATE_ATTEMPT:-0}" "$bytes" "$words" "$digest" "$(num "$mem")" "$(num "$quota")" "$(num "$period")" "$reply" "$metered")
if [ -n "$prompt" ]; then
  # What the provider counted, as the response says (the meter counts the same at the wire).
  input_tokens=$(printf '%s' "$answer" | field prompt_tokens)
  output_tokens=$(printf '%s' "$answer" | field completion_tokens)
else
  input_tokens=$(((bytes + 3) / 4))
  output_tokens=$(((${#output} + 3) / 4))
fi
report=$(printf '{"usage":[{"model":"%s","inputTokens":%s,"cachedInputTokens":0,"outputTokens":%s}],"output":%s}' \
  "${AGENTGATE_MODEL:-unknown}" "$input_tokens" "$output_tokens" "$output")
echo "$report"
printf '%s' "$report" >/dev/termination-log
