//! Asking the model, through the agent meter: one Chat Completions call per judgement, bounded
//! in time and in the size of what is read back.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};

use super::judge::{ModelSettings, Opinion, read_answer, request};
use crate::api::AgentJob;
use crate::meter::proxy::HttpsClient;

/// A completion far larger than the answer's cap is not an answer.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

pub struct Model {
    pub settings: ModelSettings,
    client: HttpsClient,
}

impl Model {
    pub fn new(settings: ModelSettings) -> anyhow::Result<Model> {
        Ok(Model { settings, client: crate::meter::client()? })
    }

    /// The model's opinion of `job`, or why there is none (an error, a refusal by the meter's
    /// budget, a timeout, an answer that is not the JSON asked for).
    pub async fn ask(&self, job: &AgentJob, checked: &str) -> Result<Opinion, String> {
        let timeout = Duration::from_secs(self.settings.timeout_seconds);
        match tokio::time::timeout(timeout, self.call(job, checked)).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("did not answer within {}s", self.settings.timeout_seconds)),
        }
    }

    async fn call(&self, job: &AgentJob, checked: &str) -> Result<Opinion, String> {
        let body = serde_json::to_vec(&request(&self.settings, job, checked)).map_err(|e| e.to_string())?;
        let url = format!("{}/chat/completions", self.settings.url.trim_end_matches('/'));
        let req = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            // The meter holds the provider's key and puts it in place of this one.
            .header(http::header::AUTHORIZATION, "Bearer agentgate-review")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("building the request to {url}: {e}"))?;
        let response = self.client.request(req).await.map_err(|e| format!("calling {url}: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer from {url}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            // The meter's refusals (402 budget_exceeded) and the provider's errors say why in their body.
            let why = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(format!("answered HTTP {status}: {why}"));
        }
        read_answer(&body)
    }
}
