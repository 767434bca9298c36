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
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::{ControlPlane, OperatorProcess};
use support::http::{free_port, http_get};

const TIMEOUT: Duration = Duration::from_secs(60);
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

/// A Pod-bound token of audience agentgate.dev/meter, as the kubelet projects into the meter.
async fn meter_token(admin: &Client, ns: &str, pod: &Pod) -> String {
    let bound = json!({"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(), "uid": pod.metadata.uid.clone()});
    let request: TokenRequest = serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [AUDIENCE], "boundObjectRef": bound, "expirationSeconds": 3600}}))
    .unwrap();
    let answer = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request("default", &PostParams::default(), &request)
        .await
        .unwrap();
    answer.status.and_then(|s| s.token).expect("a token")
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

/// 1,500 junk bearer tokens (distinct strings, and JWTs claiming the victim's own Pod with a
/// forged signature: the one a tenant of the namespace can write, knowing its Pod's name and uid)
/// sent 100 at a time: without a bound, each was one TokenReview, and the apiserver's answers to
/// them queued every team's meters behind the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_tokens_costs_the_apiserver_a_bounded_number_of_token_reviews_and_meters_are_served_meanwhile() {
    let ns = "meter-api-flood";
    let admin = Env::builder(ns).node("flood-node", "64", "256Gi", &[]).operator(OperatorMode::Later).build().await.admin;
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

    let spec = json!({"category": "payments", "agents": {"primary": {"name": "agent", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"}},
        "resources": {"cpu": "100m", "memory": "128Mi"}, "budget": {"maxCostUSD": "1"}});
    let job =
        Api::<AgentJob>::namespaced(admin.clone(), ns).create(&PostParams::default(), &agent_job("victim", spec, json!({}))).await.unwrap();
    let cp = ControlPlane::shared();
    vote(&cp.client("alice").await, &job, "alice", Decision::Approve).await;
    vote(&cp.client("bob").await, &job, "bob", Decision::Approve).await;
    let pods = wait_for("the agent Pod", TIMEOUT, || job_pods(&admin, ns, &job), |p: &Vec<Pod>| p.len() == 1).await;
    run_pod(&admin, ns, &pods[0].name_any()).await;
    let token = meter_token(&admin, ns, &pods[0]).await;
    let (status, answer) = post(&api, &url, &token, &sync_body("legit", 1, "0.10")).await.unwrap();
    assert_eq!(status, 200, "the meter is served before the flood: {answer}");

    // The forgeries: the real token's header and claims, another signature.
    let (signed, _) = token.rsplit_once('.').unwrap();
    let forged = |i: usize| format!("{signed}.{}", format!("{i:08}").repeat(43));
    let junk: Vec<String> = (0..1000).map(|i| format!("junk-{i}-{}", "x".repeat(i % 50))).chain((0..300).map(forged)).collect();
    // One forgery sent again and again, as a dumb flooder does.
    let repeated = forged(999_999);
    let before = token_reviews(&admin).await;
    let api = Arc::new(api);
    let (flood_api, flood_url) = (api.clone(), url.clone());
    let flood = futures::stream::iter(junk.into_iter().chain(std::iter::repeat_n(repeated, 200)))
        .map(move |bearer| {
            let (api, url) = (flood_api.clone(), flood_url.clone());
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
    println!("the flood of 1,500 junk tokens cost {reviews} TokenReviews");
    assert!(metrics.contains("agentgate_meter_api_requests_total{outcome=\"token_rejected\"}"), "{metrics}");
    drop(operator);
}
