//! CloudWatch Embedded Metric Format: one JSON line on stdout per interval, which the
//! ECS `awslogs` driver (or any CloudWatch Logs agent) turns into CloudWatch metrics
//! with no collector. Gauges are their current value; counters are what was added since
//! the previous line (CloudWatch sums them per period).

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::{STATE, names};

/// (EMF name, Prometheus name, unit, counter?): the key figures of the README's table.
const FIGURES: &[(&str, &str, &str, bool)] = &[
    ("ReceivedLag", names::RECEIVED_LAG, "Seconds", false),
    ("CommittedLag", names::COMMITTED_LAG, "Seconds", false),
    ("Uncommitted", names::UNCOMMITTED, "Seconds", false),
    ("Ready", names::READY, "None", false),
    ("Connected", names::CONNECTED, "None", false),
    ("SlotRetainedBytes", names::SLOT_RETAINED, "Bytes", false),
    ("SlotConfirmedLagBytes", names::SLOT_CONFIRMED_LAG, "Bytes", false),
    ("SlotSafeWalSizeBytes", names::SLOT_SAFE_WAL, "Bytes", false),
    ("BufferedBytes", names::BUFFERED_BYTES, "Bytes", false),
    ("SpillBytes", names::SPILL_BYTES, "Bytes", false),
    ("Commits", names::COMMITS, "Count", true),
    ("RowsWritten", names::ROWS_WRITTEN, "Count", true),
    ("BytesWritten", names::BYTES_WRITTEN, "Bytes", true),
    ("ChangesReceived", names::CHANGES_RECEIVED, "Count", true),
    ("Retries", names::RETRIES, "Count", true),
    ("Errors", names::ERRORS, "Count", true),
];

/// Sums every series of each metric in a Prometheus text rendering.
pub fn totals(text: &str) -> HashMap<String, f64> {
    let mut out: HashMap<String, f64> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *out.entry(line[..name_end].to_owned()).or_default() += value;
    }
    out
}

/// One EMF line from the current values (`previous`: the counters at the last line).
pub fn line(
    namespace: &str,
    dimensions: &[(&str, &str)],
    now: &HashMap<String, f64>,
    previous: &HashMap<String, f64>,
    timestamp_ms: u64,
) -> Value {
    let mut metrics = Vec::new();
    let mut root = Map::new();
    for (name, prom, unit, counter) in FIGURES {
        let Some(v) = now.get(*prom) else { continue };
        let v = if *counter {
            (v - previous.get(*prom).copied().unwrap_or(0.0)).max(0.0)
        } else {
            *v
        };
        metrics.push(json!({ "Name": name, "Unit": unit }));
        root.insert((*name).to_owned(), json!(v));
    }
    for (k, v) in dimensions {
        root.insert((*k).to_owned(), json!(v));
    }
    let dims: Vec<&str> = dimensions.iter().map(|(k, _)| *k).collect();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{ "Namespace": namespace, "Dimensions": [dims], "Metrics": metrics }],
        }),
    );
    Value::Object(root)
}

/// Writes a line every `interval` until `stop` (and a last one then).
pub async fn writer(
    handle: super::Handle,
    namespace: String,
    dimensions: Vec<(String, String)>,
    interval: Duration,
    ready_within: Duration,
    stop: CancellationToken,
) {
    let mut previous = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        STATE.refresh(ready_within);
        let now = totals(&handle.render());
        let dims: Vec<(&str, &str)> = dimensions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let ms = (super::unix_now() * 1000.0) as u64;
        let l = line(&namespace, &dims, &now, &previous, ms);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{l}");
        let _ = out.flush();
        previous = now;
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_series_and_counters_become_deltas() {
        let text = "# HELP walshore_commits_total x\n# TYPE walshore_commits_total counter\nwalshore_commits_total 7\nwalshore_rows_written_total{table=\"public.a\",op=\"I\"} 5\nwalshore_rows_written_total{table=\"public.b\",op=\"D\"} 2\nwalshore_received_lag_seconds 1.5\n";
        let t = totals(text);
        assert_eq!(t["walshore_rows_written_total"], 7.0);
        let prev = HashMap::from([("walshore_commits_total".to_owned(), 3.0)]);
        let l = line("walshore", &[("Slot", "s")], &t, &prev, 1000);
        assert_eq!(l["Commits"], 4.0);
        assert_eq!(l["RowsWritten"], 7.0);
        assert_eq!(l["ReceivedLag"], 1.5);
        assert_eq!(l["Slot"], "s");
        assert_eq!(l["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0][0], "Slot");
        let named: Vec<&str> = l["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert_eq!(
            named,
            ["ReceivedLag", "Commits", "RowsWritten"],
            "only figures that exist"
        );
    }
}
