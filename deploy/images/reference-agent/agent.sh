#!/bin/sh
# The reference agent (image ghcr.io/agentgate/reference-agent, built by `make image`): a small
# but real agent Pod as README "What an agent Pod sees and reports" describes it. It reads
# AGENTGATE_INPUT, does some work on it (digest, sizes, word count), looks at the limits it
# runs under (cgroup v1 or v2), and writes its report to /dev/termination-log.
#
# With `"chat": "<prompt>"` in its input it makes one OpenAI Chat Completions call through
# OPENAI_BASE_URL (the meter beside it, README "The agent meter") with busybox wget, and reports
# the usage the responses carry and the reply. With `"calls": N` as well it makes up to N such
# calls, and stops at the first one the meter refuses for budget (HTTP 402): it still reports the
# usage and output so far (`served`, `refusedForBudget`) and exits 0, as an agent handling the
# SDK's error would. Without `chat`, it calls no model, and the usage it reports is the token
# count of what it read and wrote (4 bytes a token, the usual rough rule), under AGENTGATE_MODEL.
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
calls=$(printf '%s' "$input" | field calls)
case "$calls" in '' | *[!0-9]*) calls=1 ;; esac
reply=
metered=null
served=0
refused=0
input_tokens=0
output_tokens=0
# One call: 0 answered ($answer), 2 refused by the meter for budget, 1 failed.
chat() {
  # The kubelet starts the agent only once its meter answers (the meter's startup probe), so no
  # try waits for it to listen. As the OpenAI SDK does by default: two retries after a failed
  # connection or a 5xx; a 4xx is final, a 402 (the budget) above all.
  for try in 1 2 3; do
    if answer=$(wget -q -O - --header "Authorization: Bearer ${OPENAI_API_KEY:-}" --header 'Content-Type: application/json' \
      --post-data "$1" "${OPENAI_BASE_URL:?no OPENAI_BASE_URL}/chat/completions" 2>&1); then
      return 0
    fi
    case "$answer" in *" 402 "*) return 2 ;; *" 4"[0-9][0-9]" "*) return 1 ;; esac
    [ "$try" = 3 ] && return 1
    sleep 1
  done
}
if [ -n "$prompt" ]; then
  while [ "$served" -lt "$calls" ]; do
    # One call sends the prompt as it is; more number theirs.
    content=$prompt
    [ "$calls" = 1 ] || content="$prompt (call $((served + 1)))"
    body=$(printf '{"model":"%s","messages":[{"role":"user","content":"%s"}],"max_tokens":64}' "${AGENTGATE_MODEL:-gpt-4o-mini}" "$content")
    rc=0
    chat "$body" || rc=$?
    [ "$rc" = 2 ] && { refused=1; echo "the meter refused call $((served + 1)) for budget: stopping" >&2; break; }
    [ "$rc" = 0 ] || { echo "the chat completion through $OPENAI_BASE_URL failed: $answer" >&2; exit 1; }
    served=$((served + 1))
    # What the provider counted, as the response says (the meter counts the same at the wire).
    input_tokens=$((input_tokens + $(printf '%s' "$answer" | field prompt_tokens)))
    output_tokens=$((output_tokens + $(printf '%s' "$answer" | field completion_tokens)))
    reply=$(printf '%s' "$answer" | field content | tr -d '"\\')
  done
  # The meter's running totals, as it serves them to whoever shares its loopback.
  metered=$(wget -q -O - "${OPENAI_BASE_URL%/v1}/usage") && [ -n "$metered" ] || metered=null
  metered=$(printf '%s' "$metered" | tr -d '\n')
fi

output=$(printf '{"agent":"%s","attempt":%s,"inputBytes":%s,"inputWords":%s,"inputSha256":"%s","limits":{"memoryBytes":%s,"cpuQuotaMicros":%s,"cpuPeriodMicros":%s},"reply":"%s","served":%s,"refusedForBudget":%s,"meterUsage":%s}' \
  "${AGENTGATE_AGENT:-}" "${AGENTGATE_ATTEMPT:-0}" "$bytes" "$words" "$digest" "$(num "$mem")" "$(num "$quota")" "$(num "$period")" "$reply" "$served" "$refused" "$metered")
if [ -z "$prompt" ]; then
  input_tokens=$(((bytes + 3) / 4))
  output_tokens=$(((${#output} + 3) / 4))
fi
report=$(printf '{"usage":[{"model":"%s","inputTokens":%s,"cachedInputTokens":0,"outputTokens":%s}],"output":%s}' \
  "${AGENTGATE_MODEL:-unknown}" "$input_tokens" "$output_tokens" "$output")
echo "$report"
printf '%s' "$report" >/dev/termination-log
