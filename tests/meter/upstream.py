"""A stand-in for the OpenAI and Anthropic APIs (no provider is reachable from CI): it speaks each
wire format, streamed and not, reports a usage it decides from the request, and records every
call it received so tests can compare what the meter measured with what was reported."""

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder:
    def __init__(self, record=None):
        self.lock = threading.Lock()
        self.calls = []  # dicts: path, headers, body, usage (normalised), status
        self.gets = []  # paths of GET requests, as they arrived
        self.record = record  # a file: one JSON line per call (standalone mode)
        # The account's defaults, which a request that leaves them unset is billed at, as the
        # providers do: OpenAI's tier per project (None: the key's own project) for
        # `service_tier` absent or `auto`; Anthropic's workspace inference geo for
        # `inference_geo` absent, and its Priority Tier capacity for `service_tier` `auto`.
        self.project_tiers = {}
        self.workspace_geo = "global"
        self.priority_capacity = False
        # A project that processes every call at this tier whatever the request asks (an
        # account the meter cannot see into; its response still says the tier it billed).
        self.forced_tier = None

    def add(self, call):
        with self.lock:
            self.calls.append(call)
            if self.record:
                line = {"path": call["path"], "status": call["status"], "usage": call["usage"],
                        "authorization": call["headers"].get("authorization", "")}
                self.record.write(json.dumps(line) + "\n")
                self.record.flush()

    def snapshot(self):
        with self.lock:
            return list(self.calls)


def decide_usage(raw, body, cap):
    """Known, varied counts within what the request allows: input at most a quarter of its bytes
    (a real tokenizer's ratio), a third of it cached, output up to the cap. With MAXOUT in the
    request, the worst case instead: one token per byte, none cached, output at the cap."""
    if "MAXOUT" in json.dumps(body):
        return len(raw), 0, cap
    prompt = max(1, len(raw) // 4)
    cached = prompt // 3
    output = min(cap if cap is not None else 25, 25 + len(raw) % 7)
    return prompt, cached, output


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    recorder: Recorder = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        with self.recorder.lock:
            self.recorder.gets.append(self.path)
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": "test-gpt", "object": "model"}]})
        else:
            self.reply(404, {"error": {"message": "no such path", "type": "not_found"}})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        call = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body, "usage": None, "status": 200}
        text = json.dumps(body)
        if "FAIL400" in text:
            call["status"] = 400
            self.recorder.add(call)
            return self.reply(400, {"error": {"message": "upstream says no", "type": "invalid_request_error"}})
        if "FAIL500" in text:
            call["status"] = 500
            self.recorder.add(call)
            return self.reply(500, {"error": {"message": "upstream broke", "type": "server_error"}})
        handler = {
            "/v1/chat/completions": self.on_chat,
            "/v1/responses": self.on_responses,
            "/v1/embeddings": self.on_embeddings,
            "/v1/messages": self.on_messages,
        }.get(self.path)
        if handler is None:
            call["status"] = 404
            self.recorder.add(call)
            return self.reply(404, {"error": {"message": "no such path", "type": "not_found"}})
        handler(raw, body, call, slow="SLOW" in text)

    # --- plumbing

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def events(self, events, slow, linger=False):
        """Sends SSE events split at awkward places (mid-line, mid-UTF-8) to exercise the meter's
        incremental parser the way a real network would. `linger`: the body's end is held back
        until the meter hangs up (at most 10 s), as a provider slow to close its stream."""
        payload = b"".join(events)
        cuts = [i for i in range(0, len(payload), 37)] + [len(payload)]
        try:
            for a, b in zip(cuts, cuts[1:]):
                self.chunk(payload[a:b])
                if slow:
                    time.sleep(0.05)
            if linger:
                self.connection.settimeout(10)
                try:
                    self.rfile.read(1)  # b"" once the meter has closed the connection
                except OSError:
                    pass
            self.end_stream()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the meter hung up because its client did

    # --- formats

    def openai_tier(self, body, call):
        """The tier OpenAI processes (and bills) the call at: the one asked for, or for `auto` or
        none the default tier of the project the `OpenAI-Project` header names."""
        asked = body.get("service_tier")
        tier = self.recorder.project_tiers.get(call["headers"].get("openai-project"), "default") if asked in (None, "auto") else asked
        tier = self.recorder.forced_tier or tier
        call["tier"] = tier
        return tier

    def on_chat(self, raw, body, call, slow):
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        prompt, cached, output = decide_usage(raw, body, cap)
        writes = openai_writes(body, prompt, cached)
        call["usage"] = {"input": prompt - cached - writes, "cached": cached, "write": writes, "output": output, "model": body["model"]}
        tier = self.openai_tier(body, call)
        usage = {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
                 "prompt_tokens_details": {"cached_tokens": cached, **({"cache_write_tokens": writes} if writes else {})}}
        self.recorder.add(call)
        if not body.get("stream"):
            return self.reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"], "service_tier": tier,
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "héllo ✓"}, "finish_reason": "stop"}],
                                    "usage": usage})
        self.start_stream()
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"], "service_tier": tier}
        include = (body.get("stream_options") or {}).get("include_usage")
        events = []
        for word in ["héllo", " wörld", " ✓✓✓", " usage"]:
            events.append(sse({**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}], **({"usage": None} if include else {})}))
        events.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **({"usage": None} if include else {})}))
        if include:  # as the real API: usage only when asked for
            events.append(sse({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        self.events(events, slow, linger="LINGER" in json.dumps(body))

    def on_responses(self, raw, body, call, slow):
        prompt, cached, output = decide_usage(raw, body, body.get("max_output_tokens"))
        writes = openai_writes(body, prompt, cached)
        # Split by TTL, as the Responses API reports them: all 12-hour when the request asks so.
        long = writes if ((body.get("prompt_cache_options") or {}).get("ttl")) == "12h" else 0
        call["usage"] = {"input": prompt - cached - writes, "cached": cached, "write": writes - long, "write1h": long,
                         "output": output, "model": body["model"]}
        tier = self.openai_tier(body, call)
        self.recorder.add(call)
        details = {"cached_tokens": cached, "cache_write_tokens": writes,
                   "cache_write_tokens_details": {"ttl_30m_tokens": writes - long, "ttl_12h_tokens": long}}
        usage = {"input_tokens": prompt, "input_tokens_details": details, "output_tokens": output,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}
        message = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": "héllo ✓", "annotations": []}]}
        response = {"id": f"resp_{len(self.recorder.snapshot())}", "object": "response", "created_at": 1, "model": body["model"], "status": "completed",
                    "service_tier": tier, "output": [message], "usage": usage, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        if not body.get("stream"):
            return self.reply(200, response)
        self.start_stream()
        pending = {**response, "status": "in_progress", "output": [], "usage": None}
        events = [
            sse({"type": "response.created", "sequence_number": 0, "response": pending}, "response.created"),
            sse({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "héllo ✓", "logprobs": []}, "response.output_text.delta"),
            sse({"type": "response.completed", "sequence_number": 2, "response": response}, "response.completed"),
        ]
        self.events(events, slow)

    def on_embeddings(self, raw, body, call, slow):
        prompt, _, _ = decide_usage(raw, body, 0)
        call["usage"] = {"input": prompt, "cached": 0, "output": 0, "model": body["model"]}
        self.recorder.add(call)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.reply(200, {"object": "list", "model": body["model"],
                         "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2]} for i in range(len(inputs))],
                         "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})

    def on_messages(self, raw, body, call, slow):
        prompt, cached, output = decide_usage(raw, body, body.get("max_tokens"))
        creation = prompt // 5
        if "CACHEWRITE" in json.dumps(body):  # an agent that writes its whole prompt to the cache
            prompt, cached, output = len(raw), 0, body.get("max_tokens")
            creation = prompt
        fresh = prompt - cached - creation
        # Half the writes are kept an hour when the request asks for it anywhere, as the API
        # splits them in usage.cache_creation.
        hour = creation // 2 if '"ttl": "1h"' in json.dumps(body) else 0
        # Normalised: fresh input, cache reads and cache writes of each TTL apart.
        call["usage"] = {"input": fresh, "cached": cached, "write": creation - hour, "write1h": hour, "output": output, "model": body["model"]}
        geo = body.get("inference_geo") or self.recorder.workspace_geo
        tier = "priority" if self.recorder.priority_capacity and body.get("service_tier", "auto") == "auto" else "standard"
        call["geo"], call["tier"] = geo, tier
        self.recorder.add(call)
        usage = {"input_tokens": fresh, "cache_creation_input_tokens": creation, "cache_read_input_tokens": cached, "output_tokens": output,
                 "cache_creation": {"ephemeral_5m_input_tokens": creation - hour, "ephemeral_1h_input_tokens": hour},
                 # As the API reports them: what the call was billed at (fast mode, US-only inference,
                 # Priority Tier).
                 "speed": body.get("speed") or "standard", "inference_geo": geo, "service_tier": tier}
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "text", "text": "héllo ✓"}], "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return self.reply(200, message)
        self.start_stream()
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events = [sse({"type": "message_start", "message": start}, "message_start"),
                  sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, "content_block_start"),
                  b"event: ping\ndata: {\"type\": \"ping\"}\n\n"]
        # output_tokens in message_delta is a running total: a meter that summed would overcount.
        for i, word in enumerate(["héllo", " ✓"]):
            events.append(sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}, "content_block_delta"))
            events.append(sse({"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
                               "usage": {"output_tokens": output // 2 if i == 0 else output}}, "message_delta"))
        events.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        events.append(sse({"type": "message_stop"}, "message_stop"))
        self.events(events, slow)


def openai_writes(body, prompt, cached):
    """OpenAI's cache writes (GPT-5.6 on, in its input count): all the prompt not read from the
    cache for an agent that writes its cache on every call (CACHEWRITE), none otherwise."""
    return prompt - cached if "CACHEWRITE" in json.dumps(body) else 0


def sse(obj, event=None):
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def start():
    recorder = Recorder()
    handler = type("BoundHandler", (Handler,), {"recorder": recorder})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, recorder


def main():
    """Standalone, as the provider of `make demo` and tests/in_cluster.rs on the real node: serves
    on --host (the node IP, which Pods reach) and a free port, prints the port on its first line,
    and appends each call as a JSON line to --record."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", required=True)
    args = parser.parse_args()
    recorder = Recorder(open(args.record, "a", encoding="utf-8"))
    handler = type("BoundHandler", (Handler,), {"recorder": recorder})
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
