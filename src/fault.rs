//! Named crash points for the exactly-once tests. Compiled in only with the
//! `fault-injection` feature; `WALSHORE_FAULT=<name>` makes the process exit abruptly
//! (as SIGKILL would: no destructors, no flush) when it reaches that point.
//! `WALSHORE_FAULT=<name>@<n>` crashes at the n-th time the point is reached.

/// Every point, in the order a pipeline passes them. `tests/faults.rs` crashes at each.
pub const POINTS: &[&str] = &[
    // start-up: the claim is the first commit record of a run
    "after_commit_record",
    "during_recovery",
    // a copy beside the stream
    "after_snapshot_point",
    "after_copy_announce",
    "after_copy_upload",
    "after_copy_commit",
    // a flush of streamed changes
    "after_schema_record",
    "after_pending_record",
    "mid_multipart_upload",
    "after_upload",
    "after_catalog_registration",
    "before_commit_record",
    "after_commit_before_confirm",
];

#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("WALSHORE_FAULT") else {
        return;
    };
    let (want, nth) = match spec.split_once('@') {
        Some((n, k)) => (n.to_owned(), k.parse::<u64>().unwrap_or(1)),
        None => (spec, 1),
    };
    if want == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("walshore: fault injected at {name}");
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

#[cfg(test)]
mod tests {
    /// Every `fault::point` in the source is listed in `POINTS` (so the fault test
    /// crashes there), and every listed point exists.
    #[test]
    fn points_are_listed() {
        let mut found = std::collections::BTreeSet::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("fault.rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for part in text.split("fault::point(\"").skip(1) {
                        found.insert(part.split('"').next().unwrap().to_owned());
                    }
                }
            }
        }
        let listed: std::collections::BTreeSet<_> = super::POINTS.iter().map(|s| s.to_string()).collect();
        assert_eq!(found, listed);
    }
}
