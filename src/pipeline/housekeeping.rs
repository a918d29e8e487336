//! Housekeeping beside the pipeline, every `snapshot.poll_interval`: the sweep of other
//! writers' pending records (a fenced writer's late uploads are deleted within one
//! interval), the last `walshore verify`'s outcome into the metrics, and folding and
//! pruning of the commit log so that it does not grow by an object per commit forever.
//! It only ever deletes what no commit names, and records its progress through the
//! sink's next commit. A pass that fails (a LIST or GET the store refused) is logged
//! and counted, and the next interval tries again: it never stops for the run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::PipelineError;
use crate::checkpoint::pending::{self, Sweeper};
use crate::checkpoint::{Watermarks, delete_pruned, fold_or_prune, read_head};
use crate::retry::ErrorChain;

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
    /// Runs a pass every interval until stopped. A pass that fails is logged and counted
    /// (`walshore_housekeeping_errors_total`); the next interval tries again.
    pub(super) async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cache = HashMap::new();
        let mut deleted = None;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.pass(&mut cache, &mut deleted).await {
                tracing::warn!(error = %ErrorChain(&e), retry_in = ?self.interval, "log housekeeping failed; it runs again at the next interval");
                metrics::counter!(crate::telemetry::names::HOUSEKEEPING_ERRORS).increment(1);
            }
        }
    }

    async fn pass(
        &self,
        cache: &mut HashMap<object_store::path::Path, crate::checkpoint::PendingRecord>,
        deleted: &mut Option<u64>,
    ) -> Result<(), PipelineError> {
        let who = Sweeper {
            claim_seq: self.claim_seq,
            run_id: &self.run_id,
            owns: self.owns.as_ref(),
            completes: &[],
        };
        let cleared = pending::clear(self.store.as_ref(), &who, cache).await?;
        if cleared.fresh > 0 {
            tracing::info!(
                files = cleared.fresh,
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
            delete_pruned(self.store.as_ref(), head.pruned, deleted).await?;
            let marks = *self.marks.borrow();
            match fold_or_prune(&self.store, &head, marks, self.retention).await? {
                Some(next) => {
                    self.marks.send_replace(next);
                }
                None => break,
            }
        }
        Ok(())
    }
}
