//! The groups of a job's writers (its author and spec editors), as admission recorded them in
//! `agentgate.dev/writer-groups` (deploy/admission/identity.yaml): one line per writer, the
//! username then its groups, tab-separated.
//!
//! Whether a writer may act as a trusted robot (and so cast its vote on what they wrote) is
//! asked of RBAC with these groups: rights are commonly granted to an identity provider's
//! groups, and asked as a bare username the writer may do nothing (tests/gate_attacks.rs
//! a_robot_vote_cast_by_the_author_through_her_group_does_not_count).

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The groups `writer` had when they wrote the job: their line in `recorded`, else, for a
/// ServiceAccount, the groups the apiserver always gives it. None for a person with no line (a
/// job written before admission recorded groups): their group rights cannot be known.
pub fn groups_of(recorded: &str, writer: &str) -> Option<Vec<String>> {
    let line = recorded.lines().find_map(|line| {
        let mut fields = line.split('\t');
        (fields.next() == Some(writer)).then(|| fields.filter(|g| !g.is_empty()).map(str::to_string).collect::<Vec<_>>())
    });
    line.or_else(|| {
        let (namespace, _) = writer.strip_prefix(SERVICE_ACCOUNT_PREFIX)?.split_once(':')?;
        Some(vec!["system:serviceaccounts".to_string(), format!("system:serviceaccounts:{namespace}"), "system:authenticated".to_string()])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writers_groups_are_their_recorded_line() {
        let recorded = "carol\tagentgate:users\tagentgate:humans\tsystem:authenticated\nbob\tagentgate:heads";
        assert_eq!(groups_of(recorded, "carol").unwrap(), ["agentgate:users", "agentgate:humans", "system:authenticated"]);
        assert_eq!(groups_of(recorded, "bob").unwrap(), ["agentgate:heads"]);
        assert_eq!(groups_of(recorded, "car"), None, "a whole username, not a prefix");
        assert_eq!(groups_of("", "carol"), None, "a person with no line: unknown");
        assert_eq!(groups_of("dave\t", "dave").unwrap(), Vec::<String>::new(), "recorded with no groups");
    }

    #[test]
    fn a_service_accounts_groups_are_known_without_a_line() {
        let groups = groups_of("", "system:serviceaccount:team-a:ci").unwrap();
        assert!(groups.contains(&"system:serviceaccounts:team-a".to_string()), "{groups:?}");
    }
}
