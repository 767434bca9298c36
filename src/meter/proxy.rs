//! The HTTP side: requests in through axum, out through a hyper client, responses streamed back
//! frame by frame while the meter reads their usage on the way.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body::Frame;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::budget::{self, Ledger, Outcome, Refusal, Reservation};
use super::buffer_budget::{self, BufferBudget, Charge, Charged, Shortfall};
use super::sse;
use super::wire::{self, Api, BadRequest, Provider, Route, StreamUsage};
use crate::domain::money::MicroUsd;
use crate::domain::pricing::PriceTable;

/// A non-streamed response is copied while it passes through so its usage can be read at the
/// end; a bigger one (a huge embeddings batch), or one the buffer budget cannot hold right now,
/// is charged its reservation instead.
const MAX_RESPONSE_COPY_BYTES: usize = 16 * 1024 * 1024;
/// What a client refused for want of buffer memory is told to wait before trying again.
const BUSY_RETRY_AFTER_SECONDS: &str = "1";
/// A single SSE event larger than this cannot be a usage event.
const MAX_SSE_EVENT_BYTES: usize = 4 * 1024 * 1024;

pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Where one provider's calls go, and the real key that replaces the client's dummy one.
#[derive(Clone)]
pub struct Upstream {
    /// Base URL without a trailing slash, in the SDK's own convention (OpenAI's ends in `/v1`).
    pub base: String,
    /// The whole header value (`Bearer sk-…` or the bare Anthropic key), marked sensitive so
    /// hyper never logs it. `None`: the client's own credentials are forwarded unchanged.
    pub key: Option<HeaderValue>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Upstream").field("base", &self.base).field("key", &self.key.as_ref().map(|_| "<set>")).finish()
    }
}

/// Context sizes (input, cached and output tokens) of the Responses API responses this meter
/// saw, by id: a call continuing one (`previous_response_id`) carries at most that much input
/// beyond its own body. Bounded; a forgotten id is refused, never guessed.
#[derive(Default)]
pub struct Contexts(std::sync::Mutex<HashMap<String, i64>>);

const MAX_CONTEXTS: usize = 10_000;

impl Contexts {
    fn get(&self, id: &str) -> Option<i64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(id).copied()
    }

    fn remember(&self, id: String, tokens: i64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_CONTEXTS
            && let Some(evict) = map.keys().next().cloned()
        {
            map.remove(&evict);
        }
        map.insert(id, tokens);
    }
}

pub struct Meter {
    pub ledger: Arc<Ledger>,
    pub prices: PriceTable,
    pub openai: Option<Upstream>,
    pub anthropic: Option<Upstream>,
    pub client: HttpsClient,
    /// The cap set on a request without one when the budget does not force a lower one.
    pub default_output_cap: i64,
    pub contexts: Arc<Contexts>,
    /// Where the budget comes from when the operator grants it (None: a fixed budget or none).
    pub grants: Option<Arc<super::grant_client::GrantClient>>,
    /// The memory all calls in flight may hold in buffers (buffer_budget.rs has the arithmetic).
    pub buffers: BufferBudget,
    /// Where a restarted meter process resumes from (state_file.rs): written with each call's
    /// reservation before the call goes upstream.
    pub state: Option<Arc<super::state_file::StateFile>>,
}

pub fn router(meter: Arc<Meter>) -> axum::Router {
    axum::Router::new()
        .route("/usage", axum::routing::get(usage))
        // The startup probe's (domain/meter_sidecar.rs): the meter is up and serving.
        .route(crate::domain::meter_sidecar::HEALTH_PATH, axum::routing::get(|| async { "ok" }))
        .fallback(proxy)
        .with_state(meter)
}

async fn usage(State(meter): State<Arc<Meter>>) -> Response {
    axum::Json(meter.ledger.snapshot()).into_response()
}

fn refuse(provider: Provider, status: StatusCode, kind: &str, message: &str) -> Response {
    let mut response = (status, axum::Json(wire::error_body(provider, kind, message))).into_response();
    // The SDKs already leave 4xx other than 408/409/429 alone; this says so explicitly. A 5xx
    // (the provider unreachable) is worth their retry.
    if status.is_client_error() {
        response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    }
    response
}

async fn proxy(State(meter): State<Arc<Meter>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let Some(route) = wire::route(request.method(), &path) else {
        let provider = if path.starts_with("/v1/messages") { Provider::Anthropic } else { Provider::OpenAi };
        return refuse(provider, StatusCode::NOT_FOUND, "not_found", "the agentgate meter does not forward this path");
    };
    let provider = match route {
        Route::Metered(api) => api.provider(),
        Route::Free(provider) => provider,
    };
    let Some(upstream) = (match provider {
        Provider::OpenAi => meter.openai.clone(),
        Provider::Anthropic => meter.anthropic.clone(),
    }) else {
        return refuse(
            provider,
            StatusCode::SERVICE_UNAVAILABLE,
            "not_configured",
            "the agentgate meter has no upstream for this provider",
        );
    };
    let (parts, body) = request.into_parts();
    if route == Route::Metered(Api::AnthropicMessages)
        && let Some(refusal) = wire::beta_billed_above_list_price(&parts.headers)
    {
        meter.ledger.count_refusal();
        return refuse(provider, StatusCode::BAD_REQUEST, "unbounded_cost", &refusal.to_string());
    }
    let body = match read_body(&meter.buffers, &parts.headers, body).await {
        Ok(body) => body,
        Err(shortfall) => {
            meter.ledger.count_refusal();
            return refuse_for_memory(provider, shortfall);
        }
    };
    // Parsing and rewriting need memory of their own, in proportion to the JSON's structure.
    let parse_charge = match route {
        Route::Free(_) => None,
        Route::Metered(_) => match meter.buffers.try_charge(buffer_budget::parse_cost(&body)) {
            Ok(charge) => Some(charge),
            Err(shortfall) => {
                meter.ledger.count_refusal();
                return refuse_for_memory(provider, shortfall);
            }
        },
    };
    let (body, metering) = match (route, parse_charge) {
        (Route::Metered(api), Some(charge)) => match admit(&meter, api, body, charge).await {
            Ok((body, reservation)) => (body, Some((api, reservation))),
            Err(response) => return *response,
        },
        _ => (body, None),
    };
    let uri = upstream_uri(&upstream.base, provider, &path, parts.uri.query());
    let mut builder = hyper::Request::builder().method(parts.method).uri(uri);
    if let Some(headers) = builder.headers_mut() {
        *headers = forward_headers(&parts.headers, provider, upstream.key.as_ref());
    }
    let Ok(upstream_request) = builder.body(Full::new(body)) else {
        if let Some((_, reservation)) = metering {
            reservation.settle(Outcome::Free);
        }
        return refuse(provider, StatusCode::BAD_GATEWAY, "upstream_error", "the upstream URL is not valid");
    };
    let response = match meter.client.request(upstream_request).await {
        Ok(response) => response,
        Err(e) => {
            // Refused before the request left: nothing can have been billed. Otherwise the
            // provider may have run it: the reservation stands (dropping it charges it).
            if let Some((_, reservation)) = metering
                && e.is_connect()
            {
                reservation.settle(Outcome::Free);
            }
            tracing::warn!(error = %e, provider = ?provider, "upstream call failed");
            return refuse(provider, StatusCode::BAD_GATEWAY, "upstream_error", "the agentgate meter could not reach the provider");
        }
    };
    let (mut parts, incoming) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = match metering {
        None => Body::new(incoming),
        // The provider refused the call: errors are not billed.
        Some((_, reservation)) if !parts.status.is_success() => {
            reservation.settle(Outcome::Free);
            Body::new(incoming)
        }
        Some((api, reservation)) => {
            let streamed =
                parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"));
            Body::new(MeteredBody::new(incoming, api, streamed, reservation, meter.contexts.clone(), meter.buffers.clone()))
        }
    };
    Response::from_parts(parts, body)
}

/// The request body, read chunk by chunk against the buffer budget: the bytes a Content-Length
/// announces are charged before any is read, a body without one as it grows. The returned
/// bytes give their charge back when dropped (once hyper has sent them upstream).
async fn read_body(buffers: &BufferBudget, headers: &HeaderMap, mut body: Body) -> Result<Bytes, Shortfall> {
    use http_body_util::BodyExt;
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > buffer_budget::MAX_REQUEST_BYTES as u64) {
        return Err(Shortfall::TooLarge);
    }
    let announced = announced.unwrap_or(0) as usize;
    let mut charge = buffers.try_charge(announced)?;
    let mut buffer: Vec<u8> = Vec::with_capacity(announced);
    while let Some(frame) = body.frame().await {
        // A body cut off or longer than announced: refused, never forwarded in part.
        let Ok(frame) = frame else { return Err(Shortfall::TooLarge) };
        let Ok(data) = frame.into_data() else { continue };
        buffer_budget::reserve_charged(&mut buffer, &mut charge, data.len(), buffer_budget::MAX_REQUEST_BYTES)?;
        buffer.extend_from_slice(&data);
    }
    Ok(Charged { buffer, charge }.into_bytes())
}

/// A refusal for want of buffer memory, in the provider's shape: 413 for a body that can never
/// be held, 503 with Retry-After while other calls hold the memory (the SDKs retry it).
fn refuse_for_memory(provider: Provider, shortfall: Shortfall) -> Response {
    match shortfall {
        Shortfall::TooLarge => refuse(
            provider,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            &format!(
                "the request body is larger than the agentgate meter accepts ({} MiB, with its JSON parsed), or was cut off",
                buffer_budget::MAX_REQUEST_BYTES >> 20
            ),
        ),
        Shortfall::Busy => {
            let mut response = refuse(
                provider,
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded_error",
                "the agentgate meter's memory for request bodies is held by other calls in flight; retry shortly",
            );
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(BUSY_RETRY_AFTER_SECONDS));
            response
        }
    }
}

/// Checks, prices, reserves and rewrites a metered call, or says why not in the provider's shape.
/// `parse_charge` covers the parsed request and its rewrite; it goes with the rewritten body.
async fn admit(meter: &Meter, api: Api, body: Bytes, parse_charge: Charge) -> Result<(Bytes, Reservation), Box<Response>> {
    let provider = api.provider();
    let refused = |status, kind: &str, message: &str| {
        meter.ledger.count_refusal();
        refuse(provider, status, kind, message)
    };
    let (request, mut facts) = match wire::parse_request(api, &body) {
        Ok(parsed) => parsed,
        Err(e @ BadRequest::Unbounded(_)) => return Err(Box::new(refused(StatusCode::BAD_REQUEST, "unbounded_cost", &e.to_string()))),
        Err(e) => return Err(Box::new(refused(StatusCode::BAD_REQUEST, "invalid_request_error", &e.to_string()))),
    };
    if let Some(previous) = &facts.previous_response {
        match meter.contexts.get(previous) {
            Some(tokens) => facts.input_bound = facts.input_bound.saturating_add(tokens),
            None => {
                let message = wire::BadRequest::Unbounded("a previous_response_id this meter did not see".into()).to_string();
                return Err(Box::new(refused(StatusCode::BAD_REQUEST, "unbounded_cost", &message)));
            }
        }
    }
    let Some(price) = meter.prices.get(&facts.model).copied() else {
        let model: String = facts.model.chars().take(128).collect();
        let message = format!("model {model:?} has no price in the agentgate meter's price table, so its cost cannot be bounded");
        return Err(Box::new(refused(StatusCode::BAD_REQUEST, "model_not_priced", &message)));
    };
    // At the dearest price the response may report that the request cannot pin (surcharge.rs).
    let reserve_price = super::surcharge::reserved_at(api, &request).of(&price);
    let plan_for = |remaining| {
        budget::plan(
            &reserve_price,
            facts.input_bound,
            facts.cache_writes,
            facts.output_cap,
            facts.choices,
            meter.default_output_cap,
            remaining,
        )
    };
    // Whether a refusal below is for want of budget (counted and reported: the job ends
    // BudgetExhausted) or only for want of an answer from the operator (fail closed, not counted).
    let mut operator_unreachable = false;
    if let Some(grants) = &meter.grants {
        // Enough for the call's worst case at its own (or the default) output cap, so a granted
        // budget does not shrink the cap of a call that sets none; at least a chunk, so a run
        // of calls asks the operator once per chunk rather than once per call.
        let wanted = plan_for(None).map_or(MicroUsd(0), |p| p.reserve);
        let remaining = meter.ledger.remaining().unwrap_or(MicroUsd(0));
        if remaining < wanted
            && let Err(e) = grants.top_up(MicroUsd(wanted.0 - remaining.0).max(grants.chunk)).await
        {
            // Fail closed: the call goes ahead only if what the meter holds already covers it.
            tracing::warn!(error = %e, "no more budget from the operator");
            operator_unreachable = true;
        }
    }
    let (reservation, plan) = match meter.ledger.reserve(&facts.model, price, plan_for) {
        Ok(reserved) => reserved,
        Err(Refusal::Budget { needed, remaining }) => {
            let mut message = format!(
                "budget exceeded: this call may cost up to ${needed} (its input and output cap at {}'s price) and ${} of the budget is left to this agent",
                facts.model,
                crate::domain::money::MicroUsd(remaining.0.max(0))
            );
            if operator_unreachable {
                message.push_str("; the operator could not be reached for more of the job's budget");
                meter.ledger.changed.notify_one();
            } else {
                meter.ledger.count_budget_refusal();
            }
            return Err(Box::new(refuse(provider, StatusCode::PAYMENT_REQUIRED, "budget_exceeded", &message)));
        }
    };
    // On disk before the call goes upstream, charged its reservation: a meter killed while the
    // provider runs it leaves it charged for the next process (state_file.rs). Failed, the file
    // is gone and a restart opens a new session: the call still goes.
    if let Some(state) = &meter.state {
        let (state, ledger) = (state.clone(), meter.ledger.clone());
        let written = tokio::task::spawn_blocking(move || state.write(&ledger)).await;
        if let Err(e) = written.map_err(std::io::Error::other).and_then(|w| w) {
            tracing::warn!(error = %e, "writing the meter's state file before a call");
        }
    }
    let body = if wire::needs_rewrite(api, &facts, plan.inject_cap) {
        let request = wire::rewrite(api, request, &facts, plan.inject_cap);
        let mut buffer = Vec::with_capacity(body.len() + 256);
        // Serialising a Value parsed from JSON cannot fail.
        serde_json::to_writer(&mut buffer, &request).unwrap_or_default();
        Charged { buffer, charge: parse_charge }.into_bytes()
    } else {
        body
    };
    Ok((body, reservation))
}

fn upstream_uri(base: &str, provider: Provider, path: &str, query: Option<&str>) -> String {
    // OpenAI bases end in /v1 and the SDK path starts after it; Anthropic bases are origins.
    let rest = match provider {
        Provider::OpenAi => path.strip_prefix("/v1").unwrap_or(path),
        Provider::Anthropic => path,
    };
    match query {
        Some(q) => format!("{base}{rest}?{q}"),
        None => format!("{base}{rest}"),
    }
}

const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn forward_headers(incoming: &HeaderMap, provider: Provider, key: Option<&HeaderValue>) -> HeaderMap {
    let mut headers = incoming.clone();
    strip_hop_by_hop(&mut headers);
    // Host and length are the client's view of the meter; hyper sets the upstream's. The body
    // must come back uncompressed for the meter to read its usage.
    for name in [header::HOST, header::CONTENT_LENGTH, header::ACCEPT_ENCODING] {
        headers.remove(name);
    }
    if let Some(key) = key {
        // The client holds a dummy key: whatever it sent, only the real one goes out. Nor does it
        // pick the organisation or project the key bills: a project's own settings (its default
        // tier, priority at twice the price) are beyond what the meter prices
        // (tests/meter/test_meter.py test_an_openai_project_defaulting_to_priority_cannot_bill_past_the_budget).
        for name in [header::AUTHORIZATION.as_str(), "x-api-key", "openai-organization", "openai-project"] {
            headers.remove(name);
        }
        let name = match provider {
            Provider::OpenAi => header::AUTHORIZATION,
            Provider::Anthropic => HeaderName::from_static("x-api-key"),
        };
        headers.insert(name, key.clone());
    }
    headers
}

enum Observer {
    /// `charge` covers what the parser holds of an unfinished event; `starved` once the budget
    /// could not, and the rest of the stream is passed on unread (charged its reservation).
    Stream { parser: sse::Parser, usage: StreamUsage, charge: Charge, starved: bool },
    /// `charge` covers `copy`'s capacity; when the budget cannot, the copy is given up.
    Whole { copy: Vec<u8>, overflowed: bool, charge: Charge },
}

/// The only fields read from a whole response: serde skips the rest (an embeddings batch's
/// vectors) without building them, so parsing takes no memory beyond the copy.
#[derive(serde::Deserialize)]
struct ResponseHead {
    #[serde(default)]
    usage: Option<serde_json::Value>,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    service_tier: Option<serde_json::Value>,
}

/// The upstream's body, passed on frame by frame. It settles the call's reservation when the
/// body ends; dropped before that (the client went away), the reservation is charged in full.
pub struct MeteredBody {
    inner: Incoming,
    api: Api,
    observer: Observer,
    reservation: Option<Reservation>,
    contexts: Arc<Contexts>,
}

impl MeteredBody {
    fn new(
        inner: Incoming,
        api: Api,
        streamed: bool,
        reservation: Reservation,
        contexts: Arc<Contexts>,
        buffers: BufferBudget,
    ) -> MeteredBody {
        let observer = match streamed {
            true => Observer::Stream {
                parser: sse::Parser::new(MAX_SSE_EVENT_BYTES),
                usage: StreamUsage::default(),
                charge: buffers.nothing(),
                starved: false,
            },
            false => Observer::Whole { copy: Vec::new(), overflowed: false, charge: buffers.nothing() },
        };
        MeteredBody { inner, api, observer, reservation: Some(reservation), contexts }
    }

    fn observe(&mut self, data: &[u8]) {
        let api = self.api;
        match &mut self.observer {
            Observer::Stream { parser, usage, charge, starved } => {
                if *starved {
                    return;
                }
                // The parser may grow by twice the chunk (a Vec doubling): charged before, and
                // trimmed to what it holds after.
                let worst = parser.held_bytes() + 2 * data.len();
                if worst > charge.bytes() && charge.try_grow(worst - charge.bytes()).is_err() {
                    *starved = true;
                    *parser = sse::Parser::new(0);
                    charge.release();
                    return;
                }
                parser.feed(data, &mut |event| usage.on_event(api, &event.data));
                charge.shrink_to(parser.held_bytes());
            }
            Observer::Whole { copy, overflowed, charge } => {
                if *overflowed {
                    return;
                }
                // Without the memory, the call is charged its reservation (at least its cost)
                // rather than the meter risking its own life.
                if buffer_budget::reserve_charged(copy, charge, data.len(), MAX_RESPONSE_COPY_BYTES).is_err() {
                    *overflowed = true;
                    *copy = Vec::new();
                    charge.release();
                    return;
                }
                copy.extend_from_slice(data);
            }
        }
    }

    fn finish(&mut self, clean: bool) {
        let Some(reservation) = self.reservation.take() else { return };
        let (measured, response_id, above_list_price) = match &self.observer {
            _ if !clean => (None, None, None),
            Observer::Stream { starved: true, .. } => (None, None, None),
            Observer::Stream { usage, .. } => {
                (usage.usage.filter(|_| usage.done), usage.response_id.clone(), usage.above_list_price.clone())
            }
            Observer::Whole { copy, overflowed: false, .. } => match serde_json::from_slice::<ResponseHead>(copy) {
                Ok(body) => (
                    body.usage.as_ref().and_then(|u| wire::usage_of(self.api, u)),
                    body.id.as_ref().and_then(serde_json::Value::as_str).map(str::to_string),
                    super::surcharge::of_response(self.api, body.service_tier.as_ref(), body.usage.as_ref()),
                ),
                Err(_) => (None, None, None),
            },
            Observer::Whole { .. } => (None, None, None),
        };
        if let Some(above) = &above_list_price {
            // The account's defaults put it there (an Anthropic workspace's inference geo, its
            // Priority Tier; an OpenAI project's tier): charged at that price (surcharge.rs).
            tracing::warn!(model = reservation.model(), billed_at = %above.billed_at, multiplier = above.multiplier.0, api = ?self.api,
                "the provider reports billing this call above the model's list price; the meter charges it at that price (multiplier in thousandths)");
        }
        if let (Api::Responses, Some(tokens), Some(id)) = (self.api, measured, response_id) {
            self.contexts.remember(id, tokens.total());
        }
        reservation.settle(match (measured, above_list_price) {
            (None, _) => Outcome::Unmeasured,
            (Some(tokens), Some(above)) => Outcome::MeasuredAbove(tokens, above.multiplier),
            (Some(tokens), None) => Outcome::Measured(tokens),
        });
    }
}

/// Dropped before its end: the client hung up. Mid-stream, the reservation is charged (dropped
/// unsettled); once the usage event has passed, the usage is final and is what the call costs.
/// The OpenAI SDK closes a stream at `data: [DONE]`, before the body's end: charged its
/// reservation, such a call spent up to its whole cap (tests/meter/test_meter.py
/// test_a_client_that_hangs_up_after_the_usage_is_charged_what_was_measured).
impl Drop for MeteredBody {
    fn drop(&mut self) {
        if matches!(&self.observer, Observer::Stream { usage, starved: false, .. } if usage.done) {
            self.finish(true);
        }
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.observe(data);
                }
                // hyper stops polling a body that says it has ended, so the last frame of a
                // sized body is where it ends.
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.finish(true);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_key_replaces_whatever_the_client_sent() {
        let mut incoming = HeaderMap::new();
        incoming.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer dummy"));
        incoming.insert("x-api-key", HeaderValue::from_static("dummy"));
        incoming.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        incoming.insert(header::HOST, HeaderValue::from_static("127.0.0.1:4000"));
        incoming.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        let key = HeaderValue::from_static("real-key");
        let out = forward_headers(&incoming, Provider::Anthropic, Some(&key));
        assert_eq!(out.get("x-api-key").unwrap(), "real-key");
        assert!(out.get(header::AUTHORIZATION).is_none(), "the dummy bearer token is not forwarded either");
        assert!(out.get(header::ACCEPT_ENCODING).is_none(), "responses must come back readable");
        assert!(out.get(header::HOST).is_none());
        assert_eq!(out.get("anthropic-version").unwrap(), "2023-06-01");
        let out = forward_headers(&incoming, Provider::OpenAi, Some(&HeaderValue::from_static("Bearer sk-real")));
        assert_eq!(out.get(header::AUTHORIZATION).unwrap(), "Bearer sk-real");
        assert!(out.get("x-api-key").is_none());
        let out = forward_headers(&incoming, Provider::OpenAi, None);
        assert_eq!(out.get(header::AUTHORIZATION).unwrap(), "Bearer dummy", "without a key file the client's own is used");
    }

    /// tests/meter/test_meter.py test_an_openai_project_defaulting_to_priority_cannot_bill_past_the_budget.
    #[test]
    fn the_client_picks_no_organisation_or_project_for_the_meters_key() {
        let mut incoming = HeaderMap::new();
        incoming.insert("openai-project", HeaderValue::from_static("proj_priority"));
        incoming.insert("OpenAI-Organization", HeaderValue::from_static("org_other"));
        let out = forward_headers(&incoming, Provider::OpenAi, Some(&HeaderValue::from_static("Bearer sk-real")));
        assert!(out.get("openai-project").is_none() && out.get("openai-organization").is_none(), "{out:?}");
        let out = forward_headers(&incoming, Provider::OpenAi, None);
        assert_eq!(out.get("openai-project").unwrap(), "proj_priority", "with the client's own key, its own project");
    }

    #[test]
    fn upstream_uris_follow_each_sdks_base_url_convention() {
        assert_eq!(
            upstream_uri("https://api.openai.com/v1", Provider::OpenAi, "/v1/chat/completions", None),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(upstream_uri("http://h:1/v1", Provider::OpenAi, "/v1/models", Some("a=b")), "http://h:1/v1/models?a=b");
        assert_eq!(
            upstream_uri("https://api.anthropic.com", Provider::Anthropic, "/v1/messages", None),
            "https://api.anthropic.com/v1/messages"
        );
    }

    #[test]
    fn an_upstream_prints_without_its_key() {
        let upstream = Upstream { base: "https://x".into(), key: Some(HeaderValue::from_static("sk-secret")) };
        assert!(!format!("{upstream:?}").contains("sk-secret"));
    }
}
