//! Trace export (cargo feature `otel`; `make test` runs this file with it): with
//! OTEL_EXPORTER_OTLP_ENDPOINT set, the operator sends its reconcile spans over OTLP/HTTP to a
//! collector, played here by a loopback HTTP server that records what it receives.
#![cfg(feature = "otel")]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentgate::api::AgentJob;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use support::cluster::*;

const NS: &str = "otel";

struct Received {
    request_line: String,
    content_type: String,
    body: Vec<u8>,
}

/// Accepts OTLP/HTTP exports on a loopback port and answers each with an empty success.
fn collector() -> (u16, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                // One connection may carry several requests (keep-alive).
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut length, mut content_type) = (0, String::new());
                    loop {
                        let mut header = String::new();
                        reader.read_line(&mut header).unwrap();
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        let (name, value) = header.split_once(':').unwrap();
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap(),
                            "content-type" => content_type = value.trim().to_string(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n").unwrap();
                    if tx.send(Received { request_line: request_line.trim_end().to_string(), content_type, body }).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

/// The operator with extra environment; killed when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn reconcile_spans_are_exported_over_otlp_http() {
    // The operator is started here by hand, built with the otel feature and its environment.
    let env = Env::builder(NS).node("otel-node", "8", "32Gi", &[]).without_voting_rights().operator(OperatorMode::Later).build().await;
    let (cp, admin) = (env.cp, env.admin.clone());
    let (port, received) = collector();
    let log = std::fs::File::create(cp.dir().join("operator-otel.log")).unwrap();
    let _operator = Operator(
        Command::new(env!("CARGO_BIN_EXE_agentgate"))
            .args(["run", "--namespace", NS, "--metrics-addr", "127.0.0.1:0"])
            .env("KUBECONFIG", cp.kubeconfig("admin"))
            .env("RUST_LOG", "info")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"))
            .env("OTEL_SERVICE_NAME", "agentgate-otel-test")
            // Export batches every 200 ms rather than every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the operator"),
    );

    let base = json!({
        "category": "tracing",
        "agents": {"primary": {"name": "agent", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"}},
        "budget": {"maxCostUSD": "5.00"},
    });
    Api::<AgentJob>::namespaced(admin.clone(), NS).create(&PostParams::default(), &agent_job("traced", base, json!({}))).await.unwrap();
    wait_for_job(&admin, NS, "traced", "AwaitingApproval", |j| phase(j) == Some("AwaitingApproval")).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let export = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = received.recv_timeout(left).expect("no export of the job's reconcile span within 30 s");
        if contains(&r.body, "reconcile AgentJob") && contains(&r.body, "traced") {
            break r;
        }
    };
    assert_eq!(export.request_line, "POST /v1/traces HTTP/1.1");
    assert_eq!(export.content_type, "application/x-protobuf");
    assert!(contains(&export.body, "agentgate-otel-test"), "the resource names the service");
    assert!(contains(&export.body, NS), "the span carries the job's namespace");
}
