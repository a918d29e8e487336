//! Housekeeping beside the pipeline, every `snapshot.poll_interval`: the sweep of other
//! writers' pending records (a fenced writer's late uploads are deleted within one
//! interval), the last `walshore verify`'s outcome into the metrics, and folding and
//! pruning of the commit log so that it does not grow by an object per commit forever.
//! It only ever deletes what no commit names, and records its progress through the
//! sink's next commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::PipelineError;
use crate::checkpoint::pending::{self, Sweeper};
use crate::checkpoint::{Watermarks, fold_or_prune, read_head};

pub(super) struct Housekeeping {
    pub store: Arc<dyn ObjectStore>,
    pub run_id: String,
    pub claim_seq: u64,
    pub owns: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    pub interval: Duration,
    pub retention: Duration,
    pub marks: watch::Sender<Watermarks>,
    pub stop: CancellationToken,
}

impl Housekeeping {
    pub(super) async fn run(self) -> Result<(), PipelineError> {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cache = HashMap::new();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let who = Sweeper {
                claim_seq: self.claim_seq,
                run_id: &self.run_id,
                owns: self.owns.as_ref(),
                completes: &[],
            };
            let cleared = pending::clear(self.store.as_ref(), &who, &mut cache).await?;
            if cleared.files > 0 {
                tracing::info!(
                    files = cleared.files,
                    records_kept = cleared.kept,
                    "deleted files another writer uploaded but never committed"
                );
            }
            // The last `walshore verify`, for the metrics (it runs as its own process).
            if crate::telemetry::enabled() {
                match crate::verify::read_last(self.store.as_ref()).await {
                    Ok(Some(report)) => crate::telemetry::verified(&report),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, "cannot read the last verification's record"),
                }
            }
            // Fold and prune as far as there is work, a step at a time.
            while !self.stop.is_cancelled() {
                let Some(head) = read_head(self.store.as_ref()).await? else {
                    break;
                };
                let marks = *self.marks.borrow();
                match fold_or_prune(&self.store, head.seq, marks, self.retention).await? {
                    Some(next) => {
                        self.marks.send_replace(next);
                    }
                    None => break,
                }
            }
        }
    }
}
