//! A hostile tenant flooding the operator's meter API (any Pod can reach its port) with junk and
//! forged bearer tokens, against the real apiserver: the TokenReviews the operator sends for
//! them stay bounded (counted by the apiserver itself, `apiserver_request_total`), and a
//! legitimate meter is served meanwhile. This binary has its own control plane, so every
//! TokenReview it counts is this test's operator's.

mod support;

use std::sync::Arc;
use std::time::Duration;

use agentgate::api::{AgentJob, Decision};
use agentgate::domain::meter_tls as tls;
use agentgate::meter::grant_client::pinned_client;
use agentgate::meter::proxy::HttpsClient;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::{ControlPlane, OperatorProcess};
use support::http::{free_port, http_get};

const TIMEOUT: Duration = Duration::from_secs(60);
/// The TokenReviews counted are the apiserver's, all of this binary's: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const AUDIENCE: &str = "agentgate.dev/meter";

async fn post(client: &HttpsClient, url: &str, bearer: &str, body: &Value) -> Result<(u16, Value), String> {
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {bearer}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = client.request(request).await.map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

/// Unpadded base64url, as JWTs are encoded.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let bits = chunk.iter().enumerate().fold(0u32, |bits, (i, b)| bits | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((bits >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The flooder's address: another loopback address than the meter's (127.0.0.1), as another
/// Pod's IP would be.
const FLOODER: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

fn tls_config(ca: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// An HTTPS client trusting the operator's CA, connecting from `source`.
fn client_from(ca: &[u8], source: std::net::IpAddr) -> HttpsClient {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_local_address(Some(source));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls_config(ca)).https_only().enable_http1().wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

/// TokenReviews the apiserver has served so far, by its own metrics.
async fn token_reviews(admin: &Client) -> u64 {
    let text = admin.request_text(http::Request::get("/metrics").body(Vec::new()).unwrap()).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("resource=\"tokenreviews\"") && l.contains("verb=\"POST\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn sync_body(session: &str, sequence: i64, want: &str) -> Value {
    json!({"session": session, "sequence": sequence, "wantUSD": want,
        "usage": {"inputTokens": 0, "cachedInputTokens": 0, "outputTokens": 0, "totalTokens": 0, "costUSD": "0"}})
}

/// An operator serving the meter API for namespace `ns`, and a running job's meter there.
struct Victim {
    admin: Client,
    operator: OperatorProcess,
    metrics_port: u16,
    ca: Vec<u8>,
    api: HttpsClient,
    url: String,
    /// The job's meter's token.
    token: String,
}

/// The running agent Pod of a new approved job `name`.
async fn running_pod(admin: &Client, ns: &str, name: &str) -> Pod {
    let spec = json!({"category": "payments", "agents": {"primary": {"name": "agent", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"}},
        "resources": {"cpu": "100m", "memory": "128Mi"}, "budget": {"maxCostUSD": "1"}});
    let job =
        Api::<AgentJob>::namespaced(admin.clone(), ns).create(&PostParams::default(), &agent_job(name, spec, json!({}))).await.unwrap();
    let cp = ControlPlane::shared();
    vote(&cp.client("alice").await, &job, "alice", Decision::Approve).await;
    vote(&cp.client("bob").await, &job, "bob", Decision::Approve).await;
    let pods = wait_for("the agent Pod", TIMEOUT, || job_pods(admin, ns, &job), |p: &Vec<Pod>| p.len() == 1).await;
    run_pod(admin, ns, &pods[0].name_any()).await;
    pods.into_iter().next().unwrap()
}

async fn victim(ns: &str) -> Victim {
    let admin = Env::builder(ns).node(&format!("{ns}-node"), "64", "256Gi", &[]).operator(OperatorMode::Later).build().await.admin;
    let (api_port, metrics_port) = (free_port(), free_port());
    let (metrics, listen, grant_url) =
        (format!("127.0.0.1:{metrics_port}"), format!("127.0.0.1:{api_port}"), format!("https://127.0.0.1:{api_port}"));
    let operator = OperatorProcess::start(
        ControlPlane::shared(),
        &["--namespace", ns, "--metrics-addr", &metrics, "--meter-api-listen", &listen, "--meter-grant-url", &grant_url],
    );
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let secret =
        wait_for("the meter API's certificate", TIMEOUT, || async { secrets.get_opt(tls::DEFAULT_SECRET).await.unwrap() }, |s| s.is_some())
            .await
            .unwrap();
    let ca = secret.data.unwrap()[tls::CA_CERT_KEY].0.clone();
    let api = pinned_client(&ca).unwrap();
    let url = format!("https://127.0.0.1:{api_port}/v1/sync");

    let pod = running_pod(&admin, ns, "victim").await;
    let token = service_account_token(&admin, ns, Some(&pod), AUDIENCE).await;
    let (status, answer) = post(&api, &url, &token, &sync_body("legit", 1, "0.10")).await.unwrap();
    assert_eq!(status, 200, "the meter is served before the flood: {answer}");
    Victim { admin, operator, metrics_port, ca, api, url, token }
}

/// 1,500 junk bearer tokens (distinct strings, and JWTs claiming the victim's own Pod with a
/// forged signature: the one a tenant of the namespace can write, knowing its Pod's name and uid)
/// sent 100 at a time: without a bound, each was one TokenReview, and the apiserver's answers to
/// them queued every team's meters behind the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_tokens_costs_the_apiserver_a_bounded_number_of_token_reviews_and_meters_are_served_meanwhile() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Victim { admin, operator, metrics_port, ca, api, url, token } = victim("meter-api-flood").await;

    // From ten Pods' addresses (127.0.0.2 to .11).
    let flooders: Arc<Vec<HttpsClient>> =
        Arc::new((2..12).map(|last| client_from(&ca, std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last)))).collect());
    // Forgeries claiming Pods nobody runs (any shape-valid JWT with a made-up Pod and uid):
    // refused from the operator's Pod cache, not one reviewed.
    let before = token_reviews(&admin).await;
    let (header, _) = token.split_once('.').unwrap();
    let expires = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let made_up: Vec<String> = (0..300)
        .map(|i| {
            let claims = json!({"aud": [AUDIENCE], "exp": expires, "sub": "system:serviceaccount:meter-api-flood:default",
                "kubernetes.io": {"namespace": "meter-api-flood", "pod": {"name": format!("made-up-{i}"), "uid": format!("00000000-0000-0000-0000-{i:012}")}}});
            format!("{header}.{}.{}", base64url(claims.to_string().as_bytes()), "c2lnbmF0dXJl")
        })
        .collect();
    let answers: Vec<_> = futures::stream::iter(made_up)
        .map(|bearer| {
            let (api, url) = (flooders[0].clone(), url.clone());
            async move {
                post(&api, &url, &bearer, &sync_body("flood", 1, "0.50"))
                    .await
                    .map(|(status, body)| (status, body["error"]["reason"].clone()))
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let made_up_reviews = token_reviews(&admin).await - before;
    assert_eq!(made_up_reviews, 0, "300 forgeries of Pods nobody runs cost {made_up_reviews} TokenReviews: {answers:?}");
    assert!(answers.iter().all(|a| matches!(a, Ok((503, reason)) if reason == "pod_unknown")), "{answers:?}");

    // The forgeries: the real token's header and claims, another signature.
    let (signed, _) = token.rsplit_once('.').unwrap();
    let forged = |i: usize| format!("{signed}.{}", format!("{i:08}").repeat(43));
    let junk: Vec<String> = (0..1000).map(|i| format!("junk-{i}-{}", "x".repeat(i % 50))).chain((0..300).map(forged)).collect();
    // One forgery sent again and again, as a dumb flooder does.
    let repeated = forged(999_999);
    let before = token_reviews(&admin).await;
    let api = Arc::new(api);
    let flood_url = url.clone();
    let flood = futures::stream::iter(junk.into_iter().chain(std::iter::repeat_n(repeated, 200)).enumerate())
        .map(move |(i, bearer)| {
            let (api, url) = (flooders[i % flooders.len()].clone(), flood_url.clone());
            async move { post(&api, &url, &bearer, &sync_body("flood", 1, "0.50")).await.map(|(status, _)| status) }
        })
        .buffer_unordered(100);
    let flooding = tokio::spawn(flood.collect::<Vec<_>>());
    // The victim's meter keeps syncing while the flood runs (a refusal for load is a 503 it
    // retries, as the meter does), and is served.
    let mut sequence = 2;
    let served = wait_for(
        "the legitimate meter served during the flood",
        TIMEOUT,
        || {
            sequence += 1;
            let (api, url, token, sequence) = (api.clone(), url.clone(), token.clone(), sequence);
            async move { post(&api, &url, &token, &sync_body("legit", sequence, "0.10")).await.map(|(s, _)| s) }
        },
        |status| *status == Ok(200),
    )
    .await;
    assert_eq!(served, Ok(200));
    let statuses = flooding.await.unwrap();
    assert_eq!(statuses.len(), 1500);
    assert!(statuses.iter().all(|s| matches!(s, Ok(401) | Ok(403) | Ok(503))), "every junk token refused: {statuses:?}");
    let reviews = token_reviews(&admin).await - before;
    // The legitimate meter's syncs are answered from the verified-token cache; the 1,000 junk
    // strings are not even tokens; the 300 forgeries of the victim's Pod are reviewed at most one
    // at a time, the rest refused for load; the repeated one is remembered once reviewed.
    assert!(reviews <= 320, "the flood of 1,500 junk tokens cost {reviews} TokenReviews");
    let (_, metrics) = http_get(metrics_port, "/metrics");
    let mut outcomes = std::collections::BTreeMap::new();
    for status in &statuses {
        *outcomes.entry(status.as_ref().map_or_else(|_| "not connected".to_string(), u16::to_string)).or_insert(0) += 1;
    }
    println!("the flood of 1,500 junk tokens cost {reviews} TokenReviews; answers: {outcomes:?}");
    assert!(metrics.contains("agentgate_meter_api_requests_total{outcome=\"token_rejected\"}"), "{metrics}");
    drop(operator);
}

/// One peer (any Pod can reach the port) opening 200 TLS connections and leaving them idle:
/// axum kept every one open for as long as its client did, each holding the operator's TLS and
/// HTTP buffers, so a few thousand filled its memory. Beyond its share the operator closes them
/// at once, and a meter elsewhere is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_peer_are_bounded_and_a_meter_is_served_meanwhile() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Victim { operator, metrics_port, ca, api, url, token, .. } = victim("meter-api-idle").await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&ca)));
    let address: std::net::SocketAddr = url.trim_start_matches("https://").trim_end_matches("/v1/sync").parse().unwrap();
    let open = |_| {
        let connector = connector.clone();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind((FLOODER, 0).into()).unwrap();
            let tcp = socket.connect(address).await.ok()?;
            let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
            connector.connect(name, tcp).await.ok()
        }
    };
    let connections: Vec<_> = futures::future::join_all((0..200).map(open)).await;
    // Still open: a read waits (the server sends nothing unasked); closed: it ends at once.
    let still_open = futures::future::join_all(connections.into_iter().flatten().map(|mut tls| async move {
        let mut byte = [0u8; 1];
        let read = std::future::poll_fn(|cx| {
            tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut tls), cx, &mut tokio::io::ReadBuf::new(&mut byte))
        });
        let open = tokio::time::timeout(Duration::from_secs(2), read).await.is_err();
        (open, tls)
    }))
    .await;
    let held: Vec<_> = still_open.into_iter().filter(|(open, _)| *open).map(|(_, tls)| tls).collect();
    println!("{} of 200 idle connections from one peer left open", held.len());
    assert!(held.len() <= 64, "{} idle connections from one peer left open", held.len());
    // The meter, from another address, is served while the flooder holds its share.
    let (status, answer) = post(&api, &url, &token, &sync_body("legit", 2, "0.10")).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let (_, metrics) = http_get(metrics_port, "/metrics");
    assert!(metrics.contains("agentgate_meter_api_requests_total{outcome=\"connection_refused\"}"), "{metrics}");
    drop(held);
    drop(operator);
}

/// A tenant with a token for their own running agent Pod (minted, as `edit` allows) repeats one
/// sync 100 at a time: each costs the operator a Pod read and a job read. Without a share per
/// Pod it held every one of the meter API's places, and other meters were turned away (503)
/// while it lasted. Now it holds its Pod's two, and another job's meter is served every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pods_valid_token_cannot_take_every_other_meters_place() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Victim { admin, operator, api, url, token, ca, .. } = victim("meter-api-share").await;
    let mallory = running_pod(&admin, "meter-api-share", "mallory").await;
    let minted = service_account_token(&admin, "meter-api-share", Some(&mallory), AUDIENCE).await;
    let (status, answer) = post(&api, &url, &minted, &sync_body("mallory", 1, "0.01")).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let flooders: Arc<Vec<HttpsClient>> =
        Arc::new((2..12).map(|last| client_from(&ca, std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last)))).collect());
    let flood_url = url.clone();
    let flooding = tokio::spawn(
        futures::stream::iter(0..3000)
            .map(move |i| {
                let (api, url, minted) = (flooders[i % flooders.len()].clone(), flood_url.clone(), minted.clone());
                // A retry of the sync already applied: answered from status, never written.
                async move { post(&api, &url, &minted, &sync_body("mallory", 1, "0.01")).await.map(|(status, _)| status) }
            })
            .buffer_unordered(100)
            .collect::<Vec<_>>(),
    );
    let mut answers = Vec::new();
    for sequence in 2..22 {
        answers.push(post(&api, &url, &token, &sync_body("legit", sequence, "0.001")).await.map(|(status, _)| status));
    }
    let flood = flooding.await.unwrap();
    let shed = flood.iter().filter(|s| **s == Ok(503)).count();
    println!("the victim's 20 syncs during the flood: {answers:?}; the flood's 3,000: {shed} shed");
    assert!(shed > 0, "the flood was under way: {flood:?}");
    assert!(answers.iter().all(|a| *a == Ok(200)), "the victim's syncs during the flood: {answers:?}");
    drop(operator);
}

/// A tenant of the victim's namespace (its Pods' names and uids are no secret there) sends
/// forgeries naming the victim's running agent Pod, from their own Pods' addresses, without
/// end. Each is shaped right and names a Pod the operator knows, so each needs a TokenReview:
/// they held the victim Pod's one review slot and most of the eight, and the victim's meter,
/// whose token the kubelet rotates every few minutes, was turned away (503) while its new token
/// waited to be verified. Requests from the Pod's own IP are reviewed apart: each of the
/// victim's ten fresh tokens is served at its first try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_naming_a_real_pod_from_elsewhere_cannot_hold_its_meters_reviews() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let ns = "meter-api-lanes";
    let Victim { admin, operator, metrics_port, ca, api, url, token } = victim(ns).await;
    // The kubelet's part: the victim Pod's address is the one its meter calls from (127.0.0.1).
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let victim_pod = pods.list(&Default::default()).await.unwrap().items.into_iter().next().unwrap();
    let ip = json!({"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}});
    pods.patch_status(&victim_pod.name_any(), &PatchParams::default(), &Patch::Merge(&ip)).await.unwrap();
    // Evidence that the operator's Pod cache holds that address: it has acted on a later event
    // of the same Pod watch (another job's Pod finishing).
    let witness = running_pod(&admin, ns, "witness").await;
    finish_pod(&admin, ns, &witness.name_any(), 0, r#"{"usage":[]}"#).await;
    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), ns);
    wait_for("the witness job Succeeded", TIMEOUT, || async { jobs.get("witness").await.unwrap() }, |j| phase(j) == Some("Succeeded"))
        .await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Arc<Vec<HttpsClient>> =
        Arc::new((2..12).map(|last| client_from(&ca, std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last)))).collect());
    let (signed, _) = token.rsplit_once('.').unwrap();
    let signed = signed.to_string();
    let (flood_url, flood_stop) = (url.clone(), stop.clone());
    let flooding = tokio::spawn(
        futures::stream::iter(0..)
            .take_while(move |_| std::future::ready(!flood_stop.load(std::sync::atomic::Ordering::Relaxed)))
            .map(move |i: usize| {
                let (api, url) = (flooders[i % flooders.len()].clone(), flood_url.clone());
                let forged = format!("{signed}.{}", format!("{i:08}").repeat(43));
                async move { post(&api, &url, &forged, &sync_body("flood", 1, "0.50")).await.map(|(status, _)| status) }
            })
            .buffer_unordered(100)
            .collect::<Vec<_>>(),
    );
    // Once the flood holds the review slots (its first refusals for load)...
    wait_for(
        "the flood's forgeries shed for load",
        TIMEOUT,
        || async { http_get(metrics_port, "/metrics").1 },
        |text: &String| text.lines().any(|l| l.starts_with("agentgate_meter_api_requests_total{outcome=\"busy\"}") && !l.ends_with(" 0")),
    )
    .await;
    // ...the victim's meter presents ten fresh tokens (as after rotations), each once.
    let mut answers = Vec::new();
    for sequence in 2..12 {
        let fresh = service_account_token(&admin, ns, Some(&victim_pod), AUDIENCE).await;
        answers.push(
            post(&api, &url, &fresh, &sync_body("legit", sequence, "0.001"))
                .await
                .map(|(status, body)| (status, body["error"]["reason"].clone())),
        );
    }
    assert!(!flooding.is_finished(), "the flood lasted while the victim's tokens were verified");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flood = flooding.await.unwrap();
    let busy = flood.iter().filter(|s| **s == Ok(503)).count();
    let rejected = flood.iter().filter(|s| **s == Ok(401)).count();
    println!(
        "the victim's ten fresh tokens during the flood: {answers:?}; the flood: {} forgeries, {rejected} reviewed and refused, {busy} shed",
        flood.len()
    );
    assert!(rejected > 0 && busy > 0, "the flood was reviewed and held the review slots: {rejected} refused, {busy} shed");
    assert!(answers.iter().all(|a| matches!(a, Ok((200, _)))), "each fresh token served at its first try: {answers:?}");
    drop(operator);
}

/// All of `data` written (the tests' tokio has no `AsyncWriteExt`).
async fn write_all<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *w).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

async fn flush<W: tokio::io::AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *w).poll_flush(cx)).await
}

/// A figure (kB) of `/proc/<pid>/status`: `VmRSS` now, `VmHWM` the peak so far.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in {status}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Anyone who can reach the port (no token needed) opens 64 connections from each of eight
/// addresses (eight Pods): on half, a request whose body is declared 2,000,000 bytes (under
/// axum's 2 MiB default) and sent but for its last bytes; on the other half, 390 KB of header
/// lines without the blank line that ends them. axum read every body before the handler looked
/// at the token, and hyper buffered up to 408 KiB of each head: the operator held both, for as
/// long as the client trickled, and four Pods' bodies alone were more than the chart's 512 MiB
/// limit. Now a head over 16 KiB is answered 431, and a body is read only once its token is
/// admitted (at most 256 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_heads_and_bodies_from_many_pods_cannot_fill_the_operators_memory() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Victim { operator, ca, api, url, token, .. } = victim("meter-api-bodies").await;
    let pid = operator.pid();
    // The peak from here on (5 resets VmHWM to the current RSS; proc(5)).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = proc_status_kib(pid, "VmRSS:");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(&ca)));
    let address: std::net::SocketAddr = url.trim_start_matches("https://").trim_end_matches("/v1/sync").parse().unwrap();
    let open = |i: usize| {
        let connector = connector.clone();
        async move {
            let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i / 64) as u8);
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind((source, 0).into()).unwrap();
            let tcp = socket.connect(address).await.ok()?;
            let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
            let mut tls = connector.connect(name, tcp).await.ok()?;
            let send = async {
                if i.is_multiple_of(2) {
                    let head = "POST /v1/sync HTTP/1.1\r\nhost: agentgate-meter-api\r\ncontent-type: application/json\r\ncontent-length: 2000000\r\n\r\n";
                    write_all(&mut tls, head.as_bytes()).await?;
                    for _ in 0..19 {
                        write_all(&mut tls, &[b' '; 100_000]).await?;
                    }
                } else {
                    write_all(&mut tls, b"POST /v1/sync HTTP/1.1\r\nhost: agentgate-meter-api\r\n").await?;
                    // Few long lines: hyper refuses a head of more than 100 header lines.
                    for line in 0..39 {
                        write_all(&mut tls, format!("x-pad-{line}: {}\r\n", "a".repeat(9_990)).as_bytes()).await?;
                    }
                }
                flush(&mut tls).await
            };
            // A server that stops reading (it answered, or closed) fails or stalls the writes.
            let sent = matches!(tokio::time::timeout(Duration::from_secs(30), send).await, Ok(Ok(())));
            Some((sent, tls))
        }
    };
    let connections: Vec<_> = futures::future::join_all((0..512).map(open)).await;
    let sent = connections.iter().flatten().filter(|(sent, _)| *sent).count();
    // The operator has taken all it reads of them: it serves the meter after them.
    let (status, answer) = post(&api, &url, &token, &sync_body("legit", 2, "0.10")).await.unwrap();
    let peak = proc_status_kib(pid, "VmHWM:");
    println!(
        "{} of 512 connections opened, {sent} sent all they meant to; operator RSS {} MiB before, peak {} MiB (+{} MiB)",
        connections.iter().flatten().count(),
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024
    );
    assert_eq!(status, 200, "the meter is served after the flood: {answer}");
    assert!(peak.saturating_sub(before) < 64 * 1024, "the operator grew by {} MiB", peak.saturating_sub(before) / 1024);
    drop(connections);
    drop(operator);
}

/// The operator's metrics port (`/metrics`, and the kubelet's `/healthz` and `/readyz` probes)
/// is open to every Pod unless a NetworkPolicy narrows it (the chart's `networkPolicy.metrics.from`
/// is empty by default). Eight Pods' addresses open 128 connections each and send 390 KB of
/// header lines they never finish: `axum::serve` kept every connection, each with up to 408 KiB
/// of head, for as long as its client trickled. Now the port has the meter API's bounds: 64
/// connections per address, heads of at most 16 KiB within 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_heads_on_the_metrics_port_cannot_fill_the_operators_memory() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Victim { operator, metrics_port, .. } = victim("metrics-port-heads").await;
    let pid = operator.pid();
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = proc_status_kib(pid, "VmRSS:");
    let open = |i: usize| async move {
        let source = std::net::Ipv4Addr::new(127, 0, 0, 20 + (i / 128) as u8);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let mut tcp = socket.connect(([127, 0, 0, 1], metrics_port).into()).await.ok()?;
        let send = async {
            write_all(&mut tcp, b"GET /metrics HTTP/1.1\r\nhost: agentgate\r\n").await?;
            for line in 0..39 {
                write_all(&mut tcp, format!("x-pad-{line}: {}\r\n", "a".repeat(9_990)).as_bytes()).await?;
            }
            flush(&mut tcp).await
        };
        let sent = matches!(tokio::time::timeout(Duration::from_secs(30), send).await, Ok(Ok(())));
        Some((sent, tcp))
    };
    let connections: Vec<_> = futures::future::join_all((0..1024).map(open)).await;
    let sent = connections.iter().flatten().filter(|(sent, _)| *sent).count();
    // The probe the kubelet sends, answered after the flood was sent.
    let (status, body) = http_get(metrics_port, "/healthz");
    let peak = proc_status_kib(pid, "VmHWM:");
    println!(
        "{} of 1024 connections opened, {sent} sent all 390 KB; operator RSS {} MiB before, peak {} MiB (+{} MiB)",
        connections.iter().flatten().count(),
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024
    );
    assert!(status.contains("200"), "/healthz after the flood: {status} {body}");
    assert!(peak.saturating_sub(before) < 64 * 1024, "the operator grew by {} MiB", peak.saturating_sub(before) / 1024);
    drop(connections);
    drop(operator);
}
