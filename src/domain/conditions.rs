//! `metav1.Condition` types and bookkeeping: a transition time only moves when the status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{Condition, Text};

/// Condition types, as `kubectl wait --for=condition=...` and kstatus read them.
pub mod condition {
    pub const ESTIMATED: &str = "Estimated";
    pub const INFRASTRUCTURE_READY: &str = "InfrastructureReady";
    pub const APPROVED: &str = "Approved";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const READY: &str = "Ready";
    pub const RECONCILING: &str = "Reconciling";
    pub const STALLED: &str = "Stalled";
    pub const USAGE_REPORTED: &str = "UsageReported";
    pub const SPEC_CHANGE_PENDING: &str = "SpecChangePending";
}

pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<Text>,
    generation: i64,
    now: &Time,
) {
    let status = Text::from(if status { "True" } else { "False" });
    // Messages quote what tenants wrote (an input's keys, an agent's report): one line, nothing a
    // terminal acts on (`tests::a_condition_message_quoting_a_tenant_is_one_inert_line`).
    let message = message.into();
    let message = match super::terminal_text::message(&message) {
        std::borrow::Cow::Borrowed(_) => message,
        std::borrow::Cow::Owned(escaped) => Text::from(escaped),
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.clone();
            }
            c.status = status;
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = Some(generation);
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message,
            observed_generation: Some(generation),
            last_transition_time: now.clone(),
        }),
    }
}

pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_message_quoting_a_tenant_is_one_inert_line() {
        let mut conditions = Vec::new();
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let quoted = "input/x\x1b[2K\u{202E}: \"a\"\nApproved=True (Approved): 2/2";
        set_condition(&mut conditions, condition::READY, false, "InvalidInput", quoted, 1, &now);
        assert_eq!(&*conditions[0].message, r#"input/x\u001B[2K\u202E: "a"\nApproved=True (Approved): 2/2"#);
        set_condition(&mut conditions, condition::READY, false, "InvalidInput", "plain \\d stays", 1, &now);
        assert_eq!(&*conditions[0].message, r"plain \d stays");
    }
}
