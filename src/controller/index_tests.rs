use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::*;
use crate::api::AgentJob;

fn pod(namespace: &str, name: &str, node: Option<&str>, phase: &str, owner: Option<(&str, &str, bool)>, label_uid: Option<&str>) -> Pod {
    let owners: Vec<Value> = owner
        .map(|(kind, uid, controller)| {
            json!({"apiVersion": if kind == "AgentJob" { "agentgate.dev/v1alpha1" } else { "apps/v1" },
            "kind": kind, "name": "x", "uid": uid, "controller": controller})
        })
        .into_iter()
        .collect();
    let labels = label_uid.map(|uid| json!({"agentgate.dev/job-uid": uid})).unwrap_or(json!({}));
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": namespace, "ownerReferences": owners, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {"cpu": "100m", "memory": "1Mi"}}}]},
        "status": {"phase": phase}}))
    .unwrap()
}

fn agent_pod(namespace: &str, name: &str, job_uid: &str, node: &str, phase: &str) -> Pod {
    pod(namespace, name, Some(node), phase, Some(("AgentJob", job_uid, true)), Some(job_uid))
}

fn keys(pairs: &[(&str, &str)]) -> BTreeSet<Key> {
    pairs.iter().map(|(ns, n)| (ns.to_string(), n.to_string())).collect()
}

fn cpu_on(index: &PodIndex, node: &str) -> i128 {
    index.used_on(node).map_or(0, |r| r.cpu_milli)
}

#[test]
fn a_jobs_candidates_are_the_pods_it_controls_in_its_namespace_and_those_labelled_with_its_uid() {
    let mut index = PodIndex::default();
    for p in [
        agent_pod("team", "scan-a-1", "uid-1", "n1", "Running"),
        agent_pod("team", "other-a-1", "uid-2", "n1", "Running"),
        // Controlled by uid-1 but in another namespace: not a candidate by ownership, only by label.
        pod("elsewhere", "forged", Some("n1"), "Running", Some(("AgentJob", "uid-1", true)), None),
        pod("team", "decoy", None, "Pending", None, Some("uid-1")),
        pod("web", "nginx", Some("n2"), "Running", Some(("ReplicaSet", "rs-1", true)), None),
    ] {
        assert!(index.apply(&Event::Apply(p)).is_empty());
    }
    assert_eq!(index.job_candidates("team", "uid-1"), keys(&[("team", "scan-a-1"), ("team", "decoy")]));
    assert_eq!(index.job_candidates("elsewhere", "uid-1"), keys(&[("elsewhere", "forged"), ("team", "scan-a-1"), ("team", "decoy")]));
    assert!(index.job_candidates("team", "uid-3").is_empty());
    assert_eq!((cpu_on(&index, "n1"), cpu_on(&index, "n2")), (300, 100));
}

#[test]
fn a_pod_that_finishes_goes_or_moves_releases_its_node_once() {
    let mut index = PodIndex::default();
    let running = pod("web", "a", Some("n1"), "Running", Some(("ReplicaSet", "rs", true)), None);
    assert!(index.apply(&Event::Apply(running.clone())).is_empty());
    // A status update that changes nothing the index keeps releases nothing.
    assert!(index.apply(&Event::Apply(running.clone())).is_empty());
    let failed = pod("web", "a", Some("n1"), "Failed", Some(("ReplicaSet", "rs", true)), None);
    assert_eq!(index.apply(&Event::Apply(failed.clone())), vec![Released { node: "n1".into(), namespace: "web".into() }]);
    assert_eq!(cpu_on(&index, "n1"), 0);
    assert!(index.used().is_empty(), "an emptied node leaves no entry");
    // Its deletion later frees nothing more.
    assert!(index.apply(&Event::Delete(failed)).is_empty());

    assert!(index.apply(&Event::Apply(running.clone())).is_empty());
    assert_eq!(index.apply(&Event::Delete(running)), vec![Released { node: "n1".into(), namespace: "web".into() }]);
    // A Pending Pod bound to no node holds and releases nothing.
    let pending = pod("web", "b", None, "Pending", None, None);
    assert!(index.apply(&Event::Apply(pending.clone())).is_empty());
    assert!(index.apply(&Event::Delete(pending)).is_empty());
    assert!(index.job_candidates("web", "rs").is_empty(), "only AgentJob controllers are indexed");
}

#[test]
fn a_relist_replaces_the_index_and_reports_what_went_meanwhile() {
    let mut index = PodIndex::default();
    for p in [agent_pod("team", "kept", "uid-1", "n1", "Running"), agent_pod("team", "gone", "uid-1", "n2", "Running")] {
        index.apply(&Event::Apply(p));
    }
    assert_eq!(index.apply(&Event::Init), vec![]);
    // Until InitDone the old entries stay in force.
    assert!(index.apply(&Event::InitApply(agent_pod("team", "kept", "uid-1", "n1", "Running"))).is_empty());
    assert!(index.apply(&Event::InitApply(agent_pod("team", "new", "uid-1", "n1", "Succeeded"))).is_empty());
    assert_eq!(index.job_candidates("team", "uid-1"), keys(&[("team", "kept"), ("team", "gone")]));
    let released = index.apply(&Event::InitDone);
    assert_eq!(released, vec![Released { node: "n2".into(), namespace: "team".into() }]);
    assert_eq!(index.job_candidates("team", "uid-1"), keys(&[("team", "kept"), ("team", "new")]));
    assert_eq!((cpu_on(&index, "n1"), cpu_on(&index, "n2")), (100, 0));
    // An empty relist empties it.
    index.apply(&Event::Init);
    index.apply(&Event::InitDone);
    assert!(index.job_candidates("team", "uid-1").is_empty());
    assert!(index.used().is_empty());
}

/// A job in `phase` with priority and creation minute, naming tool `t`, short of `short`.
fn job(namespace: &str, name: &str, priority: i32, minute: u32, phase: &str, short: &[&str]) -> AgentJob {
    serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                     "creationTimestamp": format!("2026-01-01T12:{minute:02}:00Z")},
        "spec": {"category": "c", "priority": priority, "agents": {"primary": {"name": "a", "image": "i", "model": "gpt-4o-mini"}},
                 "resources": {"cpu": "500m", "memory": "1Mi"},
                 "tools": [{"name": "t"}], "budget": {"maxCostUSD": "1"}},
        "status": {"phase": phase, "insufficientResources": short},
    }))
    .unwrap()
}

fn names(keys: impl IntoIterator<Item = Key>) -> Vec<String> {
    keys.into_iter().map(|k| k.1).collect()
}

#[test]
fn waiting_jobs_are_kept_in_queue_order_and_leave_it_when_they_start_or_go() {
    let mut index = JobIndex::default();
    for j in [
        job("team", "late", 5, 40, "WaitingForResources", &["cpu"]),
        job("team", "urgent", 1, 59, "WaitingForResources", &["cpu"]),
        job("team", "early", 5, 10, "WaitingForResources", &["quota/q"]),
        job("team", "voting", 5, 0, "AwaitingApproval", &[]),
        job("team", "busy", 5, 0, "Running", &[]),
        job("team", "done", 5, 0, "Succeeded", &[]),
    ] {
        index.apply(&Event::Apply(j));
    }
    assert_eq!(names(index.waiting().map(|(k, _)| k)), ["urgent", "early", "late"]);
    let minute = |m: u32| Some(format!("2026-01-01T12:{m:02}:00Z").parse().unwrap());
    assert_eq!(names(index.waiting_up_to(5, minute(10))), ["urgent", "early"]);
    assert_eq!(names(index.waiting_up_to(0, minute(59))), Vec::<String>::new());
    assert_eq!(names(index.awaiting_approval()), ["voting"]);
    assert_eq!(names(index.running_naming("t")), ["busy"]);
    assert_eq!(names(index.unfinished_naming("t")), ["busy", "early", "late", "urgent", "voting"]);
    assert_eq!(index.by_uid("uid-early"), Some(("team".to_string(), "early".to_string())));

    index.apply(&Event::Apply(job("team", "urgent", 1, 59, "Running", &[])));
    index.apply(&Event::Delete(job("team", "late", 5, 40, "WaitingForResources", &["cpu"])));
    assert_eq!(names(index.waiting().map(|(k, _)| k)), ["early"]);
    assert_eq!(names(index.running_naming("t")), ["busy", "urgent"]);
    assert_eq!(index.by_uid("uid-late"), None);

    // A relist that no longer lists "busy" drops it everywhere.
    index.apply(&Event::Init);
    for j in [job("team", "urgent", 1, 59, "Running", &[]), job("team", "early", 5, 10, "WaitingForResources", &["quota/q"])] {
        index.apply(&Event::InitApply(j));
    }
    index.apply(&Event::InitDone);
    assert_eq!(names(index.running_naming("t")), ["urgent"]);
    assert_eq!(names(index.awaiting_approval()), Vec::<String>::new());
    assert_eq!(index.by_uid("uid-busy"), None);
}

#[test]
fn a_release_wakes_only_the_waiting_jobs_it_could_let_start() {
    let mut index = JobIndex::default();
    for j in [
        job("team", "short-of-cpu", 5, 0, "WaitingForResources", &["cpu"]),
        job("team", "short-of-quota", 5, 1, "WaitingForResources", &["quota/q"]),
        job("other", "quota-elsewhere", 5, 2, "WaitingForResources", &["quota/q"]),
        job("team", "rate-limited", 5, 3, "WaitingForResources", &[]),
        job("team", "voting", 5, 4, "AwaitingApproval", &["cpu"]),
    ] {
        index.apply(&Event::Apply(j));
    }
    let free = |cpu: i128| Resources { cpu_milli: cpu, memory_bytes: 1 << 30, ..Resources::default() };
    // The job's Pod needs 600m (500m for the agent, 100m for its meter sidecar): a node left with
    // 550m cannot take it, one with 600m can.
    assert_eq!(names(index.unblocked_by(Some(&free(550)), "team")), ["short-of-quota"]);
    assert_eq!(names(index.unblocked_by(Some(&free(600)), "team")), ["short-of-cpu", "short-of-quota"]);
    assert_eq!(names(index.unblocked_by(Some(&free(400)), "web")), Vec::<String>::new());
    assert_eq!(names(index.unblocked_by(None, "other")), ["quota-elsewhere"]);
}

#[test]
fn votes_are_found_by_the_job_they_name_in_their_namespace() {
    let vote = |namespace: &str, name: &str, job: &str| -> ApprovalVote {
        serde_json::from_value(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "ApprovalVote",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"jobRef": {"name": job, "uid": "u", "generation": 1}, "voter": "alice", "decision": "Approve"}}))
        .unwrap()
    };
    let mut index = VoteIndex::default();
    for v in [vote("team", "a", "scan"), vote("team", "b", "scan"), vote("other", "c", "scan"), vote("team", "d", "build")] {
        index.apply(&Event::Apply(v));
    }
    assert_eq!(index.naming("team", "scan"), ["a", "b"]);
    // A vote cannot be moved to another job in place (jobRef is immutable), but an index must not care.
    index.apply(&Event::Apply(vote("team", "b", "build")));
    index.apply(&Event::Delete(vote("team", "a", "scan")));
    assert!(index.naming("team", "scan").is_empty());
    assert_eq!(index.naming("team", "build"), ["b", "d"]);
    index.apply(&Event::Init);
    index.apply(&Event::InitApply(vote("other", "c", "scan")));
    index.apply(&Event::InitDone);
    assert!(index.naming("team", "build").is_empty());
    assert_eq!(index.naming("other", "scan"), ["c"]);
}

#[test]
fn quotas_are_found_by_namespace_through_relists() {
    let quota =
        |ns: &str, name: &str| -> ResourceQuota { serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}})).unwrap() };
    let mut index = QuotaIndex::default();
    index.apply(&Event::Apply(quota("team-a", "cpu")));
    index.apply(&Event::Apply(quota("team-a", "gpu")));
    index.apply(&Event::Apply(quota("team-b", "cpu")));
    assert_eq!(index.in_namespace("team-a"), vec![("team-a".into(), "cpu".into()), ("team-a".into(), "gpu".into())]);
    index.apply(&Event::Delete(quota("team-a", "gpu")));
    assert_eq!(index.in_namespace("team-a"), vec![("team-a".to_string(), "cpu".to_string())]);
    // A relist that no longer lists team-a's quota drops it; team-b's stays.
    for event in [Event::Init, Event::InitApply(quota("team-b", "cpu")), Event::InitDone] {
        index.apply(&event);
    }
    assert!(index.in_namespace("team-a").is_empty());
    assert_eq!(index.in_namespace("team-b").len(), 1);
    assert!(index.in_namespace("nowhere").is_empty());
}

#[test]
fn a_requester_is_indexed_from_the_annotation_and_a_relist_replaces_them() {
    use kube::runtime::watcher::Event;
    let job = |name: &str, requester: Option<&str>| -> AgentJob {
        let annotations = requester.map(|r| serde_json::json!({crate::api::REQUESTED_BY: r})).unwrap_or(serde_json::json!({}));
        serde_json::from_value(serde_json::json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": name, "namespace": "team", "uid": format!("uid-{name}"), "annotations": annotations},
            "spec": {"category": "c", "agents": {"primary": {"name": "a", "image": "i", "model": "m"}}, "budget": {"maxCostUSD": "1"}}}))
        .unwrap()
    };
    let mut index = super::RequesterIndex::default();
    index.apply(&Event::Apply(job("a", Some("alice"))));
    index.apply(&Event::Apply(job("b", None)));
    assert_eq!((index.of("uid-a").as_deref(), index.of("uid-b")), (Some("alice"), None));
    assert_eq!(index.of("uid-of-a-recreated-a"), None, "an entry answers for its own job only");
    index.apply(&Event::Init);
    index.apply(&Event::InitApply(job("b", Some("bob"))));
    assert_eq!(index.of("uid-a").as_deref(), Some("alice"), "the old entries serve until the relist is done");
    index.apply(&Event::InitDone);
    assert_eq!((index.of("uid-a"), index.of("uid-b").as_deref()), (None, Some("bob")));
    index.apply(&Event::Delete(job("b", Some("bob"))));
    assert_eq!(index.objects(), 0);
}

#[test]
fn a_uid_is_kept_in_sixteen_bytes_and_only_equal_texts_are_one_uid() {
    let uuid = "50e68a4d-4412-4de4-bcf6-460940d0db1f";
    assert!(matches!(Uid::of(uuid), Uid::Uuid(_)));
    assert_ne!(Uid::of(uuid), Uid::of("50e68a4d-4412-4de4-bcf6-460940d0db1e"));
    assert_ne!(Uid::of(uuid), Uid::of("40e68a4d-4412-4de4-bcf6-460940d0db1f"));
    for other in
        ["50E68A4D-4412-4DE4-BCF6-460940D0DB1F", "uid-1", "50e68a4d-4412-4de4-bcf6-460940d0db1g", "50e68a4d44124de4bcf6460940d0db1f0000"]
    {
        assert_eq!(Uid::of(other), Uid::Other(other.into()), "{other}");
    }
}

#[test]
fn a_few_stays_sorted_and_without_duplicates_past_its_vec() {
    let mut few = Few::default();
    let order: Vec<u32> = (0..100).map(|i| (i * 37) % 100).collect();
    for (n, &i) in order.iter().enumerate() {
        few.insert(i);
        few.insert(i);
        let mut expected: Vec<u32> = order[..=n].to_vec();
        expected.sort();
        assert_eq!(few.iter().copied().collect::<Vec<_>>(), expected, "after {} inserts", n + 1);
    }
    assert!(matches!(few, Few::Many(_)), "a hundred make it a BTreeSet");
    for i in 0..100 {
        few.remove(&i);
    }
    assert!(few.is_empty());
    let mut small = Few::default();
    for name in ["b", "a", "c"] {
        small.insert(name);
    }
    small.remove(&"b");
    assert!(matches!(&small, Few::Sorted(v) if v == &["a", "c"]));
}
