//! New-data notifications: after each commit record that publishes data files, a JSON
//! notice naming its tables, partitions, files, rows, LSN range and commit time goes to
//! an HTTP webhook and/or an SNS topic, at least once.
//!
//! A commit never waits for a notice. The sink task hands each one to a broadcast
//! channel of `notify.queue` notices ([`committed`]) and goes on; a target that falls
//! further behind loses the oldest from the channel, not the notices: the commit log is
//! the truth, and a target reads the records it missed back from it. Each target keeps
//! its place (the last commit it delivered or passed over) in `_walshore/notified.json`,
//! written every few seconds and at a clean stop, so a restart resends from there. A
//! notice can therefore arrive twice (what was delivered after the last mark, at most a
//! few seconds' worth, or more if the target was slow to answer); consumers dedupe by
//! `seq`, which is the commit record's number and never reused within a lake.
//!
//! Only the process that has claimed the lake sends: a second instance, refused the
//! slot or waiting for it, announces nothing.
//!
//! A target that fails is retried with backoff (1 s doubling to 1 min) for as long as
//! the process runs, the notices in order; `walshore_notification_backlog_commits` shows
//! how far behind it is. A notice whose commit record was pruned (`sink.log_retention`)
//! before it was delivered is passed over, logged and counted.

mod notice;
mod target;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::CommitRecord;
use crate::config::{Config, NotifyConfig};
use crate::telemetry::names;
pub use notice::Notice;
pub use target::{Target, TargetError};

/// Where each target's place is kept.
pub const MARK_KEY: &str = "_walshore/notified.json";
/// How often a moved mark is written.
const MARK_EVERY: Duration = Duration::from_secs(5);
/// Retries of a failed delivery: from 1 s, doubling, to this.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

pub use crate::redact::describe_url;

/// `_walshore/notified.json`: per target kind, which target and the last commit it has
/// delivered or passed over.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marks {
    pub targets: BTreeMap<String, Mark>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    /// The target's address (a webhook without credentials or query, a topic ARN): a
    /// different target starts with new commits instead of the old one's backlog.
    pub target: String,
    pub seq: u64,
}

/// What the sink task and the targets share.
struct Feed {
    tx: broadcast::Sender<Arc<Notice>>,
    /// The newest commit known: the head when the targets were placed, then this
    /// process's commits.
    latest: AtomicU64,
    /// The first commit this process made (0: none yet).
    first: AtomicU64,
    /// `sink.url` with a trailing slash.
    root: String,
    /// This process has claimed the lake (a second instance, refused or standing by,
    /// sends nothing).
    claimed: tokio::sync::watch::Sender<bool>,
}

static FEED: OnceLock<Feed> = OnceLock::new();

/// Tells the targets about a commit: never waits (a notice that does not fit in the
/// queue is read back from the log by the target that needs it).
pub fn committed(record: &CommitRecord) {
    let Some(feed) = FEED.get() else { return };
    let _ = feed
        .first
        .compare_exchange(0, record.seq, Ordering::SeqCst, Ordering::SeqCst);
    if !record.files.is_empty() {
        // No receiver (every target stopped) is not an error: the log has it.
        let _ = feed.tx.send(Arc::new(Notice::of(record, &feed.root)));
    }
    feed.latest.fetch_max(record.seq, Ordering::SeqCst);
}

/// This process writes the lake now: its targets may send.
pub fn claimed() {
    if let Some(feed) = FEED.get() {
        feed.claimed.send_replace(true);
    }
}

/// The running targets.
pub struct Notifier {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Stops the mark writer after the targets (it writes their last places).
    stop_marker: CancellationToken,
    marker: tokio::task::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(transparent)]
    Store(#[from] crate::sink::StoreError),
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// Starts a task per configured target (none without a `[notify]` target). Call before
/// the pipeline: commits made before it are not announced.
pub async fn start(cfg: &Config) -> Result<Option<Notifier>, NotifyError> {
    let n: &NotifyConfig = &cfg.notify;
    if !n.enabled() {
        return Ok(None);
    }
    let store = crate::sink::open_store(&cfg.sink)?;
    let mut targets = Vec::new();
    if let Some(url) = &n.webhook {
        targets.push(Target::webhook(url.clone(), n.webhook_secret.clone(), n.timeout)?);
    }
    if let Some(arn) = &n.sns_topic_arn {
        targets.push(Target::sns(arn, n.sns_endpoint.as_deref(), n.timeout).await);
    }
    let root = cfg.sink.root();
    let (tx, _) = broadcast::channel(n.queue);
    let feed = FEED.get_or_init(|| Feed {
        tx,
        latest: AtomicU64::new(0),
        first: AtomicU64::new(0),
        root,
        claimed: tokio::sync::watch::channel(false).0,
    });
    let stop = CancellationToken::new();
    let marks = Arc::new(MarkBook::default());
    let mut tasks = Vec::new();
    for t in targets {
        let mut cursor = Cursor {
            rx: feed.tx.subscribe(),
            store: store.clone(),
            root: feed.root.clone(),
            next: 0,
            early: None,
        };
        // Placed before the pipeline starts, so that a target new to this lake begins
        // exactly after the head; if the lake cannot be read now, the task tries again
        // (and begins no later than this process's first commit).
        let placed = match cursor.place(&marks, t.kind(), &t.address()).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(target = t.kind(), error = %e, "cannot read where notifications stopped; trying again in the background");
                false
            }
        };
        tasks.push(tokio::spawn(deliver(t, cursor, placed, marks.clone(), stop.clone())));
    }
    let stop_marker = CancellationToken::new();
    let marker = tokio::spawn(keep_marks(store, marks, stop_marker.clone()));
    Ok(Some(Notifier {
        stop,
        tasks,
        stop_marker,
        marker,
    }))
}

impl Notifier {
    /// Delivers what is committed for up to `grace` (no retries once stopping), then
    /// writes the marks. What is left is sent by the next start.
    pub async fn stop(self, grace: Duration) {
        self.stop.cancel();
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                ?grace,
                "notifications still undelivered at the stop are sent by the next start"
            );
        }
        self.stop_marker.cancel();
        let _ = self.marker.await;
    }
}

/// The targets' places, and whether they moved since the last write.
#[derive(Default)]
struct MarkBook {
    state: Mutex<(Marks, bool)>,
    /// Read once at start by every target.
    loaded: tokio::sync::OnceCell<Option<Marks>>,
}

impl MarkBook {
    fn set(&self, kind: &str, target: &str, seq: u64) {
        let mut s = self.state.lock().unwrap();
        s.0.targets.insert(
            kind.to_owned(),
            Mark {
                target: target.to_owned(),
                seq,
            },
        );
        s.1 = true;
    }

    /// The marks to write, if any moved.
    fn take_moved(&self) -> Option<Marks> {
        let mut s = self.state.lock().unwrap();
        std::mem::take(&mut s.1).then(|| s.0.clone())
    }
}

/// Writes the marks every [`MARK_EVERY`] when they moved, and once more at the stop.
async fn keep_marks(store: Arc<dyn ObjectStore>, marks: Arc<MarkBook>, stop: CancellationToken) {
    let key = Path::from(MARK_KEY);
    let mut tick = tokio::time::interval(MARK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        if let Some(m) = marks.take_moved() {
            let body = serde_json::to_vec(&m).expect("marks serialize");
            if let Err(e) = store.put(&key, PutPayload::from(body)).await {
                tracing::warn!(key = MARK_KEY, error = %e, "cannot write the notification marks; a restart may resend more notices");
                marks.state.lock().unwrap().1 = true;
            }
        }
        if stopping {
            return;
        }
    }
}

/// Reads the notices of commits in order: from the channel when it has them, else from
/// the commit log.
struct Cursor {
    rx: broadcast::Receiver<Arc<Notice>>,
    store: Arc<dyn ObjectStore>,
    root: String,
    /// The next commit to deliver.
    next: u64,
    /// A notice from the channel after `next` (the ones before it come from the log).
    early: Option<Arc<Notice>>,
}

enum Next {
    /// The commit's notice (None: it published no files).
    Commit(u64, Option<Arc<Notice>>),
    /// Records `from..to` are pruned: they cannot be announced any more.
    Pruned {
        from: u64,
        to: u64,
    },
    Stopped,
}

impl Cursor {
    /// Where a target starts: after its mark, or (a target without one) after the head
    /// at start or before this process's first commit, whichever is earlier.
    async fn place(
        &mut self,
        marks: &MarkBook,
        kind: &str,
        target: &str,
    ) -> Result<(), crate::checkpoint::CheckpointError> {
        let loaded = marks
            .loaded
            .get_or_try_init(|| async {
                match crate::checkpoint::log::read_json::<Marks>(self.store.as_ref(), &Path::from(MARK_KEY)).await {
                    Ok(m) => Ok(Some(m)),
                    Err(e) if crate::checkpoint::log::is_not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        let mark = loaded
            .as_ref()
            .and_then(|m| m.targets.get(kind))
            .filter(|m| m.target == target);
        let head = crate::checkpoint::read_head(self.store.as_ref())
            .await?
            .map_or(0, |h| h.seq);
        let feed = FEED.get().expect("started");
        feed.latest.fetch_max(head, Ordering::SeqCst);
        self.next = match (mark, feed.first.load(Ordering::SeqCst)) {
            (Some(m), _) => m.seq + 1,
            (None, 0) => head + 1,
            (None, first) => (head + 1).min(first),
        };
        Ok(())
    }

    async fn next(&mut self, stop: &CancellationToken) -> Result<Next, crate::checkpoint::CheckpointError> {
        loop {
            if let Some(n) = self.early.take_if(|n| n.seq <= self.next) {
                if n.seq == self.next {
                    return Ok(Next::Commit(n.seq, Some(n)));
                }
                continue;
            }
            // What the channel already holds comes before the log: a target that was
            // busy while commits went on reads them from memory, not with a GET each.
            if self.early.is_none() {
                match self.rx.try_recv() {
                    Ok(n) => {
                        if n.seq >= self.next {
                            self.early = Some(n);
                        }
                        continue;
                    }
                    Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(_) => {}
                }
            }
            if self.next <= cursor_latest() || self.early.is_some() {
                return self.read_logged().await;
            }
            if stop.is_cancelled() {
                return Ok(Next::Stopped);
            }
            tokio::select! {
                r = self.rx.recv() => match r {
                    Ok(n) if n.seq < self.next => {}
                    Ok(n) => self.early = Some(n),
                    // What was lost from the channel is read from the log.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Ok(Next::Stopped),
                },
                _ = stop.cancelled() => {}
            }
        }
    }

    /// Commit `next` from the log.
    async fn read_logged(&mut self) -> Result<Next, crate::checkpoint::CheckpointError> {
        let seq = self.next;
        if let Some(record) = crate::checkpoint::log::read_commit(self.store.as_ref(), seq).await? {
            let notice = (!record.files.is_empty()).then(|| Arc::new(Notice::of(&record, &self.root)));
            return Ok(Next::Commit(seq, notice));
        }
        // Missing below the head: pruned (the log deletes from the oldest up).
        let head = crate::checkpoint::read_head(self.store.as_ref()).await?;
        match head {
            Some(h) if h.pruned >= seq => Ok(Next::Pruned {
                from: seq,
                to: h.pruned + 1,
            }),
            _ => Err(crate::checkpoint::CheckpointError::Corrupt {
                key: crate::checkpoint::log::commit_key(seq).to_string(),
                message: "a commit record below the head is missing and was not pruned".into(),
            }),
        }
    }
}

/// The newest commit known to be made (by this process, or before it started).
fn cursor_latest() -> u64 {
    FEED.get().map_or(0, |f| f.latest.load(Ordering::SeqCst))
}

/// One target's loop: each commit's notice in order, retried until delivered.
async fn deliver(target: Target, mut cursor: Cursor, placed: bool, marks: Arc<MarkBook>, stop: CancellationToken) {
    let (kind, address) = (target.kind(), target.address());
    let backlog = metrics::gauge!(names::NOTIFY_BACKLOG, "target" => kind);
    let sent = metrics::counter!(names::NOTIFICATIONS_SENT, "target" => kind);
    let failures = metrics::counter!(names::NOTIFICATION_FAILURES, "target" => kind);
    let skipped = metrics::counter!(names::NOTIFICATIONS_SKIPPED, "target" => kind);
    let mut delay = Duration::from_secs(1);
    // Where to start, patiently: the lake is the pipeline's, which retries too.
    while !placed && let Err(e) = cursor.place(&marks, kind, &address).await {
        tracing::warn!(target = kind, error = %e, retry_in = ?delay, "cannot read where notifications stopped");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
    let mut claimed = FEED.get().expect("started").claimed.subscribe();
    tokio::select! {
        _ = claimed.wait_for(|c| *c) => {}
        _ = stop.cancelled() => return,
    }
    marks.set(kind, &address, cursor.next - 1);
    tracing::info!(target = kind, address = %address, from_seq = cursor.next, "notifications on");
    // Commits made and not yet announced: set before each wait.
    let show_backlog = |next: u64| backlog.set((cursor_latest() + 1).saturating_sub(next) as f64);
    loop {
        show_backlog(cursor.next);
        let next = match cursor.next(&stop).await {
            Ok(n) => n,
            Err(e) => {
                failures.increment(1);
                tracing::warn!(target = kind, seq = cursor.next, error = %e, retry_in = ?delay, "cannot read a commit record to announce");
                if !pause(&stop, &mut delay).await {
                    return;
                }
                continue;
            }
        };
        let (seq, notice) = match next {
            Next::Stopped => return,
            Next::Pruned { from, to } => {
                skipped.increment(to - from);
                tracing::error!(
                    target = kind,
                    from_seq = from,
                    to_seq = to - 1,
                    "commit records were pruned (sink.log_retention) before their notices were delivered: these commits are not announced"
                );
                cursor.next = to;
                marks.set(kind, &address, to - 1);
                continue;
            }
            Next::Commit(seq, notice) => (seq, notice),
        };
        if let Some(notice) = notice {
            let body = notice.body();
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                match target.send(&notice, &body).await {
                    Ok(()) => {
                        sent.increment(1);
                        delay = Duration::from_secs(1);
                        break;
                    }
                    Err(e) => {
                        show_backlog(seq);
                        failures.increment(1);
                        tracing::warn!(target = kind, seq, attempt, error = %e, retry_in = ?delay, "cannot deliver a notification; retrying");
                        if !pause(&stop, &mut delay).await {
                            return;
                        }
                    }
                }
            }
        }
        cursor.next = seq + 1;
        marks.set(kind, &address, seq);
    }
}

/// Waits `delay` (doubled for next time) unless stopping: false when stopping.
async fn pause(stop: &CancellationToken, delay: &mut Duration) -> bool {
    if stop.is_cancelled() {
        return false;
    }
    let wait = *delay;
    *delay = (*delay * 2).min(MAX_RETRY_DELAY);
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::RowPos;
    use crate::checkpoint::record::Identity;
    use crate::lsn::Lsn;
    use crate::sink::WrittenObject;

    /// Records 1..=n, each publishing one file of `seq` rows.
    fn records(n: u64) -> Vec<CommitRecord> {
        let id = Identity {
            system_id: "7".into(),
            slot: "walshore".into(),
            publication: "walshore".into(),
        };
        let mut out = Vec::new();
        let mut head = CommitRecord::genesis(&id);
        for seq in 1..=n {
            let file = WrittenObject {
                key: format!("public/t/{seq}.parquet"),
                table: "public.t".into(),
                partition: String::new(),
                rows: seq,
                bytes: 100,
                first: RowPos {
                    lsn: Lsn(seq * 100),
                    seq: 0,
                },
                last: RowPos {
                    lsn: Lsn(seq * 100),
                    seq: 0,
                },
                ops: Default::default(),
            };
            head = head.next("run", Lsn(seq * 100 + 50), Some(1), vec![file]);
            out.push(head.clone());
        }
        out
    }

    async fn put(store: &dyn ObjectStore, r: &CommitRecord) {
        let key = crate::checkpoint::log::commit_key(r.seq);
        store
            .put(&key, PutPayload::from(serde_json::to_vec(r).unwrap()))
            .await
            .unwrap();
    }

    async fn take(cursor: &mut Cursor, stop: &CancellationToken) -> u64 {
        match cursor.next(stop).await.expect("a notice") {
            Next::Commit(seq, notice) => {
                assert_eq!(notice.expect("files").rows, seq, "the notice of commit {seq}");
                cursor.next = seq + 1;
                seq
            }
            _ => panic!("not a commit"),
        }
    }

    /// The queue serves what it holds without reading the log; what fell out of it (a
    /// target that lagged) comes from the log, in order; records the log pruned before
    /// they were delivered are passed over. (One test: the feed is the process's.)
    #[tokio::test]
    async fn a_cursor_reads_the_queue_then_the_log_and_passes_over_pruned_records() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let feed = FEED.get_or_init(|| Feed {
            tx: broadcast::channel(2).0,
            latest: AtomicU64::new(0),
            first: AtomicU64::new(0),
            root: "s3://lake/".into(),
            claimed: tokio::sync::watch::channel(false).0,
        });
        let mut cursor = Cursor {
            rx: feed.tx.subscribe(),
            store: store.clone(),
            root: feed.root.clone(),
            next: 1,
            early: None,
        };
        let stop = CancellationToken::new();
        let all = records(7);
        // 1 and 2 are only in the queue: a read of the log would find nothing and fail.
        committed(&all[0]);
        committed(&all[1]);
        assert_eq!(take(&mut cursor, &stop).await, 1);
        assert_eq!(take(&mut cursor, &stop).await, 2);
        // 3..=7 overflow a queue of 2 while the target is busy: 3..=5 are lost from it
        // and read from the log, 6 and 7 come from the queue.
        for r in &all[2..] {
            put(store.as_ref(), r).await;
            committed(r);
        }
        for want in 3..=7 {
            assert_eq!(take(&mut cursor, &stop).await, want);
        }

        // Another lake whose log pruned records 1..=3 (4 and 5 remain) before a target
        // that stopped at 1 came back.
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let mut kept = records(5);
        kept[4].pruned = 3;
        for r in &kept[3..] {
            put(store.as_ref(), r).await;
        }
        let mut cursor = Cursor {
            rx: feed.tx.subscribe(),
            store,
            root: feed.root.clone(),
            next: 2,
            early: None,
        };
        match cursor.next(&stop).await.unwrap() {
            Next::Pruned { from, to } => assert_eq!((from, to), (2, 4)),
            _ => panic!("records 2 and 3 are pruned"),
        }
        cursor.next = 4;
        assert_eq!(take(&mut cursor, &stop).await, 4);
        assert_eq!(take(&mut cursor, &stop).await, 5);

        // Caught up and stopping: the cursor says so instead of waiting.
        let mut cursor = Cursor {
            rx: feed.tx.subscribe(),
            store: Arc::new(object_store::memory::InMemory::new()),
            root: feed.root.clone(),
            next: 8,
            early: None,
        };
        stop.cancel();
        assert!(matches!(cursor.next(&stop).await.unwrap(), Next::Stopped));
    }

    #[test]
    fn marks_read_back_as_written() {
        let mut m = Marks::default();
        m.targets.insert(
            "sns".into(),
            Mark {
                target: "arn:aws:sns:eu-west-1:1:t".into(),
                seq: 42,
            },
        );
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"targets":{"sns":{"target":"arn:aws:sns:eu-west-1:1:t","seq":42}}}"#
        );
        assert_eq!(serde_json::from_str::<Marks>(&text).unwrap(), m);
    }
}
