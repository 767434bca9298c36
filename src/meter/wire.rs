//! The providers' wire formats: which calls are metered, what a request may cost at most, how
//! the meter rewrites it (usage in streams, an output cap), and where each response reports its
//! usage, normalised to the project's shape (`input` excludes cached tokens and cache writes).

use serde_json::Value;

use super::surcharge::{self, Surcharge};
use crate::domain::pricing::{CacheWrites, TokenCounts};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Anthropic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    ChatCompletions,
    Responses,
    Embeddings,
    AnthropicMessages,
}

impl Api {
    pub fn provider(self) -> Provider {
        match self {
            Api::AnthropicMessages => Provider::Anthropic,
            _ => Provider::OpenAi,
        }
    }

    /// The request field that caps output tokens, if the API has one. Chat Completions has two:
    /// `max_tokens` (deprecated, refused by reasoning models) and `max_completion_tokens`; the
    /// meter injects the latter, which every current chat model accepts.
    fn cap_fields(self) -> &'static [&'static str] {
        match self {
            Api::ChatCompletions => &["max_completion_tokens", "max_tokens"],
            Api::Responses => &["max_output_tokens"],
            Api::AnthropicMessages => &["max_tokens"],
            Api::Embeddings => &[],
        }
    }
}

/// How a request path is served. SDK conventions: `OPENAI_BASE_URL` ends in `/v1` and the SDK
/// appends `/chat/completions`; `ANTHROPIC_BASE_URL` is the origin and the SDK appends
/// `/v1/messages`. The paths are disjoint, so one listener serves both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Metered(Api),
    /// Calls that cost nothing (model lists, token counting): forwarded with the real key.
    Free(Provider),
}

/// Anything else is refused rather than forwarded: an unmetered path that costs money (images,
/// audio, legacy completions, batches) would be a way around the budget.
pub fn route(method: &http::Method, path: &str) -> Option<Route> {
    match (method.as_str(), path) {
        ("POST", "/v1/chat/completions") => Some(Route::Metered(Api::ChatCompletions)),
        ("POST", "/v1/responses") => Some(Route::Metered(Api::Responses)),
        ("POST", "/v1/embeddings") => Some(Route::Metered(Api::Embeddings)),
        ("POST", "/v1/messages") => Some(Route::Metered(Api::AnthropicMessages)),
        ("POST", "/v1/messages/count_tokens") => Some(Route::Free(Provider::Anthropic)),
        ("GET", p) if p == "/v1/models" || p.strip_prefix("/v1/models/").is_some_and(is_model_path) => Some(Route::Free(Provider::OpenAi)),
        _ => None,
    }
}

/// A model id as a path: segments of letters, digits and `._:-` (fine-tunes are `ft:…`; some
/// gateways name models `org/name`), none empty, `.` or `..`. The path goes upstream with the
/// real key: a dot segment or an escape (`%2e%2e`) that a proxy or CDN in front of the provider
/// resolves would climb out of /v1/models to the team's files or batches, unmetered
/// (tests/meter/test_meter.py test_the_models_path_climbs_to_no_other_upstream_path).
fn is_model_path(path: &str) -> bool {
    path.split('/')
        .all(|segment| !matches!(segment, "" | "." | "..") && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)))
}

/// Tokens a request may consume, bounded from its body alone.
///
/// Input bound: one token per request-body byte, plus allowances. Every tokenizer in use (BPE
/// over bytes) emits at most one token per byte of text, and the JSON around the text (quotes,
/// keys, escapes) only adds bytes. What the body does not carry is allowed for explicitly: the
/// chat template and the tool-use system prompt the provider adds (Anthropic's is ~350 tokens)
/// fit in `FIXED_INPUT_ALLOWANCE`; an image costs a bounded number of tokens whatever its bytes
/// (a URL is short, a tiny image at high detail is 255+ tokens), hence `IMAGE_ALLOWANCE` each.
/// Inputs the body cannot bound at all (files, stored prompts, earlier responses, hosted tools)
/// are refused by `unbounded_input`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: String,
    pub stream: bool,
    pub input_bound: i64,
    /// The client's own cap, if it set one (the largest if it set several).
    pub output_cap: Option<i64>,
    /// Completions generated per call (`n` in Chat Completions): the cap applies to each.
    pub choices: i64,
    /// Responses API: the stored response this one continues. Its context is input the body
    /// does not hold; the meter adds it to `input_bound` when it saw that response (see
    /// `proxy::Contexts`) and refuses the call otherwise.
    pub previous_response: Option<String>,
    /// The dearest prompt-cache write the call can be billed for, at which its input is
    /// reserved: none for OpenAI (its caching bills no write), a 5-minute one for any Anthropic
    /// call, a 1-hour one when it asks for `ttl: 1h` anywhere.
    pub cache_writes: CacheWrites,
    /// OpenAI: the request leaves its tier to the project (`service_tier` absent or `auto`), whose
    /// default may be priority, billed above the list price; the meter pins `default` instead.
    pub pin_default_tier: bool,
}

pub const FIXED_INPUT_ALLOWANCE: i64 = 1_024;
/// Above the largest per-image cost published (OpenAI's patch-based models: 1,536 patches ×
/// 1.62 ≈ 2,500 tokens; Anthropic: ~1,600 at 1.15 megapixels), with headroom.
pub const IMAGE_ALLOWANCE: i64 = 5_000;
/// `n` beyond this is refused: 128 is OpenAI's own limit.
const MAX_CHOICES: i64 = 128;

#[derive(Debug, PartialEq, Eq)]
pub enum BadRequest {
    NotJson,
    NoModel,
    Invalid(String),
    Unbounded(String),
}

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadRequest::NotJson => f.write_str("the request body is not a JSON object"),
            BadRequest::NoModel => f.write_str("the request names no model"),
            BadRequest::Invalid(why) => f.write_str(why),
            BadRequest::Unbounded(what) => {
                write!(f, "the agentgate meter cannot bound the cost of {what} before the call, so it refuses it to keep the budget")
            }
        }
    }
}

pub fn parse_request(api: Api, body: &[u8]) -> Result<(Value, RequestFacts), BadRequest> {
    let value: Value = serde_json::from_slice(body).map_err(|_| BadRequest::NotJson)?;
    let Value::Object(map) = &value else { return Err(BadRequest::NotJson) };
    let model = match map.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(BadRequest::NoModel),
    };
    let stream = matches!(map.get("stream"), Some(Value::Bool(true)));
    let mut output_cap = None;
    for field in api.cap_fields() {
        match map.get(*field) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let cap =
                    v.as_i64().filter(|c| *c >= 0).ok_or_else(|| BadRequest::Invalid(format!("{field} must be a non-negative integer")))?;
                output_cap = Some(output_cap.map_or(cap, |c: i64| c.max(cap)));
            }
        }
    }
    let choices = match (api, map.get("n")) {
        (Api::ChatCompletions, Some(v)) if !v.is_null() => v
            .as_i64()
            .filter(|n| (1..=MAX_CHOICES).contains(n))
            .ok_or_else(|| BadRequest::Invalid(format!("n must be an integer from 1 to {MAX_CHOICES}")))?,
        _ => 1,
    };
    if let Some(what) = unbounded_input(api, &value).or_else(|| billed_above_list_price(api, &value)) {
        return Err(BadRequest::Unbounded(what));
    }
    let previous_response = match (api, map.get("previous_response_id")) {
        (Api::Responses, Some(Value::String(id))) => Some(id.clone()),
        (_, None | Some(Value::Null)) => None,
        _ => return Err(BadRequest::Invalid("previous_response_id must be a string".into())),
    };
    let images = count_images(&value);
    let input_bound = (body.len() as i64).saturating_add(FIXED_INPUT_ALLOWANCE).saturating_add(images.saturating_mul(IMAGE_ALLOWANCE));
    let cache_writes = match api {
        Api::AnthropicMessages if cache_ttls(&value).iter().any(|t| t == "\"1h\"") => CacheWrites::OneHour,
        Api::AnthropicMessages => CacheWrites::FiveMinutes,
        // OpenAI's explicit caching (GPT-5.6 on) bills writes, kept 30 minutes or, asked for, 12
        // hours: the table's 5-minute and 1-hour write prices are its short and long ones.
        Api::Responses if openai_cache_ttl(&value) == Some("12h") => CacheWrites::OneHour,
        Api::ChatCompletions | Api::Responses => CacheWrites::FiveMinutes,
        Api::Embeddings => CacheWrites::None,
    };
    // Embeddings take no `service_tier`: they are billed at the one price.
    let leaves_tier_to_project = match map.get("service_tier") {
        None | Some(Value::Null) => true,
        Some(tier) => tier.as_str() == Some("auto"),
    };
    let pin_default_tier = matches!(api, Api::ChatCompletions | Api::Responses) && leaves_tier_to_project;
    Ok((value, RequestFacts { model, stream, input_bound, output_cap, choices, previous_response, cache_writes, pin_default_tier }))
}

/// Features whose input tokens are not in the request body, so no reservation could bound them.
fn unbounded_input(api: Api, request: &Value) -> Option<String> {
    let present = |field: &str| request.get(field).is_some_and(|v| !v.is_null() && *v != Value::Bool(false));
    // `prediction`: rejected predicted tokens are billed as output beyond what the cap shows.
    for field in ["conversation", "prompt", "background", "mcp_servers", "web_search_options", "container", "prediction"] {
        // Chat Completions' legacy `prompt` does not exist; only the Responses API stores prompts.
        if present(field) && !(field == "prompt" && api != Api::Responses) {
            return Some(format!("a request with `{field}`"));
        }
    }
    if let Some(Value::Array(tools)) = request.get("tools") {
        for tool in tools {
            match tool.get("type").and_then(Value::as_str) {
                // Client-side tools: their definitions are in the body, their results come back
                // in a later, metered call.
                None | Some("function" | "custom") => {}
                Some(other) => return Some(format!("the hosted tool `{other}` (its results add input the request does not hold)")),
            }
        }
    }
    if let Some(kind) = find_type(request, &["file", "input_file", "document", "item_reference"]) {
        return Some(format!("a `{kind}` input (stored items and files are not bounded by the request's bytes)"));
    }
    None
}

/// Options the provider bills above the model's list price, which is all the price table knows:
/// the meter would count them (and reserve for them) at that price, and an agent could spend up
/// to twice what it is charged (tests/meter/test_meter.py
/// test_calls_the_provider_bills_above_the_price_table_are_refused). OpenAI's `priority` and
/// `scale` processing; Anthropic cache writes with a TTL other than the two it prices (5m, 1h),
/// its fast mode (`speed: fast`, 6 times the price on Opus 4.6) and US-only inference
/// (`inference_geo: us`, 1.1 times): an agent spent 6 times its budget in fast calls
/// (test_anthropic_fast_mode_and_us_only_inference_cannot_spend_past_the_budget).
fn billed_above_list_price(api: Api, request: &Value) -> Option<String> {
    let tiers: &[&str] = match api {
        Api::AnthropicMessages => &["auto", "standard_only"],
        _ => &["auto", "default", "flex"],
    };
    match request.get("service_tier") {
        None | Some(Value::Null) => {}
        Some(Value::String(tier)) if tiers.contains(&tier.as_str()) => {}
        Some(other) => {
            let shown: String = other.to_string().chars().take(64).collect();
            return Some(format!(
                "`service_tier: {shown}` (billed above the model's list price, or unknown; allowed: {})",
                tiers.join(", ")
            ));
        }
    }
    if api == Api::AnthropicMessages
        && let Some(ttl) = cache_ttls(request).into_iter().find(|t| t != "\"5m\"" && t != "\"1h\"")
    {
        return Some(format!("a cache write with `ttl: {ttl}` (only 5m and 1h have a price)"));
    }
    // OpenAI's write lifetimes: a Chat Completions response does not split its writes by TTL,
    // so only the 30-minute one can be counted there at its price.
    let ttls: &[&str] = if api == Api::Responses { &["30m", "12h"] } else { &["30m"] };
    match request.get("prompt_cache_options").and_then(|o| o.get("ttl")) {
        None | Some(Value::Null) => {}
        Some(Value::String(ttl)) if api != Api::AnthropicMessages && ttls.contains(&ttl.as_str()) => {}
        Some(_) if api == Api::AnthropicMessages => {}
        Some(other) => {
            let shown: String = other.to_string().chars().take(64).collect();
            return Some(format!(
                "a cache write with `prompt_cache_options.ttl: {shown}` (counted at its price here only: {})",
                ttls.join(", ")
            ));
        }
    }
    if api == Api::AnthropicMessages {
        // Each option at the value billed at the list price (or absent, or null).
        for (field, list_priced) in [("speed", "standard"), ("inference_geo", "global")] {
            match request.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::String(v)) if v == list_priced => {}
                Some(other) => {
                    let shown: String = other.to_string().chars().take(64).collect();
                    return Some(format!("`{field}: {shown}` (billed above the model's list price, or unknown; allowed: {list_priced})"));
                }
            }
        }
    }
    None
}

/// The lifetime an OpenAI request asks of the cache entries it writes (`prompt_cache_options.ttl`).
fn openai_cache_ttl(request: &Value) -> Option<&str> {
    request.get("prompt_cache_options")?.get("ttl")?.as_str()
}

/// The `ttl`s of the request's `cache_control` breakpoints (as JSON text, at most 64 characters
/// each; an absent or null one is the default 5 minutes and not listed).
fn cache_ttls(request: &Value) -> Vec<String> {
    let mut ttls = Vec::new();
    walk(request, &mut |v| {
        if let Some(t) = v.get("cache_control").and_then(|c| c.get("ttl")).filter(|t| !t.is_null()) {
            ttls.push(t.to_string().chars().take(64).collect::<String>());
        }
    });
    ttls
}

/// The `anthropic-beta` features that make the provider bill above the model's list price: the
/// 1M-token context window (input beyond 200K tokens at twice the price, output at 1.5 times).
pub fn beta_billed_above_list_price(headers: &http::HeaderMap) -> Option<BadRequest> {
    let betas = headers.get_all("anthropic-beta").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    betas.map(str::trim).find(|b| b.to_ascii_lowercase().starts_with("context-1m")).map(|beta| {
        let beta: String = beta.chars().take(64).collect();
        BadRequest::Unbounded(format!("the `anthropic-beta: {beta}` long context (billed above the model's list price)"))
    })
}

const MAX_WALK_DEPTH: usize = 64;

fn find_type(value: &Value, kinds: &[&str]) -> Option<String> {
    let mut found = None;
    walk(value, &mut |v| {
        if let Some(t) = v.get("type").and_then(Value::as_str)
            && kinds.contains(&t)
        {
            found.get_or_insert_with(|| t.to_string());
        }
    });
    found
}

fn count_images(value: &Value) -> i64 {
    let mut images = 0i64;
    walk(value, &mut |v| {
        if matches!(v.get("type").and_then(Value::as_str), Some("image" | "image_url" | "input_image")) {
            images += 1;
        }
    });
    images
}

/// Visits every object of a JSON tree (depth-bounded: serde_json already refuses more than 128
/// levels, the bound keeps the walk's stack small).
fn walk(value: &Value, visit: &mut impl FnMut(&Value)) {
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::Object(map) => {
                visit(v);
                if depth < MAX_WALK_DEPTH {
                    stack.extend(map.values().map(|c| (c, depth + 1)));
                }
            }
            Value::Array(items) if depth < MAX_WALK_DEPTH => stack.extend(items.iter().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
}

/// The request the meter forwards: a cap set when the client set none; for a streamed chat
/// completion, `stream_options.include_usage` forced on (without it the stream carries no usage,
/// and a client could turn it off to go unmetered); and for an OpenAI call that leaves its tier
/// to the project, `service_tier: "default"`, the list price: `auto` is the project's default
/// tier, which may be priority at up to twice the price (tests/meter/test_meter.py
/// test_an_openai_project_defaulting_to_priority_cannot_bill_past_the_budget).
pub fn rewrite(api: Api, mut request: Value, facts: &RequestFacts, inject_cap: Option<i64>) -> Value {
    let Value::Object(map) = &mut request else { return request };
    if facts.pin_default_tier {
        map.insert("service_tier".to_string(), Value::from("default"));
    }
    if let (Some(cap), Some(field)) = (inject_cap, api.cap_fields().first()) {
        map.insert((*field).to_string(), Value::from(cap));
    }
    if api == Api::ChatCompletions && facts.stream {
        let options = map.entry("stream_options").or_insert_with(|| Value::Object(Default::default()));
        if !options.is_object() {
            *options = Value::Object(Default::default());
        }
        options["include_usage"] = Value::Bool(true);
    }
    request
}

/// Whether a request needs rewriting at all (else its bytes are forwarded untouched).
pub fn needs_rewrite(api: Api, facts: &RequestFacts, inject_cap: Option<i64>) -> bool {
    inject_cap.is_some() || (api == Api::ChatCompletions && facts.stream) || facts.pin_default_tier
}

fn count(v: &Value, path: &[&str]) -> i64 {
    path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_i64).unwrap_or(0).max(0)
}

/// Usage in a whole (non-streamed) response body, or in the `usage` object of a stream event.
pub fn usage_of(api: Api, usage: &Value) -> Option<TokenCounts> {
    if !usage.is_object() {
        return None;
    }
    Some(match api {
        // prompt_tokens includes the cached ones and the cache writes.
        Api::ChatCompletions | Api::Embeddings => {
            let cached = count(usage, &["prompt_tokens_details", "cached_tokens"]);
            let (cache_write, cache_write_1h) = openai_cache_writes(usage.get("prompt_tokens_details"));
            TokenCounts {
                input: (count(usage, &["prompt_tokens"]) - cached - cache_write - cache_write_1h).max(0),
                cached_input: cached,
                output: count(usage, &["completion_tokens"]),
                cache_write,
                cache_write_1h,
            }
        }
        Api::Responses => {
            let cached = count(usage, &["input_tokens_details", "cached_tokens"]);
            let (cache_write, cache_write_1h) = openai_cache_writes(usage.get("input_tokens_details"));
            TokenCounts {
                input: (count(usage, &["input_tokens"]) - cached - cache_write - cache_write_1h).max(0),
                cached_input: cached,
                output: count(usage, &["output_tokens"]),
                cache_write,
                cache_write_1h,
            }
        }
        // Anthropic's input_tokens already excludes cache reads and writes.
        Api::AnthropicMessages => {
            let (cache_write, cache_write_1h) = cache_writes_of(usage);
            TokenCounts {
                input: count(usage, &["input_tokens"]),
                cached_input: count(usage, &["cache_read_input_tokens"]),
                output: count(usage, &["output_tokens"]),
                cache_write,
                cache_write_1h,
            }
        }
    })
}

/// OpenAI's cache writes as (30-minute, 12-hour), from its input details: `cache_write_tokens`
/// is their sum, `cache_write_tokens_details` splits it by TTL. Billed above input since GPT-5.6
/// (1.25 times it): counted as input they let an agent spend past its budget
/// (tests/meter/test_meter.py test_an_agent_writing_an_openai_cache_cannot_spend_past_its_budget).
/// Without the split all are short-lived; where the two disagree the larger figure is kept.
fn openai_cache_writes(details: Option<&Value>) -> (i64, i64) {
    let Some(details) = details else { return (0, 0) };
    let long = count(details, &["cache_write_tokens_details", "ttl_12h_tokens"]);
    let short =
        count(details, &["cache_write_tokens_details", "ttl_30m_tokens"]).max(count(details, &["cache_write_tokens"]).saturating_sub(long));
    (short, long)
}

/// Anthropic's cache writes as (5-minute, 1-hour): `cache_creation_input_tokens` is their sum,
/// `cache_creation` splits it by TTL. A response without the split (older API versions) wrote
/// 5-minute entries only; where the two disagree the larger figure is kept, so neither TTL is
/// ever undercounted.
fn cache_writes_of(usage: &Value) -> (i64, i64) {
    let one_hour = count(usage, &["cache_creation", "ephemeral_1h_input_tokens"]);
    let five_minutes = count(usage, &["cache_creation", "ephemeral_5m_input_tokens"])
        .max(count(usage, &["cache_creation_input_tokens"]).saturating_sub(one_hour));
    (five_minutes, one_hour)
}

/// Follows usage through a stream's events. `done` is set once the event that carries the
/// final usage has passed; a stream that ends before it is charged conservatively.
#[derive(Debug, Default)]
pub struct StreamUsage {
    pub usage: Option<TokenCounts>,
    pub done: bool,
    /// Responses API: the id of the response, for a later `previous_response_id`.
    pub response_id: Option<String>,
    /// What the stream said the call was billed at above the list price, if anything.
    pub above_list_price: Option<Surcharge>,
}

impl StreamUsage {
    pub fn on_event(&mut self, api: Api, data: &[u8]) {
        // Most events are text deltas: skip the JSON parse unless the event can carry usage.
        let needle: &[u8] = match api {
            Api::ChatCompletions | Api::Embeddings => b"\"usage\"",
            Api::Responses => b"\"response.",
            Api::AnthropicMessages => b"\"message_",
        };
        if !data.windows(needle.len()).any(|w| w == needle) {
            return;
        }
        let Ok(event) = serde_json::from_slice::<Value>(data) else { return };
        match api {
            Api::ChatCompletions | Api::Embeddings => {
                if let Some(u) = event.get("usage").and_then(|u| usage_of(api, u)) {
                    self.usage = Some(u);
                    self.done = true;
                    self.above_list_price = surcharge::of_response(api, event.get("service_tier"), None);
                }
            }
            Api::Responses => {
                if matches!(
                    event.get("type").and_then(Value::as_str),
                    Some("response.completed" | "response.incomplete" | "response.failed")
                ) {
                    let response = event.get("response");
                    self.usage = response.and_then(|r| r.get("usage")).and_then(|u| usage_of(api, u));
                    self.response_id = response.and_then(|r| r.get("id")).and_then(Value::as_str).map(str::to_string);
                    self.above_list_price = surcharge::of_response(api, response.and_then(|r| r.get("service_tier")), None);
                    self.done = self.usage.is_some();
                }
            }
            Api::AnthropicMessages => match event.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    let usage = event.get("message").and_then(|m| m.get("usage"));
                    self.usage = usage.and_then(|u| usage_of(api, u));
                    self.above_list_price = surcharge::of_response(api, None, usage);
                }
                Some("message_delta") => {
                    // Where the call ran is in message_start; should a delta say so too, the
                    // dearer of the two is kept.
                    if let Some(later) = event.get("usage").and_then(|u| surcharge::of_response(api, None, Some(u)))
                        && self.above_list_price.as_ref().is_none_or(|s| s.multiplier < later.multiplier)
                    {
                        self.above_list_price = Some(later);
                    }
                    if let (Some(current), Some(delta)) = (self.usage.as_mut(), event.get("usage")) {
                        // Cumulative counts, not increments: the last one is the total.
                        if let Some(out) = delta.get("output_tokens").and_then(Value::as_i64) {
                            current.output = out.max(0);
                        }
                        // Newer API versions repeat the input counts here, also as totals.
                        let given = |k: &str| delta.get(k).is_some_and(|v| !v.is_null());
                        let totals = usage_of(api, delta).unwrap_or_default();
                        if given("input_tokens") {
                            current.input = totals.input;
                        }
                        if given("cache_read_input_tokens") {
                            current.cached_input = totals.cached_input;
                        }
                        if given("cache_creation") {
                            (current.cache_write, current.cache_write_1h) = (totals.cache_write, totals.cache_write_1h);
                        } else if given("cache_creation_input_tokens") {
                            // The sum without its split: the split message_start gave holds.
                            current.cache_write = (totals.cache_write - current.cache_write_1h).max(0);
                        }
                    }
                }
                Some("message_stop") => self.done = self.usage.is_some(),
                _ => {}
            },
        }
    }
}

/// An error body in the provider's own shape, which its SDK parses into its exception.
pub fn error_body(provider: Provider, kind: &str, message: &str) -> Value {
    match provider {
        Provider::OpenAi => serde_json::json!({"error": {"message": message, "type": kind, "code": kind, "param": null}}),
        Provider::Anthropic => serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}),
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
