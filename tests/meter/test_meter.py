"""The meter between the real OpenAI and Anthropic SDKs and a stand-in upstream: usage measured
token for token, cost to the micro-dollar, the budget held under races, and the SDKs' own
behaviour on the meter's refusals (no retries)."""

import concurrent.futures
import http.client
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

import anthropic
import openai
import pytest

import upstream as standin

OPENAI_KEY = "sk-real-openai-key-for-tests"
ANTHROPIC_KEY = "sk-ant-real-key-for-tests"
# Micro-dollars per million tokens (input, cached input, output, 5-minute and 1-hour cache
# writes), as in the price table below: Anthropic's ratios (1.25 and 2 times input) for
# test-claude; the others have no write prices (writes at the input price, 1-hour at twice it).
PRICES = {"test-gpt": (2_000_000, 500_000, 8_000_000, None, None),
          "test-claude": (3_000_000, 300_000, 15_000_000, 3_750_000, 6_000_000),
          "test-embed": (100_000, 0, 0, None, None),
          # OpenAI's explicit caching (GPT-5.6 on): writes at 1.25 times input, 12-hour ones here at twice it.
          "test-gpt-cache": (2_000_000, 200_000, 8_000_000, 2_500_000, 4_000_000)}


def price_line(model, i, c, o, w, w1h):
    writes = "" if w is None else f", cacheWritePerMillion: \"{w / 1e6:.6f}\", cacheWrite1hPerMillion: \"{w1h / 1e6:.6f}\""
    return f"  {model}: {{inputPerMillion: \"{i / 1e6:.6f}\", cachedInputPerMillion: \"{c / 1e6:.6f}\", outputPerMillion: \"{o / 1e6:.6f}\"{writes}}}\n"


PRICE_YAML = "models:\n" + "".join(price_line(m, *p) for m, p in PRICES.items())


def part(tokens, rate):
    return (tokens * rate + 500_000) // 1_000_000  # rounded half up, as the Rust side


def cost(model, usage, multiplier=1_000):
    """At the list price, or (`multiplier` in thousandths) every rate scaled and rounded up, as
    the meter charges a call the provider billed above it (src/meter/surcharge.rs)."""
    i, c, o, w, w1h = PRICES[model]
    w = i if w is None else w
    w1h = 2 * i if w1h is None else w1h
    i, c, o, w, w1h = ((r * multiplier + 999) // 1_000 for r in (i, c, o, w, w1h))
    return (part(usage["input"], i) + part(usage["cached"], c) + part(usage["output"], o)
            + part(usage.get("write", 0), w) + part(usage.get("write1h", 0), w1h))


def micro(usd: str) -> int:
    whole, _, frac = usd.partition(".")
    return int(whole) * 1_000_000 + int((frac + "000000")[:6])


class Meter:
    def __init__(self, tmp_path, upstream_port, budget=None, extra=()):
        (tmp_path / "prices.yaml").write_text(PRICE_YAML)
        (tmp_path / "openai.key").write_text(OPENAI_KEY + "\n")
        (tmp_path / "anthropic.key").write_text(ANTHROPIC_KEY)
        self.report = tmp_path / "report.json"
        args = [os.environ["AGENTGATE_BIN"], "meter", "--listen", "127.0.0.1:0",
                "--openai-upstream", f"http://127.0.0.1:{upstream_port}/v1",
                "--anthropic-upstream", f"http://127.0.0.1:{upstream_port}",
                "--openai-key-file", str(tmp_path / "openai.key"),
                "--anthropic-key-file", str(tmp_path / "anthropic.key"),
                "--price-table", str(tmp_path / "prices.yaml"),
                "--report-file", str(self.report), *extra]
        if budget is not None:
            args += ["--budget-usd", budget]
        self.log = open(tmp_path / "meter.log", "w+")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log, env={**os.environ, "NO_COLOR": "1", "RUST_LOG": "debug"})
        self.url = self._wait_for_address(tmp_path / "meter.log")

    def _wait_for_address(self, log_path):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = re.search(r"listen=(127\.0\.0\.1:\d+)", re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text()))
            if match:
                return "http://" + match.group(1)
            assert self.proc.poll() is None, log_path.read_text()
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError("the meter did not start: " + log_path.read_text())

    def usage(self):
        with urllib.request.urlopen(self.url + "/usage") as r:
            return json.load(r)

    def logs(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def upstream():
    server, recorder = standin.start()
    yield recorder, server.server_address[1]
    server.shutdown()


def start_meter(tmp_path, upstream, **kw):
    return Meter(tmp_path, upstream[1], **kw)


@pytest.fixture
def meter(tmp_path, upstream):
    m = start_meter(tmp_path, upstream)
    yield m
    m.stop()
    assert OPENAI_KEY not in m.logs() and ANTHROPIC_KEY not in m.logs(), "keys never reach the logs"


def oai(meter, **kw):
    return openai.OpenAI(base_url=meter.url + "/v1", api_key="dummy", **kw)


def anth(meter, **kw):
    return anthropic.Anthropic(base_url=meter.url, api_key="dummy", **kw)


def expected_totals(calls):
    per_model = {}
    for call in calls:
        u = call["usage"]
        if u is None or call["status"] != 200:
            continue
        m = per_model.setdefault(u["model"], {"input": 0, "cached": 0, "output": 0, "write": 0, "write1h": 0, "cost": 0})
        for k in ("input", "cached", "output", "write", "write1h"):
            m[k] += u.get(k, 0)
        m["cost"] += cost(u["model"], u, billed_multiplier(call))
    return per_model


def billed_multiplier(call):
    """What the provider billed the call at, in thousandths of the list price: Anthropic's US-only
    inference at 1.1 times (its Priority Tier draws on committed capacity at the list's relative
    rates), OpenAI's priority processing at twice (from 1.7 to 2 times; `scale` unpriced, at the
    dearest)."""
    if "geo" in call:
        return 1_100 if call["geo"] == "us" else 1_000
    return 2_000 if call.get("tier") in ("priority", "scale") else 1_000


def assert_measured_exactly(meter, recorder):
    usage = meter.usage()
    want = expected_totals(recorder.snapshot())
    got = {m["model"]: {"input": m["inputTokens"], "cached": m["cachedInputTokens"], "output": m["outputTokens"],
                        "write": m.get("cacheWriteInputTokens", 0), "write1h": m.get("cacheWrite1hInputTokens", 0),
                        "cost": micro(m["costUSD"])} for m in usage["usage"]["models"]}
    assert got == want
    assert micro(usage["usage"]["costUSD"]) == sum(m["cost"] for m in want.values())
    assert usage["unmeasuredCalls"] == 0 and usage["inFlight"] == 0
    return usage


def test_openai_chat_streamed_and_not(meter, upstream):
    recorder, _ = upstream
    client = oai(meter)
    reply = client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "héllo ✓"
    text = ""
    for chunk in client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "stream please"}], stream=True):
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == "héllo wörld ✓✓✓ usage"
    # The client turned usage off: the meter turns it back on (else the stream is unmeasurable).
    list(client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "x"}], stream=True,
                                        stream_options={"include_usage": False}, max_tokens=40))
    calls = recorder.snapshot()
    assert [c["headers"]["authorization"] for c in calls] == ["Bearer " + OPENAI_KEY] * 3, "the dummy key never goes out"
    assert calls[0]["body"]["max_completion_tokens"] == 16384, "a call without a cap gets the default one"
    assert calls[1]["body"]["stream_options"] == {"include_usage": True}
    assert calls[2]["body"]["stream_options"] == {"include_usage": True}
    assert calls[2]["body"]["max_tokens"] == 40 and "max_completion_tokens" not in calls[2]["body"], "the client's own cap is kept"
    usage = assert_measured_exactly(meter, recorder)
    assert usage["calls"] == 3


def test_openai_responses_and_embeddings(meter, upstream):
    recorder, _ = upstream
    client = oai(meter)
    assert client.responses.create(model="test-gpt", input="hi", max_output_tokens=30).output_text == "héllo ✓"
    events = [e.type for e in client.responses.create(model="test-gpt", input="stream", stream=True)]
    assert events[-1] == "response.completed"
    emb = client.embeddings.create(model="test-embed", input=["a", "b"])
    assert len(emb.data) == 2
    assert recorder.snapshot()[1]["body"]["max_output_tokens"] == 16384
    assert assert_measured_exactly(meter, recorder)["calls"] == 3


def test_a_response_continues_one_the_meter_saw_and_only_those(meter, upstream):
    recorder, _ = upstream
    client = oai(meter)
    first = client.responses.create(model="test-gpt", input="remember this", max_output_tokens=30)
    second = client.responses.create(model="test-gpt", input="and now?", previous_response_id=first.id, max_output_tokens=30)
    streamed = list(client.responses.create(model="test-gpt", input="more", previous_response_id=second.id, stream=True))
    client.responses.create(model="test-gpt", input="last", previous_response_id=streamed[-1].response.id, max_output_tokens=30)
    with pytest.raises(openai.BadRequestError) as e:  # stored elsewhere: its size is unknown
        client.responses.create(model="test-gpt", input="x", previous_response_id="resp_from_elsewhere")
    assert e.value.body["type"] == "unbounded_cost"
    assert len(recorder.snapshot()) == 4
    assert assert_measured_exactly(meter, recorder)["calls"] == 4


def test_anthropic_messages_streamed_and_not(meter, upstream):
    recorder, _ = upstream
    client = anth(meter)
    msg = client.messages.create(model="test-claude", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "héllo ✓"
    with client.messages.stream(model="test-claude", max_tokens=100, messages=[{"role": "user", "content": "stream"}]) as s:
        assert s.get_final_text() == "héllo ✓"
    raw = list(client.messages.create(model="test-claude", max_tokens=64, messages=[{"role": "user", "content": "raw"}], stream=True))
    assert raw[-1].type == "message_stop"
    calls = recorder.snapshot()
    assert [c["headers"].get("x-api-key") for c in calls] == [ANTHROPIC_KEY] * 3
    assert all("authorization" not in c["headers"] for c in calls)
    assert assert_measured_exactly(meter, recorder)["calls"] == 3


def test_models_list_and_the_report_file(meter, upstream):
    recorder, _ = upstream
    client = oai(meter)
    assert [m.id for m in client.models.list()] == ["test-gpt"]
    client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "hi"}])
    usage = assert_measured_exactly(meter, recorder)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # written after the call settles, asynchronously
        if meter.report.exists() and json.loads(meter.report.read_text()) == usage:
            break
        time.sleep(0.02)
    assert json.loads(meter.report.read_text()) == usage


def test_the_models_path_climbs_to_no_other_upstream_path(meter, upstream):
    """GET /v1/models/<id> goes upstream with the team's real key. A path that climbs out of it
    (dot segments, escaped or not, which a proxy or CDN in front of the provider resolves) would
    reach the team's files, batches or fine-tunes with that key, past the meter: refused there."""
    recorder, _ = upstream
    host, port = meter.url.removeprefix("http://").split(":")
    climbing = ["/v1/models/../files/file-1/content", "/v1/models/x/../../batches", "/v1/models/%2e%2e/files",
                "/v1/models/%2E%2E%2Ffiles", "/v1/models/..", "/v1/models/./../files", "/v1/models//files"]
    for path in climbing + ["/v1/models/test-gpt"]:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", path, headers={"authorization": "Bearer dummy"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        # The stand-in knows no single model either: 404 from it, but the request went there.
        assert response.status == 404, (path, response.status, body)
        assert OPENAI_KEY.encode() not in body
    assert recorder.gets == ["/v1/models/test-gpt"], "only the model's own path is forwarded"
    assert [m.id for m in oai(meter).models.list()] == ["test-gpt"]


def test_upstream_errors_pass_through_and_cost_nothing(meter, upstream):
    recorder, _ = upstream
    client = oai(meter, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "FAIL400"}])
    assert e.value.body["message"] == "upstream says no"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "FAIL500"}])
    usage = meter.usage()
    assert usage["calls"] == 0 and micro(usage["usage"]["costUSD"]) == 0 and usage["reservedUSD"] == "0.00"


def test_an_unreachable_upstream_is_a_retryable_502_that_costs_nothing(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    meter = Meter(tmp_path, port, budget="1")
    try:
        with pytest.raises(openai.InternalServerError) as e:
            oai(meter, max_retries=2).chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 502 and e.value.body["type"] == "upstream_error"
        usage = meter.usage()
        assert usage["calls"] == 0 and usage["reservedUSD"] == "0.00" and micro(usage["usage"]["costUSD"]) == 0
        assert usage["inFlight"] == 0
    finally:
        meter.stop()


def test_refusals_never_reach_the_upstream(meter, upstream):
    recorder, _ = upstream
    client = oai(meter)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-unpriced", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "model_not_priced"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="test-gpt", input="hi", previous_response_id="resp_1")
    assert e.value.body["type"] == "unbounded_cost"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="test-gpt", prompt="legacy, unmetered")
    for body in [b"not json", b"[1]", b"{\"model\": 5}", b"\xff\xfe", b"{\"model\":\"test-gpt\",\"max_tokens\":-1}"]:
        req = urllib.request.Request(meter.url + "/v1/chat/completions", data=body, method="POST", headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 400
        err = json.load(e.value)["error"]
        assert err["type"] == "invalid_request_error" and OPENAI_KEY not in err["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        anth(meter).messages.create(model="test-claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                                    tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert e.value.body["error"]["type"] == "unbounded_cost"
    assert recorder.snapshot() == []
    assert meter.usage()["refusedCalls"] == 8, "every refusal counted once: the SDKs did not retry"
    assert meter.usage()["budgetRefusals"] == 0, "a bad request is no budget refusal"


def test_calls_the_provider_bills_above_the_price_table_are_refused(meter, upstream):
    """Attack: an agent asks for what the provider bills above the model's list price, which the
    meter would count (and reserve) at that price: OpenAI's priority (or scale) processing, the
    Anthropic 1M-context beta (above 200K input tokens: twice the input price), and Anthropic
    cache writes with a TTL the price table has no price for (5m and 1h are priced)."""
    recorder, _ = upstream
    hi = [{"role": "user", "content": "hi"}]
    for tier in ["priority", "scale", "PRIORITY", "some-future-tier"]:
        with pytest.raises(openai.BadRequestError) as e:
            oai(meter).chat.completions.create(model="test-gpt", messages=hi, max_tokens=10, service_tier=tier)
        assert e.value.body["type"] == "unbounded_cost" and "service_tier" in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        oai(meter).responses.create(model="test-gpt", input="hi", max_output_tokens=10, service_tier="priority")
    assert e.value.body["type"] == "unbounded_cost"
    for beta in ["context-1m-2025-08-07", "files-api-2025-04-14, context-1m-2025-08-07"]:
        with pytest.raises(anthropic.BadRequestError) as e:
            anth(meter).messages.create(model="test-claude", max_tokens=10, messages=hi, extra_headers={"anthropic-beta": beta})
        assert e.value.body["error"]["type"] == "unbounded_cost" and "context-1m" in e.value.body["error"]["message"]
    day = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral", "ttl": "24h"}}]}]
    with pytest.raises(anthropic.BadRequestError) as e:
        anth(meter).messages.create(model="test-claude", max_tokens=10, messages=day)
    assert e.value.body["error"]["type"] == "unbounded_cost" and "ttl" in e.value.body["error"]["message"]
    assert recorder.snapshot() == [], "a call billed above its price reached the provider"
    # What is billed at the list price (or below) still passes.
    for tier in [None, "auto", "default", "flex"]:
        extra = {} if tier is None else {"service_tier": tier}
        oai(meter).chat.completions.create(model="test-gpt", messages=hi, max_tokens=10, **extra)
    five = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}]
    anth(meter).messages.create(model="test-claude", max_tokens=10, messages=five, extra_headers={"anthropic-beta": "files-api-2025-04-14"})
    hour = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]
    anth(meter).messages.create(model="test-claude", max_tokens=10, messages=hour)
    assert len(recorder.snapshot()) == 6
    assert_measured_exactly(meter, recorder)


def billed_by_anthropic(call):
    """A call's cost as Anthropic bills it: the list price times the premiums of where it ran (its
    pricing page: fast mode at 6 times the price on Opus 4.6 and 4.7, US-only inference at 1.1
    times, whether the request or its workspace chose it)."""
    fast = 6_000 if call["body"].get("speed") == "fast" else 1_000
    return cost(call["usage"]["model"], call["usage"], fast * billed_multiplier(call) // 1_000)


def test_anthropic_fast_mode_and_us_only_inference_cannot_spend_past_the_budget(tmp_path, upstream):
    """Attack: an agent asks Anthropic for `speed: "fast"` (billed at 6 times the list price) or
    `inference_geo: "us"` (1.1 times), which the meter counted, and reserved, at the list price:
    with $0.20 of budget the agent was billed $1.15 in 11 fast calls. Refused now, before the
    provider, as the other options billed above the price table are; their standard values pass."""
    recorder, _ = upstream
    budget = micro("0.20")
    meter = start_meter(tmp_path, upstream, budget="0.20")
    try:
        client = anth(meter, max_retries=0)
        prompt = [{"role": "user", "content": "MAXOUT " + "x" * 4_000}]
        hostile = [{"speed": "fast", "extra_headers": {"anthropic-beta": "fast-mode-2026-02-01"}},
                   {"extra_body": {"inference_geo": "us"}}]
        refusals = []
        for options in hostile:  # each until the meter refuses it
            with pytest.raises(anthropic.APIStatusError) as e:
                for _ in range(100):
                    client.messages.create(model="test-claude", max_tokens=300, messages=prompt, **options)
            refusals.append((e.value.status_code, e.value.body["error"]["type"]))
        served = [c for c in recorder.snapshot() if c["status"] == 200]
        billed = sum(billed_by_anthropic(c) for c in served)
        print(f"{len(served)} calls at a premium reached the provider, billed ${billed / 1e6:.6f} of a ${budget / 1e6} budget")
        assert billed <= budget, "the agent was billed past its budget"
        assert refusals == [(400, "unbounded_cost")] * 2, refusals
        assert served == [], "a call billed above its price reached the provider"
        # The standard values, and none, are the list price: they pass.
        for options in [{"speed": "standard"}, {"extra_body": {"inference_geo": "global"}}, {"speed": None}, {}]:
            client.messages.create(model="test-claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}], **options)
        assert len(recorder.snapshot()) == 4
        assert_measured_exactly(meter, recorder)
    finally:
        meter.stop()


def billed_by_openai(call):
    return cost(call["usage"]["model"], call["usage"], billed_multiplier(call))


@pytest.mark.parametrize("project", ["the key's project", "the agent's OpenAI-Project header"])
def test_an_openai_project_defaulting_to_priority_cannot_bill_past_the_budget(tmp_path, upstream, project):
    """Attack: a call with `service_tier` absent or `auto` is processed at the default tier of its
    project, which can be priority (twice the list price the meter counts): the key's own
    project, or one the agent names in an `OpenAI-Project` header when the key is not
    project-scoped. Before, with $0.20 of budget the agent was billed $0.381 (metered $0.190) either
    way. The meter now pins `service_tier: "default"` on such calls and drops the agent's
    `OpenAI-Project` and `OpenAI-Organization` headers; `flex` and `default` pass as asked."""
    recorder, _ = upstream
    if project == "the key's project":
        recorder.project_tiers[None] = "priority"
        headers = {}
    else:
        recorder.project_tiers["proj_priority"] = "priority"
        headers = {"OpenAI-Project": "proj_priority", "OpenAI-Organization": "org_other"}
    budget = micro("0.20")
    meter = start_meter(tmp_path, upstream, budget="0.20")
    try:
        client = oai(meter, max_retries=0, default_headers=headers)
        prompt = "MAXOUT " + "x" * 4_000
        with pytest.raises(openai.APIStatusError) as e:
            for i in range(100):  # until the meter refuses: no tier, `auto`, and the Responses API
                if i % 3 == 2:
                    client.responses.create(model="test-gpt", input=prompt, max_output_tokens=300)
                else:
                    tier = {} if i % 3 == 0 else {"service_tier": "auto"}
                    client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": prompt}], max_tokens=300, **tier)
        assert e.value.status_code == 402
        served = [c for c in recorder.snapshot() if c["status"] == 200]
        billed = sum(billed_by_openai(c) for c in served)
        metered = micro(meter.usage()["usage"]["costUSD"])
        print(f"{project}: {len(served)} calls, billed ${billed / 1e6:.6f}, metered ${metered / 1e6:.6f}, budget ${budget / 1e6}")
        assert billed <= budget, f"the agent was billed ${billed / 1e6:.6f} past its ${budget / 1e6} budget"
        assert [c["tier"] for c in served] == ["default"] * len(served)
        assert all("openai-project" not in c["headers"] and "openai-organization" not in c["headers"] for c in served)
        assert_measured_exactly(meter, recorder)
        # What the agent asks for explicitly at or below the list price is kept.
        for tier in ["flex", "default"]:
            client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "hi"}], max_tokens=10, service_tier=tier)
        assert [c["tier"] for c in recorder.snapshot()[-2:]] == ["flex", "default"]
    finally:
        meter.stop()


def test_anthropic_calls_billed_at_the_workspaces_defaults_are_charged_at_that_price(meter, upstream):
    """An Anthropic workspace whose default inference geo is `us` (1.1 times the list price), or
    an organisation with Priority Tier capacity that `service_tier: auto` (the default) draws on,
    bills a call at other than the list price, and the meter cannot pin either away: an
    `inference_geo` in the request is refused (400) by models before Opus 4.6, and a pinned
    `global` would override the workspace's data-residency choice. The meter reads where the
    response says the call ran, charges US-only calls at 1.1 times, Priority Tier ones at the
    list price (they draw on committed capacity at its relative rates), and warns, naming the
    model and what the call was billed at; a call at the list price draws no warning."""
    recorder, _ = upstream
    recorder.workspace_geo, recorder.priority_capacity = "us", True
    hi = [{"role": "user", "content": "hi"}]
    anth(meter).messages.create(model="test-claude", max_tokens=10, messages=hi)
    with anth(meter).messages.stream(model="test-claude", max_tokens=10, messages=hi) as s:
        s.get_final_message()
    # At the list price: asked for explicitly.
    anth(meter).messages.create(model="test-claude", max_tokens=10, messages=hi, service_tier="standard_only", extra_body={"inference_geo": "global"})
    assert meter.usage()["calls"] == 3 and meter.usage()["inFlight"] == 0, "all three calls settled"
    warnings = [line for line in meter.logs().splitlines() if "WARN" in line and "above the model's list price" in line]
    assert len(warnings) == 2, warnings
    for line in warnings:
        assert "inference_geo" in line and "us" in line and "priority" in line and "test-claude" in line, line
    assert_measured_exactly(meter, recorder)  # at 1.1 times for the two US-only calls


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_call_billed_above_the_list_price_is_charged_at_that_price(tmp_path, upstream, provider):
    """Attack: the account bills calls above the list price although the request did not ask for
    it, and says so only in the response: an OpenAI project that processes calls at `priority`
    (twice the price) although the meter pinned `service_tier: "default"`, an Anthropic workspace
    whose default geo is US-only (1.1 times) for calls that name none. The meter only warned and
    counted them at the list price: the OpenAI agent's 4 calls (chat and Responses API, streamed
    and not) were billed $0.085056 and counted $0.042528; with $0.20 of budget the Anthropic agent
    made 11 calls, billed $0.210543 (past its budget) and counted $0.191400. Now each call is
    charged at the price its response reports (OpenAI: $0.085056 counted, as billed; Anthropic:
    10 calls, $0.191425 billed and counted, within the budget) and still warned of."""
    recorder, _ = upstream
    budget = micro("0.20")
    meter = start_meter(tmp_path, upstream, budget="0.20")
    prompt = "MAXOUT " + "x" * 4_000
    try:
        if provider == "openai":
            recorder.forced_tier = "priority"
            client = oai(meter, max_retries=0)
            chat = {"model": "test-gpt", "messages": [{"role": "user", "content": prompt}], "max_tokens": 300}
            client.chat.completions.create(**chat)
            list(client.chat.completions.create(**chat, stream=True, service_tier="default"))
            client.responses.create(model="test-gpt", input=prompt, max_output_tokens=300)
            list(client.responses.create(model="test-gpt", input=prompt, max_output_tokens=300, stream=True, service_tier="default"))
            served = recorder.snapshot()
            assert [c["body"]["service_tier"] for c in served] == ["default"] * 4, "the meter asked for the list price"
            assert [c["tier"] for c in served] == ["priority"] * 4
            billed = sum(billed_by_openai(c) for c in served)
        else:
            recorder.workspace_geo = "us"
            client = anth(meter, max_retries=0)
            with pytest.raises(anthropic.APIStatusError) as e:
                for i in range(100):  # until the meter refuses, streamed and not
                    options = {"model": "test-claude", "max_tokens": 300, "messages": [{"role": "user", "content": prompt}]}
                    if i % 2:
                        with client.messages.stream(**options) as s:
                            s.get_final_message()
                    else:
                        client.messages.create(**options)
            assert e.value.status_code == 402
            served = [c for c in recorder.snapshot() if c["status"] == 200]
            assert len(served) >= 2 and {c["geo"] for c in served} == {"us"}
            billed = sum(billed_by_anthropic(c) for c in served)
        metered = micro(meter.usage()["usage"]["costUSD"])
        at_list = sum(cost(c["usage"]["model"], c["usage"]) for c in served)
        print(f"{provider}: {len(served)} calls billed ${billed / 1e6:.6f}, metered ${metered / 1e6:.6f} (at the list price ${at_list / 1e6:.6f}), budget ${budget / 1e6}")
        assert metered >= billed, f"billed ${billed / 1e6:.6f}, counted ${metered / 1e6:.6f}"
        assert_measured_exactly(meter, recorder)
        if provider == "anthropic":
            assert billed <= budget, f"the agent was billed ${billed / 1e6:.6f} past its ${budget / 1e6} budget"
        warnings = [line for line in meter.logs().splitlines() if "WARN" in line and "above the model's list price" in line]
        assert len(warnings) == len(served), warnings
    finally:
        meter.stop()


def test_an_anthropic_call_naming_no_geo_is_reserved_at_the_us_only_price(tmp_path, upstream):
    """A call that names no `inference_geo` runs at its workspace's default geo, which the meter
    cannot see and may be US-only (1.1 times): its worst case is reserved at that price, so a
    call's worst case fits only in what the US-only price leaves. Before, both calls were reserved
    alike ($0.244258 pinned to global, $0.244165 naming no geo); now the one naming no geo
    reserves $0.268581, 1.1 times."""
    meter = start_meter(tmp_path, upstream, budget="0.000001")
    try:
        needed = []
        for extra in [{"inference_geo": "global"}, {}]:
            with pytest.raises(anthropic.APIStatusError) as e:
                anth(meter, max_retries=0).messages.create(model="test-claude", max_tokens=16_000, messages=[{"role": "user", "content": "hi"}], extra_body=extra)
            assert e.value.status_code == 402
            needed.append(micro(re.search(r"may cost up to \$([0-9.]+)", e.value.body["error"]["message"]).group(1)))
        print(f"reserved: ${needed[0] / 1e6:.6f} pinned to global, ${needed[1] / 1e6:.6f} at the workspace's default geo")
        assert 1.099 < needed[1] / needed[0] < 1.101, needed
        assert upstream[0].snapshot() == []
    finally:
        meter.stop()


def cached_prompt(text, ttl):
    return [{"role": "user", "content": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": ttl}}]}]


def test_cache_writes_are_recorded_at_their_price(meter, upstream):
    """Anthropic bills a cache write above input: 1.25 times the input price kept 5 minutes,
    twice it kept an hour. The meter once counted writes as input (and refused 1-hour ones): a
    job that wrote its cache a lot recorded less than it spent."""
    recorder, _ = upstream
    client = anth(meter)
    five = client.messages.create(model="test-claude", max_tokens=20, messages=cached_prompt("context " * 500, "5m"))
    assert five.usage.cache_creation_input_tokens > 0 and five.usage.cache_creation.ephemeral_1h_input_tokens == 0
    with client.messages.stream(model="test-claude", max_tokens=20, messages=cached_prompt("context " * 700, "1h")) as s:
        hour = s.get_final_message()
    assert hour.usage.cache_creation.ephemeral_1h_input_tokens > 0, "the SDK read the 1-hour split from the stream"
    usage = assert_measured_exactly(meter, recorder)
    [claude] = usage["usage"]["models"]
    sdk = [five.usage, hour.usage]
    assert claude["cacheWriteInputTokens"] == sum(u.cache_creation.ephemeral_5m_input_tokens for u in sdk)
    assert claude["cacheWrite1hInputTokens"] == sum(u.cache_creation.ephemeral_1h_input_tokens for u in sdk)
    assert claude["inputTokens"] == sum(u.input_tokens for u in sdk), "inputTokens is fresh input only"
    assert usage["usage"]["totalTokens"] == sum(u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens + u.output_tokens for u in sdk)
    # The USD: writes at 1.25 and 2 times the input price, not at it.
    i, c, o, w, w1h = PRICES["test-claude"]
    writes5, writes1h = claude["cacheWriteInputTokens"], claude["cacheWrite1hInputTokens"]
    rest = part(claude["inputTokens"], i) + part(claude["cachedInputTokens"], c) + part(claude["outputTokens"], o)
    recorded = micro(claude["costUSD"])
    assert recorded == rest + part(writes5, i * 5 // 4) + part(writes1h, 2 * i)
    as_input = rest + part(writes5 + writes1h, i)  # what the meter recorded before
    print(f"cache writes {writes5} (5m) + {writes1h} (1h) tokens: recorded ${recorded / 1e6:.6f}, as input ${as_input / 1e6:.6f}")
    assert recorded > as_input


def test_an_agent_writing_its_cache_cannot_spend_past_its_budget(tmp_path, upstream):
    """Attack: an agent whose calls are almost all cache writes. Counted as input, each call cost
    the job 25% less than Anthropic billed it, so the meter let the agent spend past its budget;
    now it reserves and records the writes at their price and refuses (402) the call that would
    cross the budget at that price."""
    recorder, _ = upstream
    budget = micro("0.20")
    meter = start_meter(tmp_path, upstream, budget="0.20")
    try:
        client = anth(meter)
        prompt = cached_prompt("CACHEWRITE " + "x" * 8_000, "5m")
        with pytest.raises(anthropic.APIStatusError) as e:
            for _ in range(100):
                client.messages.create(model="test-claude", max_tokens=10, messages=prompt)
        assert e.value.status_code == 402 and e.value.body["error"]["type"] == "budget_exceeded"
        calls = [c for c in recorder.snapshot() if c["status"] == 200]
        billed = sum(cost("test-claude", c["usage"]) for c in calls)  # what Anthropic would bill
        usage = assert_measured_exactly(meter, recorder)
        assert micro(usage["usage"]["costUSD"]) == billed <= budget, "the job recorded, and spent, no more than its budget"
        assert usage["budgetRefusals"] == 1
        # Before: each call counted its writes at the input price, so more calls fit the budget
        # than it pays for at the real price.
        i, _, o, _, _ = PRICES["test-claude"]
        old_cost = sum(part(c["usage"]["write"] + c["usage"]["input"], i) + part(c["usage"]["output"], o) for c in calls) // len(calls)
        per_call = billed // len(calls)
        old_reserve = part(len(json.dumps(calls[0]["body"])) + 1024, i) + part(10, o)
        fits_before = next(n for n in range(1, 1000) if (n - 1) * old_cost + old_reserve > budget) - 1
        print(f"{len(calls)} calls of ${per_call / 1e6:.6f} within ${budget / 1e6}; counted as input, {fits_before} would have passed "
              f"(${fits_before * per_call / 1e6:.6f} billed)")
        assert fits_before * per_call > budget and fits_before > len(calls)
    finally:
        meter.stop()


@pytest.mark.parametrize("api", ["chat", "responses", "responses-12h"])
def test_an_agent_writing_an_openai_cache_cannot_spend_past_its_budget(tmp_path, upstream, api):
    """Attack: an agent whose OpenAI calls all write the prompt cache, which OpenAI bills above
    input since GPT-5.6 (1.25 times it for 30 minutes). The meter read only `cached_tokens` and
    counted the writes as input, so it let the agent spend past its budget; now it counts them
    (`cache_write_tokens`, split by TTL) at their price and refuses (402) the call that would
    cross the budget at it."""
    recorder, _ = upstream
    budget = micro("0.20")
    meter = start_meter(tmp_path, upstream, budget="0.20")
    try:
        client = oai(meter, max_retries=0)
        prompt = "CACHEWRITE " + "x" * 8_000
        with pytest.raises(openai.APIStatusError) as e:
            for _ in range(100):
                if api == "chat":
                    client.chat.completions.create(model="test-gpt-cache", max_tokens=10, messages=[{"role": "user", "content": prompt}])
                else:
                    options = {"prompt_cache_options": {"ttl": "12h"}} if api == "responses-12h" else {}
                    client.responses.create(model="test-gpt-cache", max_output_tokens=10, input=prompt, extra_body=options)
        calls = [c for c in recorder.snapshot() if c["status"] == 200]
        billed = sum(cost("test-gpt-cache", c["usage"]) for c in calls)  # what OpenAI would bill
        print(f"{api}: {len(calls)} calls billed ${billed / 1e6:.6f} of a ${budget / 1e6} budget; meter: {meter.usage()['usage']['costUSD']}")
        assert billed <= budget, "the agent was billed past its budget"
        assert e.value.status_code == 402 and e.value.body["type"] == "budget_exceeded", e.value.body
        usage = assert_measured_exactly(meter, recorder)
        [model] = usage["usage"]["models"]
        assert model["cacheWriteInputTokens" if api != "responses-12h" else "cacheWrite1hInputTokens"] == sum(c["usage"]["input"] + c["usage"].get("write", 0) + c["usage"].get("write1h", 0) for c in calls)
    finally:
        meter.stop()


def test_a_client_that_leaves_mid_stream_is_charged_its_reservation(meter, upstream):
    recorder, _ = upstream
    client = oai(meter)
    stream = client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "SLOW"}], stream=True, max_tokens=1000)
    next(iter(stream))
    stream.close()  # hangs up after the first chunk
    deadline = time.monotonic() + 10
    while meter.usage()["inFlight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    usage = meter.usage()
    assert usage["unmeasuredCalls"] == 1 and usage["inFlight"] == 0
    # The reservation: at least the whole output cap at the output price, never zero.
    assert micro(usage["usage"]["costUSD"]) >= part(1000, PRICES["test-gpt"][2])


def test_a_client_that_hangs_up_after_the_usage_is_charged_what_was_measured(meter, upstream):
    """The OpenAI SDK closes a stream's response at `data: [DONE]`, before the chunked body's end:
    when the meter noticed the client gone before the provider's end came, the call was charged
    its whole reservation as unmeasured, although its usage had passed (1 run in 8 of
    test_many_concurrent_calls_never_overspend[openai] failed so). Usage that has passed is final."""
    recorder, _ = upstream
    stream = oai(meter).chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "LINGER"}], stream=True, max_tokens=300)
    assert [c for c in stream if c.usage is not None], "the usage came through"
    deadline = time.monotonic() + 30
    while meter.usage()["inFlight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert meter.usage()["inFlight"] == 0, "the call settled"
    assert meter.usage()["unmeasuredCalls"] == 0
    assert_measured_exactly(meter, recorder)


def test_the_call_that_would_cross_the_budget_gets_402_without_retries(tmp_path, upstream):
    recorder, _ = upstream
    meter = start_meter(tmp_path, upstream, budget="0.02")
    try:
        # Each call reserves ~1,100 input tokens × $2/M + 500 output × $8/M ≈ $0.0062: three fit.
        client = oai(meter)
        with pytest.raises(openai.APIStatusError) as e:
            for _ in range(100):
                client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "hi"}], max_tokens=500)
        assert e.value.status_code == 402
        assert e.value.body["type"] == "budget_exceeded" and e.value.body["code"] == "budget_exceeded"
        hits = len(recorder.snapshot())
        usage = meter.usage()
        assert usage["refusedCalls"] == 1, "the SDK did not retry the 402"
        assert usage["budgetRefusals"] == 1, "counted as a budget refusal: in a cluster it ends the job BudgetExhausted"
        assert usage["calls"] == hits and hits >= 3
        assert micro(usage["usage"]["costUSD"]) <= micro("0.02")
        # A forged huge cap cannot buy its way in either, and no cap gets one that fits.
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "hi"}], max_tokens=10**9)
        assert e.value.status_code == 402
        with pytest.raises(anthropic.APIStatusError) as e:
            anth(meter).messages.create(model="test-claude", max_tokens=4096, messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 402 and e.value.body["error"]["type"] == "budget_exceeded"
        assert len(recorder.snapshot()) == hits
        assert meter.usage()["budgetRefusals"] == 3
        assert_measured_exactly(meter, recorder)
    finally:
        meter.stop()


def test_an_uncapped_call_gets_the_cap_the_budget_allows(tmp_path, upstream):
    recorder, _ = upstream
    meter = start_meter(tmp_path, upstream, budget="0.01")
    try:
        oai(meter).chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "hi"}])
        cap = recorder.snapshot()[0]["body"]["max_completion_tokens"]
        assert 0 < cap < 16384
        assert part(cap, PRICES["test-gpt"][2]) <= micro("0.01")
    finally:
        meter.stop()


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_many_concurrent_calls_never_overspend(tmp_path, upstream, sdk):
    recorder, _ = upstream
    meter = start_meter(tmp_path, upstream, budget="0.05")
    try:
        refused = []
        # One client shared by the threads, as an agent would (its connection pool is thread-safe).
        c = oai(meter, max_retries=0) if sdk == "openai" else anth(meter, max_retries=0)

        def call(i):
            try:
                if sdk == "openai":
                    list(c.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": f"MAXOUT {i}"}], stream=i % 2 == 0, max_tokens=300))
                else:
                    reply = c.messages.create(model="test-claude", max_tokens=150, messages=[{"role": "user", "content": f"MAXOUT {i}"}], stream=i % 2 == 0)
                    if i % 2 == 0:
                        list(reply)  # a stream is measured as it is read
            except (openai.APIStatusError, anthropic.APIStatusError) as e:
                assert e.status_code == 402
                refused.append(i)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            list(pool.map(call, range(120)))
        usage = meter.usage()
        assert refused, "the budget ran out"
        print(f"{sdk}: {usage['calls']} calls, {len(refused)} refused, spent ${usage['usage']['costUSD']} of $0.05")
        # Every call really costs its whole output cap: the budget is used, and never exceeded.
        assert micro("0.05") // 2 < micro(usage["usage"]["costUSD"]) <= micro("0.05")
        assert usage["calls"] == len(recorder.snapshot()) == 120 - len(refused)
        assert usage["refusedCalls"] == len(refused)
        assert_measured_exactly(meter, recorder)
    finally:
        meter.stop()


# The meter container's memory limit (domain/meter_sidecar.rs): the meter must never reach it.
METER_MEMORY_LIMIT = 64 * 1024 * 1024
MIB = 1024 * 1024


def peak_rss(pid):
    """The process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def raw_post(meter, body: bytes, content_length=None, send_body=True, timeout=30):
    """POSTs a chat completion over a bare socket: (status, headers) or the error's name."""
    import socket
    host, port = meter.url.removeprefix("http://").split(":")
    length = len(body) if content_length is None else content_length
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer dummy\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        # Read while sending: a body refused by its Content-Length is answered before it is
        # read, and the meter then closes the connection under the rest of it.
        def read():
            try:
                response = http.client.HTTPResponse(s)
                response.begin()
                response.read()
                return response.status, dict(response.getheaders())
            except OSError as e:
                return type(e).__name__, {}
        with concurrent.futures.ThreadPoolExecutor(1) as reader:
            answer = reader.submit(read)
            try:
                s.sendall(head + (body if send_body else b""))
            except OSError:
                pass
            return answer.result()


def chat_body(content_bytes):
    return json.dumps({"model": "test-gpt", "max_tokens": 10,
                       "messages": [{"role": "user", "content": "x" * content_bytes}]}).encode()


def test_concurrent_huge_requests_cannot_crash_the_meter(meter, upstream):
    """The agent is the hostile party: bodies the meter would buffer and parse, many at once,
    some of them JSON whose parse is many times its size. Before the buffer budget the meter's
    peak memory went far past its container's limit (OOM-killed in a Pod, losing usage)."""
    import socket
    recorder, _ = upstream
    pid = meter.proc.pid
    host, port = meter.url.removeprefix("http://").split(":")
    # Two bodies announced at 9 MiB that never finish: the meter holds their memory meanwhile.
    holders = []
    for _ in range(2):
        s = socket.create_connection((host, int(port)), timeout=60)
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                   f"content-length: {9 * MIB}\r\n\r\n").encode() + b"{" + b" " * MIB)
        holders.append(s)
    try:
        hostile = json.dumps({"model": "test-gpt", "max_tokens": 10,
                              "messages": [{"role": "user", "content": [0] * (3 * MIB // 2)}]}).encode()
        ordinary = chat_body(5 * MIB)
        jobs = [(ordinary, None, True)] * 8 + [(hostile, None, True)] * 4 + [(b"", 30 * MIB, False)] * 4
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: raw_post(meter, job[0], job[1], job[2]), jobs))
        peak = peak_rss(pid)
        print(f"meter peak RSS after the flood: {peak / MIB:.1f} MiB; statuses: {[r[0] for r in results]}")
        assert meter.proc.poll() is None, "the meter died: " + meter.logs()[-2000:]
        assert peak < METER_MEMORY_LIMIT, f"the meter's peak memory {peak / MIB:.1f} MiB reached its container's limit"
        # Announced over the per-request cap: refused before a byte is read.
        assert all(r[0] == 413 for r in results[12:]), results[12:]
        # Everything else was refused: the holders leave too little for a 5 MiB body and its parse.
        assert all(r[0] in (413, 503) for r in results[:12]), [r[0] for r in results]
        busy = [r for r in results if r[0] == 503]
        assert busy and all(r[1].get("retry-after") == "1" for r in busy), "momentary shortage: 503 with Retry-After"
        # JSON whose parse is far larger than itself can never be held: 413, also when alone.
        assert raw_post(meter, hostile)[0] == 413
    finally:
        for s in holders:
            s.close()
    # The meter stays up and serves: the SDK (retrying a 503 while the holders' memory comes
    # back) gets a 5 MiB call through, and every call that went through is counted exactly.
    client = oai(meter, max_retries=5)
    reply = client.chat.completions.create(model="test-gpt", max_tokens=10, messages=[{"role": "user", "content": "y" * (5 * MIB)}])
    assert reply.choices[0].message.content == "héllo ✓"
    client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "hi"}])
    assert len(recorder.snapshot()) == 2
    assert_measured_exactly(meter, recorder)
    assert peak_rss(pid) < METER_MEMORY_LIMIT


def test_connections_with_endless_headers_cannot_crash_the_meter(meter, upstream):
    """Attack: connections that send request headers and never finish them. The buffer budget
    bounds bodies, but each connection could buffer 408 KiB of an unfinished head, for ever: 200
    of them took the meter past its container's memory limit (OOM-killed in a Pod, losing the
    usage of the calls in flight). Now a head past 16 KiB is answered 431 and its memory freed."""
    import socket
    recorder, _ = upstream
    pid = meter.proc.pid
    host, port = meter.url.removeprefix("http://").split(":")
    line = b"x-padding: " + b"a" * 8_000 + b"\r\n"
    flood = []
    try:
        for _ in range(200):
            s = socket.create_connection((host, int(port)), timeout=30)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: meter\r\nauthorization: Bearer dummy\r\n")
            try:
                for _ in range(50):  # 400 KB of headers, never ended by a blank line
                    s.sendall(line)
            except OSError:
                pass  # the meter answered and closed: the rest is refused
            flood.append(s)
        answers = []
        for s in flood:  # each connection's answer: the event that the meter has read its bytes
            try:
                response = http.client.HTTPResponse(s)
                response.begin()
                answers.append(response.status)
            except OSError as e:  # no answer: the meter holds the head (before: all 200 of them)
                answers.append(type(e).__name__)
                break
        peak = peak_rss(pid)
        print(f"meter peak RSS after 200 endless heads of 400 KB: {peak / MIB:.1f} MiB; answers: {sorted(set(map(str, answers)))}")
        assert meter.proc.poll() is None, "the meter died: " + meter.logs()[-2000:]
        assert peak < METER_MEMORY_LIMIT, f"the meter's peak memory {peak / MIB:.1f} MiB reached its container's limit"
        assert answers == [431] * 200, "a head too large for the meter is refused, not buffered"
    finally:
        for s in flood:
            s.close()
    # The meter still serves, and an SDK's ordinary head passes.
    client = oai(meter)
    assert client.chat.completions.create(model="test-gpt", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content == "héllo ✓"
    assert len(recorder.snapshot()) == 1
    assert_measured_exactly(meter, recorder)
