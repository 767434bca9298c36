use super::*;

fn svc(ns: &str, name: &str, tool: &str, annotations: &[(&str, &str)]) -> ServiceView {
    ServiceView {
        namespace: ns.into(),
        name: name.into(),
        tool: tool.into(),
        annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ports: vec![(Some("http".into()), 8080), (Some("metrics".into()), 9090)],
    }
}

fn good(ns: &str, name: &str, tool: &str) -> ServiceView {
    svc(ns, name, tool, &[(RATE_LIMIT, "60")])
}

fn existing(desired: &DesiredTool, discovered: bool) -> ExistingTool {
    ExistingTool {
        name: desired.name.clone(),
        uid: Some(format!("uid-{}", desired.name)),
        discovered,
        discovered_from: discovered.then(|| desired.from.clone()),
        discovery_error: desired.error.clone(),
        discovery_conflict: desired.conflict.clone(),
        spec: desired.spec.clone(),
    }
}

fn everywhere(_: &str) -> bool {
    true
}

fn applied(plan: &Plan) -> Vec<(String, String, bool)> {
    plan.writes
        .iter()
        .filter_map(|w| match w {
            Write::Apply { tool, create, .. } => Some((tool.name.clone(), tool.from.clone(), *create)),
            Write::Delete { .. } => None,
        })
        .collect()
}

fn deleted(plan: &Plan) -> Vec<String> {
    plan.writes
        .iter()
        .filter_map(|w| match w {
            Write::Delete { name, .. } => Some(name.clone()),
            Write::Apply { .. } => None,
        })
        .collect()
}

fn warnings(plan: &Plan) -> Vec<(String, &'static str)> {
    plan.warnings.iter().map(|w| (format!("{}/{}", w.namespace, w.service), w.reason)).collect()
}

#[test]
fn spec_comes_from_the_annotations() {
    let s = svc(
        "tools",
        "bandit",
        "bandit-scanner",
        &[(TOOL_TYPE, "mcp"), (RATE_LIMIT, " 60 "), (PORT, "metrics"), (DESCRIPTION, "Python security scanner")],
    );
    let (d, problems) = desired_tool(&s);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(d.name, "bandit-scanner");
    assert_eq!(d.from, "tools/bandit");
    assert_eq!(d.error, None);
    assert_eq!(d.spec.tool_type, ToolType::Mcp);
    assert_eq!(d.spec.rate_limit, 60);
    assert_eq!(d.spec.description.as_deref(), Some("Python security scanner"));
    assert_eq!(d.spec.endpoint.service, Some(ServiceEndpoint { namespace: "tools".into(), name: "bandit".into(), port: 9090 }));
    assert_eq!(d.spec.endpoint.url, None);
}

#[test]
fn defaults_are_type_service_and_the_first_port() {
    let (d, problems) = desired_tool(&good("tools", "bandit", "bandit"));
    assert!(problems.is_empty());
    assert_eq!(d.spec.tool_type, ToolType::Service);
    assert_eq!(d.spec.endpoint.service.unwrap().port, 8080);
    assert_eq!(d.spec.description, None);
    let (d, _) = desired_tool(&svc("tools", "bandit", "bandit", &[(RATE_LIMIT, "5"), (PORT, "9090")]));
    assert_eq!(d.spec.endpoint.service.unwrap().port, 9090);
}

#[test]
fn bad_annotations_name_the_annotation_and_value_and_fall_back_to_placeholders() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[(RATE_LIMIT, "ten")], "annotation agentgate.dev/rate-limit=\"ten\" is not a whole number from 1 to 1000000"),
        (&[(RATE_LIMIT, "0")], "agentgate.dev/rate-limit=\"0\""),
        (&[(RATE_LIMIT, "-5")], "agentgate.dev/rate-limit=\"-5\""),
        (&[(RATE_LIMIT, "2000000")], "agentgate.dev/rate-limit=\"2000000\""),
        (&[], "annotation agentgate.dev/rate-limit is missing"),
        (&[(RATE_LIMIT, "5"), (TOOL_TYPE, "grpc")], "annotation agentgate.dev/tool-type=\"grpc\" is not one of api, service, mcp"),
        (
            &[(RATE_LIMIT, "5"), (PORT, "7000")],
            "annotation agentgate.dev/port=\"7000\" names no port of the Service (its ports: http=8080, metrics=9090)",
        ),
        (&[(RATE_LIMIT, "5"), (PORT, "grpc")], "annotation agentgate.dev/port=\"grpc\" names no port"),
    ];
    for (annotations, fragment) in cases {
        let (d, problems) = desired_tool(&svc("tools", "bandit", "bandit", annotations));
        assert_eq!(problems.len(), 1, "{annotations:?}: {problems:?}");
        assert!(problems[0].contains(fragment), "{annotations:?}: {:?} lacks {fragment:?}", problems[0]);
        let error = d.error.expect("error set");
        assert!(error.starts_with("Service tools/bandit: ") && error.contains(fragment), "{error}");
        assert!(d.spec.rate_limit >= 1);
        assert!(d.spec.endpoint.service.unwrap().port >= 1);
    }
    let mut no_ports = good("tools", "headless", "headless");
    no_ports.ports.clear();
    let (d, problems) = desired_tool(&no_ports);
    assert!(problems[0].contains("the Service has no ports"), "{problems:?}");
    assert_eq!(d.spec.endpoint.service.unwrap().port, 1);
}

#[test]
fn a_long_description_is_cut_to_what_the_schema_allows() {
    let long = "é".repeat(2000);
    let (d, problems) = desired_tool(&svc("tools", "t", "t", &[(RATE_LIMIT, "1"), (DESCRIPTION, &long)]));
    assert!(problems.is_empty());
    assert_eq!(d.spec.description.unwrap().chars().count(), 1024);
}

#[test]
fn a_labelled_service_yields_a_tool_and_nothing_more_once_it_matches() {
    let s = good("tools", "bandit", "bandit");
    let plan1 = plan(std::slice::from_ref(&s), &[], &everywhere);
    assert_eq!(applied(&plan1), vec![("bandit".into(), "tools/bandit".into(), true)]);
    assert!(plan1.warnings.is_empty());
    let (d, _) = desired_tool(&s);
    let plan2 = plan(std::slice::from_ref(&s), &[existing(&d, true)], &everywhere);
    assert_eq!(plan2, Plan::default(), "nothing to do when the tool already matches");
}

#[test]
fn annotation_changes_are_followed() {
    let s = good("tools", "bandit", "bandit");
    let (d, _) = desired_tool(&s);
    let mut changed = s.clone();
    changed.annotations.insert(RATE_LIMIT.into(), "120".into());
    let p = plan(&[changed], &[existing(&d, true)], &everywhere);
    match p.writes.as_slice() {
        [Write::Apply { tool, uid, create: false }] => {
            assert_eq!(tool.spec.rate_limit, 120);
            assert_eq!(uid.as_deref(), Some("uid-bandit"), "an update is guarded by the uid seen");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_bad_annotation_yields_a_tool_marked_with_the_error_and_a_warning() {
    let s = svc("tools", "bandit", "bandit", &[(RATE_LIMIT, "ten")]);
    let p = plan(&[s], &[], &everywhere);
    match p.writes.as_slice() {
        [Write::Apply { tool, .. }] => assert!(tool.error.as_deref().unwrap().contains("rate-limit=\"ten\"")),
        other => panic!("{other:?}"),
    }
    assert_eq!(warnings(&p), vec![("tools/bandit".to_string(), "InvalidToolAnnotation")]);
    assert!(
        p.warnings[0].note.contains("agentgate.dev/rate-limit=\"ten\"") && p.warnings[0].note.contains("AgentTool bandit is not Ready"),
        "{}",
        p.warnings[0].note
    );
}

#[test]
fn a_label_value_that_cannot_be_a_tool_name_yields_nothing_but_a_warning() {
    let p = plan(&[good("tools", "bandit", "Bandit_Scanner")], &[], &everywhere);
    assert!(p.writes.is_empty());
    assert_eq!(warnings(&p), vec![("tools/bandit".to_string(), "InvalidToolName")]);
    assert!(p.warnings[0].note.contains("\"Bandit_Scanner\""));
    for (name, ok) in [("a", true), ("bandit-2", true), ("", false), ("-a", false), ("a-", false), ("a.b", false), (&"a".repeat(64), false)]
    {
        assert_eq!(valid_tool_name(name), ok, "{name:?}");
    }
}

#[test]
fn the_tool_goes_when_the_label_or_the_service_does() {
    let s = good("tools", "bandit", "bandit");
    let (d, _) = desired_tool(&s);
    let p = plan(&[], &[existing(&d, true)], &everywhere);
    assert_eq!(
        p.writes,
        vec![Write::Delete {
            name: "bandit".into(),
            uid: Some("uid-bandit".into()),
            from: "tools/bandit".into(),
            why: "Service tools/bandit no longer carries label agentgate.dev/tool=bandit".into(),
        }]
    );
    // Relabelled to another name: the old tool goes and the new one comes.
    let p = plan(&[good("tools", "bandit", "bandit-v2")], &[existing(&d, true)], &everywhere);
    assert_eq!(deleted(&p), vec!["bandit".to_string()]);
    assert_eq!(applied(&p), vec![("bandit-v2".into(), "tools/bandit".into(), true)]);
}

#[test]
fn a_hand_written_tool_is_never_touched() {
    let s = good("tools", "bandit", "bandit");
    let (d, _) = desired_tool(&s);
    let mut hand = existing(&d, false);
    hand.spec.rate_limit = 7;
    let p = plan(&[s], &[hand.clone()], &everywhere);
    assert!(p.writes.is_empty(), "{:?}", p.writes);
    assert_eq!(warnings(&p), vec![("tools/bandit".to_string(), "ToolNameTaken")]);
    assert!(p.warnings[0].note.contains("name taken by a hand-written AgentTool bandit"));
    // Nor deleted when no Service claims its name.
    assert!(plan(&[], &[hand], &everywhere).writes.is_empty());
}

#[test]
fn two_services_claiming_one_name_create_nothing_and_both_are_told() {
    let p = plan(&[good("a", "x", "shared"), good("b", "y", "shared")], &[], &everywhere);
    assert!(p.writes.is_empty());
    assert_eq!(warnings(&p), vec![("a/x".to_string(), "ToolNameConflict"), ("b/y".to_string(), "ToolNameConflict")]);
    assert!(p.warnings[0].note.contains("Services a/x, b/y all claim AgentTool shared") && p.warnings[0].note.contains("none is created"));
}

#[test]
fn a_second_claimant_makes_the_tool_not_ready_and_never_takes_it_over() {
    let first = good("a", "x", "shared");
    let (d, _) = desired_tool(&first);
    let mut second = good("b", "y", "shared");
    second.annotations.insert(RATE_LIMIT.into(), "999".into());
    let p = plan(&[second.clone(), first.clone()], &[existing(&d, true)], &everywhere);
    // Still the incumbent's spec, now marked with the conflict (so not Ready).
    let Some(Write::Apply { tool, create: false, .. }) = p.writes.first() else { panic!("{:?}", p.writes) };
    assert_eq!((tool.from.as_str(), &tool.spec), ("a/x", &d.spec));
    let conflict = tool.conflict.clone().expect("conflict marked");
    assert!(conflict.contains("it stays discovered from a/x but is not Ready until the label is removed from b/y"), "{conflict}");
    assert_eq!(warnings(&p), vec![("a/x".to_string(), "ToolNameConflict"), ("b/y".to_string(), "ToolNameConflict")]);
    let marked = ExistingTool { discovery_conflict: Some(conflict), ..existing(&d, true) };
    // The incumbent's own changes are still followed, still in conflict.
    let mut first_changed = first.clone();
    first_changed.annotations.insert(RATE_LIMIT.into(), "61".into());
    let p = plan(&[second.clone(), first_changed], std::slice::from_ref(&marked), &everywhere);
    assert_eq!(applied(&p), vec![("shared".into(), "a/x".into(), false)]);
    // The squatter lets go: the conflict clears.
    let p = plan(std::slice::from_ref(&first), std::slice::from_ref(&marked), &everywhere);
    assert!(matches!(p.writes.as_slice(), [Write::Apply { tool, .. }] if tool.conflict.is_none() && tool.from == "a/x"), "{:?}", p.writes);
    assert!(p.warnings.is_empty());

    // The incumbent lets go while the squatter claims: never handed over. The tool stays with
    // a/x, not Ready, and the squatter is told.
    let p = plan(std::slice::from_ref(&second), &[existing(&d, true)], &everywhere);
    let Some(Write::Apply { tool, create: false, .. }) = p.writes.first() else { panic!("{:?}", p.writes) };
    assert_eq!((tool.from.as_str(), &tool.spec), ("a/x", &d.spec), "the tool must not move to b/y");
    let orphaned = tool.conflict.clone().unwrap();
    assert!(orphaned.contains("a tool never moves to another Service by itself") && orphaned.contains("kubectl delete agenttool shared"));
    assert_eq!(warnings(&p), vec![("b/y".to_string(), "ToolNameConflict")]);
    // Once marked, nothing more is written, however often discovery looks.
    let marked = ExistingTool { discovery_conflict: Some(orphaned), ..existing(&d, true) };
    assert!(plan(std::slice::from_ref(&second), std::slice::from_ref(&marked), &everywhere).writes.is_empty());
    // The owner's Service comes back: it is the tool's again, conflict on.
    let p = plan(&[second.clone(), first.clone()], &[marked], &everywhere);
    assert!(matches!(p.writes.as_slice(), [Write::Apply { tool, .. }] if tool.from == "a/x" && tool.conflict.is_some()));
    // After an admin deleted the tool, a sole claimant gets a new one.
    let p = plan(&[second], &[], &everywhere);
    assert_eq!(applied(&p), vec![("shared".into(), "b/y".into(), true)]);
}

#[test]
fn when_the_source_lets_go_and_several_claim_none_gets_it() {
    let (d, _) = desired_tool(&good("a", "x", "shared"));
    let p = plan(&[good("b", "y", "shared"), good("c", "z", "shared")], &[existing(&d, true)], &everywhere);
    assert!(deleted(&p).is_empty());
    assert!(matches!(p.writes.as_slice(), [Write::Apply { tool, .. }] if tool.from == "a/x" && tool.conflict.is_some()));
    assert_eq!(warnings(&p).len(), 2);
}

#[test]
fn only_namespaces_in_scope_are_discovered_and_tools_from_elsewhere_are_left_alone() {
    let only_tools = |ns: &str| ns == "tools";
    let p = plan(&[good("tools", "a", "a"), good("other", "b", "b")], &[], &only_tools);
    assert_eq!(applied(&p), vec![("a".into(), "tools/a".into(), true)]);
    // A tool discovered from a namespace out of scope is neither deleted nor taken over.
    let (d, _) = desired_tool(&good("other", "b", "b"));
    let p = plan(&[], &[existing(&d, true)], &only_tools);
    assert!(p.writes.is_empty());
    let p = plan(&[good("tools", "c", "b")], &[existing(&d, true)], &only_tools);
    assert!(p.writes.is_empty());
    assert_eq!(warnings(&p), vec![("tools/c".to_string(), "ToolNameTaken")]);
    assert!(p.warnings[0].note.contains("discovered from other/b, outside the namespaces"));
}

#[test]
fn credentials_added_to_a_discovered_tool_by_hand_are_left_alone() {
    let s = good("tools", "bandit", "bandit");
    let (d, _) = desired_tool(&s);
    let mut tool = existing(&d, true);
    tool.spec.credentials = Some(crate::api::ToolCredentials {
        secret_ref: crate::api::NamespacedSecretKey { namespace: "tools".into(), name: "bandit-key".into(), key: "token".into() },
    });
    assert_eq!(plan(&[s], &[tool], &everywhere), Plan::default());
}

#[test]
fn a_fixed_annotation_clears_the_error() {
    let bad = svc("tools", "bandit", "bandit", &[(RATE_LIMIT, "ten")]);
    let (d, _) = desired_tool(&bad);
    let p = plan(&[good("tools", "bandit", "bandit")], &[existing(&d, true)], &everywhere);
    match p.writes.as_slice() {
        [Write::Apply { tool, .. }] => {
            assert_eq!(tool.error, None);
            assert_eq!(tool.spec.rate_limit, 60);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn namespace_selectors_are_checked() {
    for ok in [
        "team=tools",
        "agentgate.dev/discovery",
        "!legacy",
        "env in (prod, staging)",
        "env notin (dev)",
        "a=b,c!=d",
        "a==b",
        "example.com/x=",
        "k in ()",
    ] {
        assert!(parse_namespace_selector(ok).is_ok(), "{ok:?}: {:?}", parse_namespace_selector(ok));
    }
    for bad in ["", "  ", "a=b,", "=b", "a=b c", "Bad_Prefix/x=y", "a in (b", "a in b", "a=-b", "a b"] {
        assert!(parse_namespace_selector(bad).is_err(), "{bad:?} accepted");
    }
}

/// Every claimant of a contested name is told, and was told in a note listing every claimant: a
/// tenant labelling N Services with one name made N notes of N keys each (O(N²) bytes in the plan
/// and in the memory of what was reported), and each new claimant changed every note, so every
/// claimant got a new Event: N²/2 Events through the operator's one Event queue, which every
/// reconcile waits on when it is full. The tool's conflict annotation listed them all too.
#[test]
fn a_thousand_services_claiming_one_name_cost_bounded_notes_and_one_more_tells_only_itself() {
    let squatters = |n: usize| (0..n).map(|i| good("squat", &format!("s{:04}", 9999 - i), "shared")).collect::<Vec<_>>();
    let (d, _) = desired_tool(&good("tools", "owner", "shared"));
    let owner = existing(&d, true);
    for (what, owned) in [("an existing tool", true), ("no tool yet", false), ("an orphaned tool", false)] {
        let services = |n: usize| {
            let mut s = squatters(n);
            if owned {
                s.push(good("tools", "owner", "shared"));
            }
            s
        };
        let tools: &[ExistingTool] = if what == "no tool yet" { &[] } else { std::slice::from_ref(&owner) };
        let before = plan(&services(1000), tools, &everywhere);
        let note_bytes: usize = before.warnings.iter().map(|w| w.note.len()).sum();
        assert_eq!(before.warnings.len(), if owned { 1001 } else { 1000 }, "{what}: every claimant is told");
        assert!(note_bytes < 1001 * 600, "{what}: {note_bytes} bytes of notes");
        let conflict = before.writes.iter().find_map(|w| match w {
            Write::Apply { tool, .. } => tool.conflict.clone(),
            Write::Delete { .. } => None,
        });
        assert_eq!(conflict.is_some(), what != "no tool yet", "{what}");
        if let Some(conflict) = conflict {
            assert!(conflict.len() < 1024 && conflict.contains(" and 99"), "{what}: {} bytes: {}", conflict.len(), &conflict[..300]);
        }
        // A new claimant sorting first: only its own note is new (and so only it gets an Event).
        let after = plan(&services(1001), tools, &everywhere);
        let told: std::collections::BTreeSet<_> = before.warnings.iter().map(|w| (&w.service, &w.note)).collect();
        let new: Vec<_> = after.warnings.iter().filter(|w| !told.contains(&(&w.service, &w.note))).map(|w| w.service.as_str()).collect();
        assert_eq!(new, ["s8999"], "{what}: {} notes changed", new.len());
    }
}
