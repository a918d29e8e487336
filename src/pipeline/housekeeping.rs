//! Housekeeping beside the pipeline, every `snapshot.poll_interval`: the sweep of other
//! writers' pending records (a fenced writer's late uploads are deleted within one
//! interval), the last `walshore verify`'s outcome into the metrics, folding and
//! pruning of the commit log so that it does not grow by an object per commit forever,
//! and, with `[compaction]`, compaction of closed change-log partitions (see
//! `compaction`). It only ever deletes what no commit names (or what a compaction
//! replaced, once its time is up), and records its progress through the sink's next
//! commit. A pass that fails (a LIST or GET the store refused) is logged and counted,
//! and the next interval tries again: it never stops for the run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::PipelineError;
use crate::catalog::Catalog;
use crate::checkpoint::pending::{self, Sweeper};
use crate::checkpoint::{Watermarks, delete_pruned, fold_or_prune, read_head};
use crate::compaction::{CompactionError, Outcome, Planner, Ready};
use crate::config::{CompactionConfig, IcebergConfig, Partitions};
use crate::retry::ErrorChain;
use crate::sink::Sink;

/// What compaction needs beside the log.
pub(super) struct Compacting {
    pub cfg: CompactionConfig,
    pub sink: Arc<Sink>,
    pub partitions: Arc<Partitions>,
    /// To the sink, which commits each compaction.
    pub commits: tokio::sync::mpsc::Sender<Ready>,
    /// `[iceberg]` and the sink's URL: replaced files wait for the Iceberg tables.
    pub iceberg: Option<(IcebergConfig, String)>,
    /// `catalog.kind = "glue"`: compacted partitions are pointed at their folder.
    pub glue: Option<(crate::config::GlueConfig, crate::config::SinkConfig)>,
    /// Where inputs and outputs are spilled (`source.spill_dir`).
    pub spill: std::path::PathBuf,
    /// With Glue: set once the catalog is reconciled with the lake. Compaction waits
    /// for it, so that reconciliation never sees a compaction under way.
    pub reconciled: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The sink's flushes, which compaction's requests give way to.
    pub flushing: crate::compaction::Flushing,
}

pub(super) struct Housekeeping {
    pub store: Arc<dyn ObjectStore>,
    pub run_id: String,
    pub claim_seq: u64,
    pub owns: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    pub interval: Duration,
    pub retention: Duration,
    pub marks: watch::Sender<Watermarks>,
    pub stop: CancellationToken,
    pub compacting: Option<Compacting>,
}

impl Housekeeping {
    /// Runs a pass every interval until stopped, and beside it (`[compaction]`) the
    /// compaction loop: a rewrite that takes minutes never holds up the sweep or the
    /// folding. A pass that fails is logged and counted
    /// (`walshore_housekeeping_errors_total`); the next interval tries again.
    pub(super) async fn run(self) {
        tokio::join!(self.log_loop(), self.compaction_loop());
    }

    async fn log_loop(&self) {
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

    async fn compaction_loop(&self) {
        let Some(c) = &self.compacting else {
            return;
        };
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut planner = Planner::new(c.partitions.clone(), c.glue.is_none());
        let mut tickets = HashMap::new();
        let mut catalog = match &c.glue {
            Some((glue, sink)) => Some(Catalog::open(glue, sink, &c.partitions).await),
            None => None,
        };
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if c.reconciled
                .as_ref()
                .is_some_and(|r| !r.load(std::sync::atomic::Ordering::SeqCst))
            {
                continue;
            }
            // Stopped in the middle, a compaction is settled by the next attempt: what
            // it uploaded is announced, and its ticket names no commit of this one's.
            let pass = self.compact(c, &mut planner, &mut tickets, catalog.as_mut());
            let result = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = pass => r,
            };
            if let Err(e) = result {
                tracing::warn!(error = %ErrorChain(&e), retry_in = ?self.interval, "compaction failed; it runs again at the next interval");
                metrics::counter!(crate::telemetry::names::HOUSEKEEPING_ERRORS).increment(1);
            }
        }
    }

    /// Settles the tickets of earlier compactions, then compacts the closed partitions,
    /// up to `max_rewrite` bytes, one at a time.
    async fn compact(
        &self,
        c: &Compacting,
        planner: &mut Planner,
        tickets: &mut HashMap<object_store::path::Path, (i64, crate::compaction::Ticket)>,
        mut catalog: Option<&mut Catalog>,
    ) -> Result<(), CompactionError> {
        let store = self.store.as_ref();
        let Some(head) = read_head(store).await? else {
            return Ok(());
        };
        let settled = crate::compaction::settle(
            &self.store,
            &head,
            &self.run_id,
            self.claim_seq,
            c.cfg.delete_after,
            c.iceberg.as_ref(),
            catalog.as_deref_mut(),
            tickets,
        )
        .await?;
        if settled.abandoned + settled.finished > 0 {
            tracing::info!(
                abandoned = settled.abandoned,
                finished = settled.finished,
                files_deleted = settled.files,
                "compaction tickets settled"
            );
        }
        if let Err(e) = planner.update(store, &head).await {
            // Read the log again from the start next time: a record may be half taken in.
            *planner = Planner::new(c.partitions.clone(), c.glue.is_none());
            return Err(e.into());
        }
        planner.save_if_due(store, &head).await;
        let now = crate::checkpoint::record::now_micros();
        let chosen = planner.choose(&head, c.cfg.grace, now, c.cfg.max_rewrite);
        let report = planner.report(settled.left);
        metrics::gauge!(crate::telemetry::names::PARTITIONS_WAITING).set(report.waiting as f64);
        metrics::gauge!(crate::telemetry::names::FILES_PER_PARTITION).set(report.most_files as f64);
        crate::compaction::write_report(store, &report).await;
        let job = crate::compaction::Job {
            sink: &c.sink,
            run_id: &self.run_id,
            floor: self.claim_seq + 1,
            cfg: &c.cfg,
            spill: &c.spill,
            commits: &c.commits,
            flushing: &c.flushing,
        };
        for ch in chosen {
            let started = std::time::Instant::now();
            match crate::compaction::compact(&job, &head, &ch, catalog.as_deref_mut()).await? {
                Outcome::Committed(seq) => {
                    tracing::info!(table = %ch.table, partition = %ch.partition, bytes = ch.bytes, seq, elapsed_ms = started.elapsed().as_millis() as u64, "compacted a closed partition");
                    metrics::counter!(crate::telemetry::names::PARTITIONS_COMPACTED).increment(1);
                    metrics::counter!(crate::telemetry::names::BYTES_REWRITTEN).increment(ch.bytes);
                }
                Outcome::Overlapping => planner.overlapping(&ch),
                Outcome::NotCommitted => break,
            }
        }
        Ok(())
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
