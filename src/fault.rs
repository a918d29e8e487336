//! Named crash points for the exactly-once tests. Compiled in only with the
//! `fault-injection` feature. `WALSHORE_FAULT=<name>` makes the process exit abruptly
//! (as SIGKILL would: no destructors, no flush) when it reaches that point;
//! `<name>@<n>` at the n-th time it is reached. `<name>[@<n>]:stop` stops the process
//! there instead (SIGSTOP: a test wakes it with SIGCONT, as a paused writer wakes),
//! `<name>[@<n>]:sleep=<ms>` holds the task there (the others run on), and at a point that can fail
//! ([`fails`]) `<name>[@<n>]:fail` makes it fail with a transient error. Several specs
//! are separated by commas.

/// Every point, in the order a pipeline passes them. `tests/faults.rs` crashes at each.
pub const POINTS: &[&str] = &[
    // start-up: the claim is the first commit record of a run
    "after_commit_record",
    "during_recovery",
    "before_copies_due",
    // a copy beside the stream
    "before_copy_request",
    "after_snapshot_point",
    "after_copy_announce",
    "after_copy_upload",
    "after_copy_commit",
    // a flush of streamed changes
    "after_flush_in_transaction",
    "after_schema_record",
    "after_pending_record",
    "mid_multipart_upload",
    "after_upload",
    "after_catalog_registration",
    "before_commit_record",
    "after_commit_before_confirm",
];

/// The Iceberg projector's commit of a snapshot, in order (reached only with
/// `[iceberg]`; `tests/iceberg.rs` crashes at each).
pub const ICEBERG_POINTS: &[&str] = &[
    "iceberg_after_data_files",
    "iceberg_after_delete_files",
    "iceberg_after_manifests",
    "iceberg_after_manifest_list",
    "iceberg_after_metadata",
    "iceberg_after_commit",
];

/// Compaction of the change log, in order (reached only with `[compaction]`;
/// `tests/compaction.rs` crashes at each).
pub const COMPACTION_POINTS: &[&str] = &[
    "after_compacted_upload",
    "after_compaction_ticket",
    "after_compaction_commit",
    "after_replaced_deleted",
];

/// A point that crashes, stops or sleeps as [`point`] does, or answers true when its
/// spec says `fail`: the caller then fails with a transient error of its own.
#[cfg(feature = "fault-injection")]
pub fn fails(name: &str) -> bool {
    hit(name) == Some(Action::Fail)
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fails(_name: &str) -> bool {
    false
}

#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    hit(name);
}

#[cfg(feature = "fault-injection")]
#[derive(PartialEq, Eq)]
enum Action {
    Fail,
}

/// Carries out the spec that names this hit of `name`, if any.
#[cfg(feature = "fault-injection")]
fn hit(name: &str) -> Option<Action> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    // Times each point was reached: counted once per time, before any spec acts, so
    // that `@n` means the n-th time for every spec of a point, whatever the others do.
    static HITS: Mutex<Vec<(String, AtomicU64)>> = Mutex::new(Vec::new());
    let Ok(specs) = std::env::var("WALSHORE_FAULT") else {
        return None;
    };
    if !specs.split(',').any(|spec| spec.split([':', '@']).next() == Some(name)) {
        return None;
    }
    let hit = {
        let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
        let i = match hits.iter().position(|(s, _)| s == name) {
            Some(i) => i,
            None => {
                hits.push((name.to_owned(), AtomicU64::new(0)));
                hits.len() - 1
            }
        };
        hits[i].1.fetch_add(1, Ordering::SeqCst) + 1
    };
    for spec in specs.split(',') {
        let (target, action) = spec.split_once(':').unwrap_or((spec, "abort"));
        let (want, nth) = match target.split_once('@') {
            Some((n, k)) => (n, k.parse::<u64>().unwrap_or(1)),
            None => (target, 1),
        };
        if want != name || hit != nth {
            continue;
        }
        eprintln!("walshore: fault injected at {name}: {action}");
        match action.split_once('=') {
            Some(("sleep", ms)) => {
                let hold = std::time::Duration::from_millis(ms.parse().unwrap_or(1000));
                // Only this task is held: the runtime's other tasks move off the thread,
                // as they would if this task were merely slow.
                match tokio::runtime::Handle::try_current() {
                    Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                        tokio::task::block_in_place(|| std::thread::sleep(hold))
                    }
                    _ => std::thread::sleep(hold),
                }
            }
            _ if action == "stop" => unsafe {
                libc::raise(libc::SIGSTOP);
            },
            _ if action == "fail" => return Some(Action::Fail),
            _ => std::process::abort(),
        }
    }
    None
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

#[cfg(test)]
mod tests {
    /// Every `fault::point` in the source is listed in `POINTS`, `ICEBERG_POINTS` or
    /// `COMPACTION_POINTS` (so a fault test crashes there), and every listed point exists.
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
                    for call in ["fault::point(\"", "fault::fails(\""] {
                        for part in text.split(call).skip(1) {
                            found.insert(part.split('"').next().unwrap().to_owned());
                        }
                    }
                }
            }
        }
        let listed: std::collections::BTreeSet<_> = super::POINTS
            .iter()
            .chain(super::ICEBERG_POINTS)
            .chain(super::COMPACTION_POINTS)
            .map(|s| s.to_string())
            .collect();
        assert_eq!(found, listed);
    }
}
