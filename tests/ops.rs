//! The operations files: Prometheus alert rules (checked and unit-tested by promtool)
//! and the Grafana dashboard, both naming only metrics walshore exports; the README's
//! metrics table lists every metric.

use std::collections::BTreeSet;
use std::process::Command;

const OPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ops");

/// `walshore_…` names in `text`, histogram suffixes taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("walshore_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_count", "_sum"] {
            if let Some(n) = name.strip_suffix(suffix)
                && walshore::telemetry::names::ALL.contains(&n)
            {
                name = n;
            }
        }
        out.insert(name.to_owned());
        rest = &tail[end..];
    }
    out
}

fn assert_known(what: &str, names: &BTreeSet<String>) {
    let known: BTreeSet<String> = walshore::telemetry::names::ALL.iter().map(|s| s.to_string()).collect();
    let unknown: Vec<&String> = names.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "{what} names metrics walshore does not export: {unknown:?}"
    );
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(format!("{OPS}/prometheus"))
        .output()
        .expect("promtool (Debian package prometheus: apt-get install prometheus)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts_test.yml"]);
    let rules = std::fs::read_to_string(format!("{OPS}/prometheus/alerts.yml")).unwrap();
    let names = metric_names(&rules);
    assert!(names.len() >= 8, "{names:?}");
    assert_known("alerts.yml", &names);
}

#[test]
fn the_dashboard_is_json_over_exported_metrics() {
    let text = std::fs::read_to_string(format!("{OPS}/grafana/walshore.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut exprs = String::new();
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push_str(t["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    assert_known("the dashboard", &metric_names(&exprs));
}

#[test]
fn the_readme_lists_every_metric() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let missing: Vec<&&str> = walshore::telemetry::names::ALL
        .iter()
        .filter(|n| !readme.contains(&format!("`{n}`")))
        .collect();
    assert!(missing.is_empty(), "README's metrics table lacks {missing:?}");
    let section = readme
        .split("## Operating it")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has an \"Operating it\" section");
    assert_known("README's Operating section", &metric_names(section));
}
