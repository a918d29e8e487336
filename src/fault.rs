//! Named crash points for the exactly-once tests. Compiled in only with the
//! `fault-injection` feature; `WALSHORE_FAULT=<name>` makes the process exit abruptly
//! (as SIGKILL would: no destructors, no flush) when it reaches that point.
//! `WALSHORE_FAULT=<name>@<n>` crashes at the n-th time the point is reached.

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
