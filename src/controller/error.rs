//! What a reconcile can fail at, one enum per step that makes API calls, each variant naming the
//! call and the object, so a log line or an Event says what failed on what without a backtrace.
//!
//! An AgentJob's reconcile reads the caches, then (`ObserveError`) asks the API what they cannot
//! tell, decides (pure: it cannot fail), applies the plan (`ApplyError`) and reports (Events and
//! vote verdicts, queued or logged: nothing there fails the reconcile). An AgentTool's has one
//! step (`ToolError`). [`Error::metric_label`] is the bounded label of the failure metric.

/// Asking the API what the watch caches cannot tell.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("SubjectAccessReview: may {voter} approve category {category} in namespace {namespace}: {source}")]
    HeadCheck { voter: String, category: String, namespace: String, source: kube::Error },
    #[error("SubjectAccessReview: may {voter} act as {writer}, who wrote the job or voted on it: {source}")]
    ActAsCheck { voter: String, writer: String, source: kube::Error },
    #[error("GET Pod {namespace}/{pod}, named by the running attempt but not in the cache: {source}")]
    GonePod { namespace: String, pod: String, source: kube::Error },
    #[error("GET AgentJob {namespace}/{job}, whose input the cache leaves out: {source}")]
    GetJob { namespace: String, job: String, source: kube::Error },
    #[error("GET AgentJob {namespace}/{job}, to confirm it still stands before taking back its Pods: {source}")]
    RecheckJob { namespace: String, job: String, source: kube::Error },
}

/// Carrying out a plan: Pods, then status, then the Pods' usage finalizers.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("POST ControllerRevision {namespace}/{revision}, the spec of this generation: {source}")]
    StoreSpec { namespace: String, revision: String, source: kube::Error },
    #[error("GET Secret {namespace}/{secret}, the meter's provider keys: {source}")]
    GetMeterKeys { namespace: String, secret: String, source: kube::Error },
    #[error("POST Pod {namespace}/{pod}: {source}")]
    CreatePod { namespace: String, pod: String, source: kube::Error },
    #[error("GET Pod {namespace}/{pod}, whose name was taken when creating it: {source}")]
    GetTakenPod { namespace: String, pod: String, source: kube::Error },
    #[error(
        "Pod {pod} already exists and is not controlled by this job (another job's, or made by someone else); it is never adopted: rename the job or the agent, or delete that Pod"
    )]
    PodNameTaken { pod: String },
    #[error("encoding the status of AgentJob {namespace}/{job}: {source}")]
    EncodeStatus { namespace: String, job: String, source: serde_json::Error },
    #[error("PUT status of AgentJob {namespace}/{job}: {source}")]
    WriteStatus { namespace: String, job: String, source: kube::Error },
    #[error("PATCH Pod {namespace}/{pod} to remove its usage finalizer: {source}")]
    ReleaseFinalizer { namespace: String, pod: String, source: kube::Error },
    #[error("PATCH Pod {namespace}/{pod} to give it back its AgentJob ownerReference: {source}")]
    TakeBackPod { namespace: String, pod: String, source: kube::Error },
    #[error("DELETE Pod {namespace}/{pod}, whose job is deleted: {source}")]
    StopPod { namespace: String, pod: String, source: kube::Error },
}

/// An AgentTool's reconcile.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("GET Secret {namespace}/{secret}, the credentials of AgentTool {tool}: {source}")]
    GetCredentials { tool: String, namespace: String, secret: String, source: kube::Error },
    #[error("server-side apply of the status of AgentTool {tool}: {source}")]
    WriteStatus { tool: String, source: kube::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Tool(#[from] ToolError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The failed call, as a label of `agentgate_reconcile_errors_total`: one of a fixed few,
    /// never an object's name.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Observe(ObserveError::HeadCheck { .. }) => "head_check",
            Error::Observe(ObserveError::ActAsCheck { .. }) => "act_as_check",
            Error::Observe(ObserveError::GonePod { .. }) => "get_gone_pod",
            Error::Observe(ObserveError::GetJob { .. }) => "get_job",
            Error::Observe(ObserveError::RecheckJob { .. }) => "recheck_job",
            Error::Apply(ApplyError::StoreSpec { .. }) => "store_spec",
            Error::Apply(ApplyError::GetMeterKeys { .. }) => "get_meter_keys",
            Error::Apply(ApplyError::CreatePod { .. }) => "create_pod",
            Error::Apply(ApplyError::GetTakenPod { .. }) => "get_taken_pod",
            Error::Apply(ApplyError::PodNameTaken { .. }) => "pod_name_taken",
            Error::Apply(ApplyError::EncodeStatus { .. }) => "encode_status",
            Error::Apply(ApplyError::WriteStatus { source, .. }) if is_conflict(source) => "status_conflict",
            Error::Apply(ApplyError::WriteStatus { .. }) => "write_status",
            Error::Apply(ApplyError::ReleaseFinalizer { .. }) => "release_finalizer",
            Error::Apply(ApplyError::TakeBackPod { .. }) => "take_back_pod",
            Error::Apply(ApplyError::StopPod { .. }) => "stop_pod",
            Error::Tool(ToolError::GetCredentials { .. }) => "get_tool_credentials",
            Error::Tool(ToolError::WriteStatus { .. }) => "write_tool_status",
        }
    }

    /// A status write refused because the decision was made on a stale copy: the watch brings
    /// the newer one and triggers the reconcile again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Apply(ApplyError::WriteStatus { source, .. }) if is_conflict(source))
    }
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status { code, message: "refused".into(), ..kube::core::Status::default() }))
    }

    #[test]
    fn errors_name_the_call_and_the_object_and_label_the_call_only() {
        let write = |code| Error::from(ApplyError::WriteStatus { namespace: "team".into(), job: "scan".into(), source: api_error(code) });
        let conflict = write(409);
        assert!(conflict.is_conflict());
        assert_eq!(conflict.metric_label(), "status_conflict");
        assert_eq!((write(500).is_conflict(), write(500).metric_label()), (false, "write_status"));
        let message = write(500).to_string();
        assert!(message.starts_with("PUT status of AgentJob team/scan: "), "{message}");
        let head = Error::from(ObserveError::HeadCheck {
            voter: "alice".into(),
            category: "payments".into(),
            namespace: "team".into(),
            source: api_error(500),
        });
        assert!(head.to_string().contains("alice") && head.to_string().contains("payments"), "{head}");
        assert_eq!(head.metric_label(), "head_check");
    }
}
