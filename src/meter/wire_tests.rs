use serde_json::json;

use super::*;

fn parse(api: Api, body: Value) -> Result<(Value, RequestFacts), BadRequest> {
    parse_request(api, &serde_json::to_vec(&body).unwrap())
}

#[test]
fn routes_only_what_the_meter_can_bound() {
    let post = http::Method::POST;
    assert_eq!(route(&post, "/v1/chat/completions"), Some(Route::Metered(Api::ChatCompletions)));
    assert_eq!(route(&post, "/v1/responses"), Some(Route::Metered(Api::Responses)));
    assert_eq!(route(&post, "/v1/embeddings"), Some(Route::Metered(Api::Embeddings)));
    assert_eq!(route(&post, "/v1/messages"), Some(Route::Metered(Api::AnthropicMessages)));
    assert_eq!(route(&post, "/v1/messages/count_tokens"), Some(Route::Free(Provider::Anthropic)));
    assert_eq!(route(&http::Method::GET, "/v1/models"), Some(Route::Free(Provider::OpenAi)));
    for model in ["gpt-4.1-mini", "ft:gpt-4o-mini:acme::abc123", "meta-llama/Llama-3.1-8B"] {
        assert_eq!(route(&http::Method::GET, &format!("/v1/models/{model}")), Some(Route::Free(Provider::OpenAi)), "{model}");
    }
    for (method, path) in [
        (&post, "/v1/completions"),
        (&post, "/v1/images/generations"),
        (&post, "/v1/audio/speech"),
        (&post, "/v1/batches"),
        (&post, "/v1/messages/batches"),
        (&post, "/v1/chat/completions/"),
        (&post, "/v1//chat/completions"),
        (&http::Method::GET, "/v1/chat/completions"),
        (&http::Method::DELETE, "/v1/models/x"),
        (&http::Method::GET, "/v1/models/../files/file-1/content"),
        (&http::Method::GET, "/v1/models/x/../../batches"),
        (&http::Method::GET, "/v1/models/%2e%2e/files"),
        (&http::Method::GET, "/v1/models/./x"),
        (&http::Method::GET, "/v1/models//x"),
        (&http::Method::GET, "/v1/models/"),
    ] {
        assert_eq!(route(method, path), None, "{method} {path} is not forwarded unmetered");
    }
}

#[test]
fn facts_of_a_chat_request() {
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "n": 3, "stream": true});
    let bytes = serde_json::to_vec(&body).unwrap().len() as i64;
    let (_, facts) = parse(Api::ChatCompletions, body).unwrap();
    assert_eq!(
        facts,
        RequestFacts {
            model: "gpt-4o".into(),
            stream: true,
            input_bound: bytes + FIXED_INPUT_ALLOWANCE,
            output_cap: Some(50),
            choices: 3,
            previous_response: None,
            // Any of its input may be written to OpenAI's cache (GPT-5.6 on), billed above input.
            cache_writes: CacheWrites::FiveMinutes,
            // No `service_tier`: the project's default tier, pinned to the list price's.
            pin_default_tier: true,
        }
    );
    // Both caps set: the larger one binds the reservation.
    let (_, facts) = parse(Api::ChatCompletions, json!({"model": "m", "max_tokens": 5, "max_completion_tokens": 900})).unwrap();
    assert_eq!(facts.output_cap, Some(900));
    let (_, facts) = parse(Api::Responses, json!({"model": "m", "max_output_tokens": 7, "n": 50})).unwrap();
    assert_eq!((facts.output_cap, facts.choices), (Some(7), 1), "n means nothing to the Responses API");
    let (_, facts) = parse(Api::Responses, json!({"model": "m", "previous_response_id": "resp_1"})).unwrap();
    assert_eq!(facts.previous_response.as_deref(), Some("resp_1"));
    assert!(matches!(parse(Api::Responses, json!({"model": "m", "previous_response_id": 5})), Err(BadRequest::Invalid(_))));
}

#[test]
fn images_add_their_allowance_wherever_they_nest() {
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "high"}},
    ]}]});
    let anthropic = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}},
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]},
    ]}]});
    for (api, body, images) in [(Api::ChatCompletions, chat, 1), (Api::AnthropicMessages, anthropic, 2)] {
        let bytes = serde_json::to_vec(&body).unwrap().len() as i64;
        let (_, facts) = parse(api, body).unwrap();
        assert_eq!(facts.input_bound, bytes + FIXED_INPUT_ALLOWANCE + images * IMAGE_ALLOWANCE);
    }
    // An escaped key is still counted: the walk reads the parsed value, not the raw bytes.
    let escaped = br#"{"model":"m","input":[{"t\u0079pe":"input_image","image_url":"u"}]}"#;
    let (_, facts) = parse_request(Api::Responses, escaped).unwrap();
    assert_eq!(facts.input_bound, escaped.len() as i64 + FIXED_INPUT_ALLOWANCE + IMAGE_ALLOWANCE);
}

#[test]
fn refuses_what_it_cannot_bound_or_read() {
    for (api, body) in [
        (Api::Responses, json!({"model": "m", "conversation": "conv_1"})),
        (Api::Responses, json!({"model": "m", "prompt": {"id": "pmpt_1"}})),
        (Api::Responses, json!({"model": "m", "background": true})),
        (Api::Responses, json!({"model": "m", "tools": [{"type": "web_search"}]})),
        (Api::Responses, json!({"model": "m", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]})),
        (Api::Responses, json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]})),
        (Api::ChatCompletions, json!({"model": "m", "web_search_options": {}})),
        (Api::ChatCompletions, json!({"model": "m", "prediction": {"type": "content", "content": "x"}})),
        (Api::Responses, json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]})),
        (
            Api::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]}),
        ),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "tools": [{"type": "web_search_20250305", "name": "web_search"}]})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "mcp_servers": [{"url": "u"}]})),
        (
            Api::AnthropicMessages,
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}),
        ),
    ] {
        assert!(matches!(parse(api, body.clone()), Err(BadRequest::Unbounded(_))), "{body}");
    }
    // Client-side tools and a stored-but-unused flag are fine.
    assert!(parse(Api::Responses, json!({"model": "m", "background": false, "tools": [{"type": "function", "name": "f"}]})).is_ok());
    assert!(parse(Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "tools": [{"name": "f", "input_schema": {}}]})).is_ok());
    assert_eq!(parse_request(Api::ChatCompletions, b"not json"), Err(BadRequest::NotJson));
    assert_eq!(parse_request(Api::ChatCompletions, b"[1,2]"), Err(BadRequest::NotJson));
    assert_eq!(parse_request(Api::ChatCompletions, b""), Err(BadRequest::NotJson));
    assert_eq!(parse(Api::ChatCompletions, json!({"model": ""})).unwrap_err(), BadRequest::NoModel);
    assert_eq!(parse(Api::ChatCompletions, json!({"model": 5})).unwrap_err(), BadRequest::NoModel);
    for bad in [json!(-1), json!(1.5), json!("100"), json!(1e30)] {
        assert!(matches!(parse(Api::ChatCompletions, json!({"model": "m", "max_tokens": bad})), Err(BadRequest::Invalid(_))));
    }
    for bad in [json!(0), json!(129), json!("2")] {
        assert!(matches!(parse(Api::ChatCompletions, json!({"model": "m", "n": bad})), Err(BadRequest::Invalid(_))));
    }
}

#[test]
fn rewriting_forces_usage_into_chat_streams_and_sets_the_cap() {
    for options in [json!(null), json!({"include_usage": false}), json!("junk")] {
        let (request, facts) = parse(Api::ChatCompletions, json!({"model": "m", "stream": true, "stream_options": options})).unwrap();
        assert!(needs_rewrite(Api::ChatCompletions, &facts, None));
        let out = rewrite(Api::ChatCompletions, request, &facts, Some(77));
        assert_eq!(out["stream_options"]["include_usage"], json!(true), "{options}");
        assert_eq!(out["max_completion_tokens"], json!(77));
    }
    let (request, facts) = parse(Api::Responses, json!({"model": "m", "stream": true})).unwrap();
    assert_eq!(rewrite(Api::Responses, request, &facts, Some(5))["max_output_tokens"], json!(5));
    let (_, facts) = parse(Api::Responses, json!({"model": "m", "service_tier": "default"})).unwrap();
    assert!(!needs_rewrite(Api::Responses, &facts, None), "an untouched request is forwarded byte for byte");
    let (request, facts) = parse(Api::Embeddings, json!({"model": "m", "input": "x"})).unwrap();
    assert!(rewrite(Api::Embeddings, request, &facts, Some(5)).get("max_tokens").is_none());
}

#[test]
fn usage_of_each_format_excludes_cached_from_input() {
    let chat = json!({"prompt_tokens": 1000, "completion_tokens": 50, "prompt_tokens_details": {"cached_tokens": 800}});
    assert_eq!(
        usage_of(Api::ChatCompletions, &chat),
        Some(TokenCounts { input: 200, cached_input: 800, output: 50, ..Default::default() })
    );
    let responses = json!({"input_tokens": 300, "input_tokens_details": {"cached_tokens": 100}, "output_tokens": 9, "total_tokens": 309});
    assert_eq!(usage_of(Api::Responses, &responses), Some(TokenCounts { input: 200, cached_input: 100, output: 9, ..Default::default() }));
    let embeddings = json!({"prompt_tokens": 12, "total_tokens": 12});
    assert_eq!(usage_of(Api::Embeddings, &embeddings), Some(TokenCounts { input: 12, cached_input: 0, output: 0, ..Default::default() }));
    let anthropic = json!({"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 30, "output_tokens": 40});
    let writes = TokenCounts { input: 10, cached_input: 30, output: 40, cache_write: 20, cache_write_1h: 0 };
    assert_eq!(usage_of(Api::AnthropicMessages, &anthropic), Some(writes), "no TTL split (older API versions): 5-minute writes");
    // OpenAI's cache writes (GPT-5.6 on) are in its input count, and priced apart.
    let chat =
        json!({"prompt_tokens": 1000, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 600}});
    let want = TokenCounts { input: 300, cached_input: 100, output: 5, cache_write: 600, cache_write_1h: 0 };
    assert_eq!(usage_of(Api::ChatCompletions, &chat), Some(want), "no TTL split: 30-minute writes");
    let details = json!({"cached_tokens": 0, "cache_write_tokens": 700, "cache_write_tokens_details": {"ttl_30m_tokens": 200, "ttl_12h_tokens": 500}});
    let responses = json!({"input_tokens": 1000, "input_tokens_details": details, "output_tokens": 5});
    let want = TokenCounts { input: 300, cached_input: 0, output: 5, cache_write: 200, cache_write_1h: 500 };
    assert_eq!(usage_of(Api::Responses, &responses), Some(want));
    // Garbage never panics nor goes negative.
    assert_eq!(usage_of(Api::ChatCompletions, &json!(null)), None);
    let lying = json!({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9}, "completion_tokens": -4});
    assert_eq!(usage_of(Api::ChatCompletions, &lying), Some(TokenCounts { input: 0, cached_input: 9, output: 0, ..Default::default() }));
}

fn stream(api: Api, events: &[Value]) -> StreamUsage {
    let mut usage = StreamUsage::default();
    for e in events {
        usage.on_event(api, &serde_json::to_vec(e).unwrap());
    }
    usage
}

#[test]
fn chat_stream_usage_comes_in_the_last_chunk() {
    let u = stream(
        Api::ChatCompletions,
        &[
            json!({"choices": [{"delta": {"content": "usage"}}], "usage": null}),
            json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}),
        ],
    );
    assert!(u.done);
    assert_eq!(u.usage, Some(TokenCounts { input: 7, cached_input: 0, output: 3, ..Default::default() }));
    let mut u = StreamUsage::default();
    u.on_event(Api::ChatCompletions, b"[DONE]");
    u.on_event(Api::ChatCompletions, b"{\"usage\": {not json");
    assert!(!u.done && u.usage.is_none());
}

#[test]
fn responses_stream_usage_comes_with_the_terminal_event() {
    for terminal in ["response.completed", "response.incomplete", "response.failed"] {
        let u = stream(
            Api::Responses,
            &[
                json!({"type": "response.created", "response": {"usage": null}}),
                json!({"type": "response.output_text.delta", "delta": "response.completed"}),
                json!({"type": terminal, "response": {"id": "resp_9", "usage": {"input_tokens": 11, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 1}}}}),
            ],
        );
        assert!(u.done, "{terminal}");
        assert_eq!(u.response_id.as_deref(), Some("resp_9"));
        assert_eq!(u.usage, Some(TokenCounts { input: 10, cached_input: 1, output: 4, ..Default::default() }));
    }
    let u = stream(Api::Responses, &[json!({"type": "response.created", "response": {}})]);
    assert!(!u.done);
}

#[test]
fn anthropic_output_tokens_are_a_running_total_never_summed() {
    let start = json!({"type": "message_start", "message": {"usage": {"input_tokens": 25, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5, "output_tokens": 1}}});
    let delta = |n: i64| json!({"type": "message_delta", "delta": {"stop_reason": null}, "usage": {"output_tokens": n}});
    let u = stream(Api::AnthropicMessages, &[start.clone(), delta(10), delta(42), json!({"type": "message_stop"})]);
    assert!(u.done);
    assert_eq!(u.usage, Some(TokenCounts { input: 25, cached_input: 100, output: 42, cache_write: 5, cache_write_1h: 0 }));
    // Without message_stop the stream did not finish: usage is not final.
    let u = stream(Api::AnthropicMessages, &[start.clone(), delta(10)]);
    assert!(!u.done);
    // A message_delta before any message_start is ignored, not taken as the whole usage.
    let u = stream(Api::AnthropicMessages, &[delta(10), json!({"type": "message_stop"})]);
    assert!(!u.done && u.usage.is_none());
    // Newer API versions repeat input counts in message_delta, as totals too.
    let full = json!({"type": "message_delta", "usage": {"input_tokens": 25, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5, "output_tokens": 50}});
    let u = stream(Api::AnthropicMessages, &[start, full, json!({"type": "message_stop"})]);
    assert_eq!(u.usage, Some(TokenCounts { input: 25, cached_input: 100, output: 50, cache_write: 5, cache_write_1h: 0 }));
}

/// Cache writes are counted apart from input, split by TTL, streamed or not: the bug was that
/// they were folded into input and priced as such (tests/meter/test_meter.py
/// test_cache_writes_are_recorded_at_their_price).
#[test]
fn anthropic_cache_writes_are_counted_by_ttl() {
    let split = json!({"input_tokens": 7, "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 0, "output_tokens": 9,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000}});
    let want = TokenCounts { input: 7, cached_input: 0, output: 9, cache_write: 1000, cache_write_1h: 2000 };
    assert_eq!(usage_of(Api::AnthropicMessages, &split), Some(want));
    // The split and the sum disagree: each TTL keeps the larger figure, never less.
    let short = json!({"input_tokens": 1, "cache_creation_input_tokens": 50, "cache_creation": {"ephemeral_1h_input_tokens": 20}});
    assert_eq!(usage_of(Api::AnthropicMessages, &short).map(|u| (u.cache_write, u.cache_write_1h)), Some((30, 20)));
    let over =
        json!({"cache_creation_input_tokens": 10, "cache_creation": {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 5}});
    assert_eq!(usage_of(Api::AnthropicMessages, &over).map(|u| (u.cache_write, u.cache_write_1h)), Some((40, 5)));
    let hostile = json!({"cache_creation_input_tokens": -5, "cache_creation": {"ephemeral_1h_input_tokens": "x"}});
    assert_eq!(usage_of(Api::AnthropicMessages, &hostile).map(|u| (u.cache_write, u.cache_write_1h)), Some((0, 0)));

    // Streamed: message_start carries the writes, message_delta keeps them (output only) or
    // repeats them as totals.
    let start = json!({"type": "message_start", "message": {"usage": split}});
    let delta = json!({"type": "message_delta", "usage": {"output_tokens": 30}});
    let u = stream(Api::AnthropicMessages, &[start.clone(), delta, json!({"type": "message_stop"})]);
    assert_eq!(u.usage, Some(TokenCounts { output: 30, ..want }));
    let totals = json!({"type": "message_delta", "usage": {"output_tokens": 31, "input_tokens": 7, "cache_creation_input_tokens": 3500,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2500}}});
    let u = stream(Api::AnthropicMessages, &[start.clone(), totals, json!({"type": "message_stop"})]);
    assert_eq!(u.usage, Some(TokenCounts { output: 31, cache_write_1h: 2500, ..want }));
    // The sum repeated without its split: the 1-hour writes message_start reported stay 1-hour.
    let sum = json!({"type": "message_delta", "usage": {"output_tokens": 32, "cache_creation_input_tokens": 3000}});
    let u = stream(Api::AnthropicMessages, &[start, sum, json!({"type": "message_stop"})]);
    assert_eq!(u.usage, Some(TokenCounts { output: 32, ..want }));
}

/// Which writes a request can cause, and so the rate its input is reserved at.
#[test]
fn anthropic_requests_reserve_for_the_dearest_cache_write_they_ask_for() {
    let writes = |api: Api, body: Value| parse(api, body).unwrap().1.cache_writes;
    let msg = |control: Value| json!([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": control}]}]);
    assert_eq!(writes(Api::ChatCompletions, json!({"model": "m"})), CacheWrites::FiveMinutes, "OpenAI bills writes since GPT-5.6");
    assert_eq!(writes(Api::Embeddings, json!({"model": "m"})), CacheWrites::None, "embeddings write no cache");
    let long = json!({"model": "m", "prompt_cache_options": {"ttl": "12h"}});
    assert_eq!(writes(Api::Responses, long.clone()), CacheWrites::OneHour, "OpenAI's 12-hour writes at the long price");
    // Chat Completions does not split its writes by TTL: a 12-hour one cannot be counted at its price.
    assert!(matches!(parse(Api::ChatCompletions, long), Err(BadRequest::Unbounded(_))));
    assert!(matches!(parse(Api::Responses, json!({"model": "m", "prompt_cache_options": {"ttl": "7d"}})), Err(BadRequest::Unbounded(_))));
    assert_eq!(writes(Api::Responses, json!({"model": "m", "prompt_cache_options": {"ttl": "30m"}})), CacheWrites::FiveMinutes);
    assert_eq!(writes(Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1})), CacheWrites::FiveMinutes);
    let five = msg(json!({"type": "ephemeral", "ttl": "5m"}));
    assert_eq!(writes(Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "messages": five})), CacheWrites::FiveMinutes);
    let hour = msg(json!({"type": "ephemeral", "ttl": "1h"}));
    assert_eq!(writes(Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "messages": hour})), CacheWrites::OneHour);
    let top = json!({"model": "m", "max_tokens": 1, "cache_control": {"type": "ephemeral", "ttl": "1h"}});
    assert_eq!(writes(Api::AnthropicMessages, top), CacheWrites::OneHour, "automatic caching, at the top level");
}

#[test]
fn error_bodies_have_each_providers_shape() {
    assert_eq!(
        error_body(Provider::OpenAi, "budget_exceeded", "m"),
        json!({"error": {"message": "m", "type": "budget_exceeded", "code": "budget_exceeded", "param": null}})
    );
    assert_eq!(
        error_body(Provider::Anthropic, "budget_exceeded", "m"),
        json!({"type": "error", "error": {"type": "budget_exceeded", "message": "m"}})
    );
}

#[test]
fn never_panics_on_hostile_requests_or_events() {
    // Mutations of valid bodies and events: truncations, type swaps, huge and negative numbers,
    // deep nesting. Whatever comes in, the answer is a value or an error, never a panic.
    let seeds = [
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}], "n": 2, "max_tokens": 5, "stream": true, "stream_options": {"include_usage": false}}),
        json!({"model": "m", "input": [{"type": "input_image"}], "tools": [{"type": "function"}], "max_output_tokens": 9}),
        json!({"type": "message_start", "message": {"usage": {"input_tokens": 1, "cache_read_input_tokens": 2}}}),
        json!({"type": "response.completed", "response": {"usage": {"input_tokens": 1}}}),
        json!({"type": "message_delta", "usage": {"output_tokens": 3, "input_tokens": 5}}),
        json!({"choices": [], "usage": {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 1}}}),
    ];
    let replacements: [&[u8]; 8] = [b"null", b"-9223372036854775808", b"18446744073709551616", b"\"x\"", b"[]", b"{}", b"true", b"1e400"];
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let mut seed = 17u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    for base in &seeds {
        let text = serde_json::to_vec(base).unwrap();
        for _ in 0..300 {
            let mut bytes = text.clone();
            match next() % 4 {
                0 => bytes.truncate(next() % (text.len() + 1)),
                1 => {
                    // Replace one scalar value (after a ':') with something of another type.
                    let colons: Vec<usize> = bytes.iter().enumerate().filter(|(_, b)| **b == b':').map(|(i, _)| i).collect();
                    let at = colons[next() % colons.len()] + 1;
                    let end = bytes[at..].iter().position(|b| matches!(b, b',' | b'}' | b']')).map_or(bytes.len(), |e| at + e);
                    bytes.splice(at..end, replacements[next() % replacements.len()].iter().copied());
                }
                2 => {
                    let at = next() % bytes.len();
                    bytes[at] = (next() % 256) as u8;
                }
                _ => bytes = format!("{{\"model\":\"m\",\"x\":{deep}}}").into_bytes(),
            }
            for api in [Api::ChatCompletions, Api::Responses, Api::Embeddings, Api::AnthropicMessages] {
                if let Ok((value, facts)) = parse_request(api, &bytes) {
                    assert!(facts.input_bound >= bytes.len() as i64);
                    assert!(facts.output_cap.is_none_or(|c| c >= 0) && facts.choices >= 1);
                    let _ = rewrite(api, value, &facts, Some(1));
                }
                let mut usage = StreamUsage::default();
                usage.on_event(api, &bytes);
                if let Some(u) = usage.usage {
                    assert!(u.input >= 0 && u.cached_input >= 0 && u.output >= 0 && u.cache_write >= 0 && u.cache_write_1h >= 0);
                }
            }
        }
    }
}

/// tests/meter/test_meter.py test_calls_the_provider_bills_above_the_price_table_are_refused.
#[test]
fn refuses_what_the_provider_bills_above_the_list_price() {
    // A TTL with no price (a future one) is refused; 5m and 1h are priced (and 1h no longer refused).
    let day = json!([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "24h"}}]}]);
    let hour = json!([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]);
    for (api, body) in [
        (Api::ChatCompletions, json!({"model": "m", "service_tier": "priority"})),
        (Api::ChatCompletions, json!({"model": "m", "service_tier": "scale"})),
        (Api::ChatCompletions, json!({"model": "m", "service_tier": 1})),
        (Api::Responses, json!({"model": "m", "service_tier": "priority"})),
        (Api::Embeddings, json!({"model": "m", "service_tier": "Priority"})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "service_tier": "priority"})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "messages": day})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "cache_control": {"type": "ephemeral", "ttl": 3600}})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "speed": "fast"})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "speed": "FAST"})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "speed": true})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "inference_geo": "us"})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "inference_geo": "eu"})),
    ] {
        assert!(matches!(parse(api, body.clone()), Err(BadRequest::Unbounded(_))), "{body}");
    }
    let five = json!([{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}]);
    for (api, body) in [
        (Api::ChatCompletions, json!({"model": "m", "service_tier": "flex"})),
        (Api::ChatCompletions, json!({"model": "m", "service_tier": "auto"})),
        (Api::Responses, json!({"model": "m", "service_tier": "default"})),
        (Api::Responses, json!({"model": "m", "service_tier": null})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "service_tier": "standard_only", "messages": five})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "cache_control": {"type": "ephemeral"}})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "messages": hour})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "cache_control": {"type": "ephemeral", "ttl": "1h"}})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "speed": "standard", "inference_geo": "global"})),
        (Api::AnthropicMessages, json!({"model": "m", "max_tokens": 1, "speed": null, "inference_geo": null})),
    ] {
        assert!(parse(api, body.clone()).is_ok(), "{body}");
    }
    let headers = |values: &[&str]| {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append("anthropic-beta", http::HeaderValue::from_str(v).unwrap());
        }
        h
    };
    for refused in [&["context-1m-2025-08-07"][..], &["files-api-2025-04-14, Context-1M-2025-08-07"], &["a", "context-1m-x"]] {
        assert!(matches!(beta_billed_above_list_price(&headers(refused)), Some(BadRequest::Unbounded(_))), "{refused:?}");
    }
    for fine in [&[][..], &["files-api-2025-04-14"], &["interleaved-thinking-2025-05-14, token-efficient-tools-2025-02-19"]] {
        assert_eq!(beta_billed_above_list_price(&headers(fine)), None, "{fine:?}");
    }
}

/// tests/meter/test_meter.py test_an_openai_project_defaulting_to_priority_cannot_bill_past_the_budget.
#[test]
fn openai_calls_that_leave_their_tier_to_the_project_are_pinned_to_the_list_price() {
    for api in [Api::ChatCompletions, Api::Responses] {
        for tier in [None, Some(json!(null)), Some(json!("auto"))] {
            let mut body = json!({"model": "m", "max_tokens": 5, "max_output_tokens": 5});
            if let Some(t) = &tier {
                body["service_tier"] = t.clone();
            }
            let (request, facts) = parse(api, body).unwrap();
            assert!(needs_rewrite(api, &facts, None), "{api:?} {tier:?}");
            assert_eq!(rewrite(api, request, &facts, None)["service_tier"], json!("default"), "{api:?} {tier:?}");
        }
        // Asked for at or below the list price: kept as asked, the request untouched.
        for tier in ["default", "flex"] {
            let (request, facts) =
                parse(api, json!({"model": "m", "max_tokens": 5, "max_output_tokens": 5, "service_tier": tier})).unwrap();
            assert!(!needs_rewrite(api, &facts, None), "{api:?} {tier}");
            assert_eq!(rewrite(api, request, &facts, Some(9))["service_tier"], json!(tier));
        }
    }
    // Embeddings take no tier; Anthropic's `auto` is no project default (see the response check).
    let (request, facts) = parse(Api::Embeddings, json!({"model": "m", "input": "x"})).unwrap();
    assert!(!facts.pin_default_tier && rewrite(Api::Embeddings, request, &facts, None).get("service_tier").is_none());
    let (request, facts) = parse(Api::AnthropicMessages, json!({"model": "m", "max_tokens": 5, "service_tier": "auto"})).unwrap();
    assert!(!facts.pin_default_tier);
    assert_eq!(rewrite(Api::AnthropicMessages, request, &facts, None)["service_tier"], json!("auto"));
}

/// tests/meter/test_meter.py test_a_call_billed_above_the_list_price_is_charged_at_that_price.
#[test]
fn streams_report_what_they_were_billed_at_above_the_list_price() {
    // In streams: where each format reports it.
    let chat = stream(
        Api::ChatCompletions,
        &[json!({"service_tier": "priority", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})],
    );
    assert!(chat.above_list_price.is_some_and(|a| a.billed_at.contains("priority") && a.multiplier.0 == 2_000));
    let responses = stream(
        Api::Responses,
        &[json!({"type": "response.completed", "response": {"service_tier": "priority", "usage": {"input_tokens": 1}}})],
    );
    assert!(responses.above_list_price.is_some_and(|a| a.billed_at.contains("priority") && a.multiplier.0 == 2_000));
    let start = |usage: Value| json!({"type": "message_start", "message": {"usage": usage}});
    let claude =
        stream(Api::AnthropicMessages, &[start(json!({"input_tokens": 1, "inference_geo": "us"})), json!({"type": "message_stop"})]);
    assert!(claude.above_list_price.is_some_and(|a| a.billed_at.contains("inference_geo") && a.multiplier.0 == 1_100));
    let claude =
        stream(Api::AnthropicMessages, &[start(json!({"input_tokens": 1, "service_tier": "standard", "inference_geo": "global"}))]);
    assert_eq!(claude.above_list_price, None);
}
