//! `make bench-meter`: the latency the meter adds, next to a direct call to the same upstream,
//! at a fixed request rate (open loop: requests leave on schedule whether or not earlier ones
//! returned, so queueing shows in the tail), non-streamed and streamed, and the meter's RSS idle
//! and after the load. Prints figures; asserts nothing (speed is not a test).
//!
//! AGENTGATE_BIN (the release binary), BENCH_RPS (1000), BENCH_SECONDS per round (3),
//! BENCH_ROUNDS (3): direct and metered rounds alternate, so drift on a shared machine hits both.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

const USAGE: &str =
    r#""usage":{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,"prompt_tokens_details":{"cached_tokens":0}}"#;

fn upstream_reply(streamed: bool) -> hyper::Response<BoxBody> {
    if !streamed {
        let body = format!(
            r#"{{"id":"c","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"hello there, this is a typical short reply"}},"finish_reason":"stop"}}],{USAGE}}}"#
        );
        return hyper::Response::builder().header("content-type", "application/json").body(Full::new(Bytes::from(body)).boxed()).unwrap();
    }
    // 20 content chunks, then the usage chunk and [DONE]: a short streamed answer.
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = (0..20)
        .map(|i| {
            let chunk = format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}}}}],\"usage\":null}}\n\n"
            );
            Ok(Frame::data(Bytes::from(chunk)))
        })
        .collect();
    frames.push(Ok(Frame::data(Bytes::from(format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],{USAGE}}}\n\n"
    )))));
    frames.push(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))));
    let body = StreamBody::new(futures::stream::iter(frames));
    hyper::Response::builder().header("content-type", "text/event-stream").body(BodyExt::boxed(body)).unwrap()
}

async fn serve_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let streamed = body.windows(14).any(|w| w == b"\"stream\":true");
                    Ok::<_, Infallible>(upstream_reply(streamed))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Sends `rps` requests a second for `seconds` to `url`; returns each one's latency to the
/// last byte of the response.
async fn run(url: &str, streamed: bool, rps: u64, seconds: u64) -> Vec<Duration> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body =
        format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"say hello"}}],"max_tokens":64,"stream":{streamed}}}"#);
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for _ in 0..rps * seconds {
        tick.tick().await;
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let req = hyper::Request::post(url).header("content-type", "application/json").body(Full::new(Bytes::from(body))).unwrap();
            let response = client.request(req).await.expect("request");
            assert!(response.status().is_success(), "status {}", response.status());
            response.into_body().collect().await.expect("body");
            start.elapsed()
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.push(t.await.unwrap());
    }
    latencies
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// `a − b` in milliseconds, negative when the meter's run happened to be faster (noise).
fn signed_ms(a: Duration, b: Duration) -> String {
    format!("{:+.3}", (a.as_secs_f64() - b.as_secs_f64()) * 1e3)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (rps, seconds, rounds) = (env("BENCH_RPS", 1000), env("BENCH_SECONDS", 3), env("BENCH_ROUNDS", 3));
    let bin = std::env::var("AGENTGATE_BIN").unwrap_or_else(|_| "target/release/agentgate".into());
    let upstream = serve_upstream().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut meter = std::process::Command::new(&bin)
        .args(["meter", "--listen", &format!("127.0.0.1:{port}"), "--openai-upstream", &format!("http://{upstream}/v1")])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("starting the meter");
    let meter_url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "the meter did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let idle_rss = rss_kib(meter.id());
    println!("meter benchmark: {rps} requests/s, {rounds} rounds of {seconds}s each way, latency to the last byte");
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "mode", "direct p50", "meter p50", "direct p99", "meter p99", "added p50", "added p99"
    );
    for streamed in [false, true] {
        let (mut direct, mut metered) = (Vec::new(), Vec::new());
        // A short warm-up each way opens the pooled connections.
        run(&format!("http://{upstream}/v1/chat/completions"), streamed, 200, 1).await;
        run(&format!("{meter_url}/v1/chat/completions"), streamed, 200, 1).await;
        for _ in 0..rounds {
            direct.extend(run(&format!("http://{upstream}/v1/chat/completions"), streamed, rps, seconds).await);
            metered.extend(run(&format!("{meter_url}/v1/chat/completions"), streamed, rps, seconds).await);
        }
        direct.sort();
        metered.sort();
        let (d50, d99) = (percentile(&direct, 0.5), percentile(&direct, 0.99));
        let (m50, m99) = (percentile(&metered, 0.5), percentile(&metered, 0.99));
        println!(
            "{:<10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
            if streamed { "streamed" } else { "whole" },
            ms(d50),
            ms(m50),
            ms(d99),
            ms(m99),
            signed_ms(m50, d50),
            signed_ms(m99, d99)
        );
    }
    let usage =
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>().get(format!("{meter_url}/usage").parse().unwrap()).await.unwrap();
    let usage = usage.into_body().collect().await.unwrap().to_bytes();
    let usage: serde_json::Value = serde_json::from_slice(&usage).unwrap();
    println!("meter RSS: idle {:.1} MiB, after the load {:.1} MiB", idle_rss as f64 / 1024.0, rss_kib(meter.id()) as f64 / 1024.0);
    println!(
        "meter counted {} calls, {} unmeasured, cost ${}",
        usage["calls"],
        usage["unmeasuredCalls"],
        usage["usage"]["costUSD"].as_str().unwrap_or("?")
    );
    let _ = meter.kill();
    let _ = meter.wait();
}
