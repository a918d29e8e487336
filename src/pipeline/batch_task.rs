//! The batch task: events in stream order into per-table Arrow files, handed to the sink
//! at the flush interval, at the memory limit, and when a copy's snapshot point arrives.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::PipelineError;
use super::queue::EventReceiver;
use crate::batch::{Batcher, Taken};
use crate::change::Event;
use crate::lsn::Lsn;

pub(super) enum SinkMsg {
    Flush(Taken),
    /// Nothing is buffered or in flight up to this LSN.
    Idle(Lsn),
}

pub(super) async fn batch_task(
    mut events: EventReceiver,
    sink: mpsc::Sender<SinkMsg>,
    flush_interval: Duration,
    max_bytes: usize,
    mut batcher: Batcher,
) -> Result<(), PipelineError> {
    let mut deadline: Option<Instant> = None;
    // A keepalive's position that came while data waited: told to the sink right after
    // that data's boundary flush, unless a transaction began in between.
    let mut idle_after: Option<Lsn> = None;
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            chunk = events.recv() => {
                let Some(chunk) = chunk else { break };
                let _busy = crate::telemetry::STATE.busy("batch");
                if crate::telemetry::enabled() {
                    metrics::gauge!(crate::telemetry::names::BUFFERED_BYTES)
                        .set((events.bytes() + batcher.buffered_bytes()) as f64);
                }
                for event in chunk.events {
                    if let Event::Idle { lsn } = event {
                        if batcher.has_data() {
                            idle_after = Some(lsn);
                        } else if sink.send(SinkMsg::Idle(lsn)).await.is_err() {
                            return Ok(());
                        }
                        continue;
                    }
                    if matches!(event, Event::Begin(_)) {
                        idle_after = None;
                    }
                    let commit = matches!(event, Event::Commit { .. });
                    batcher.push(event)?;
                    if deadline.is_none() && batcher.has_data() {
                        deadline = Some(Instant::now() + flush_interval);
                    }
                    // Bounded memory: hand over at the limit, inside a transaction too. A
                    // copy's point (between transactions) goes over with every file
                    // written before it.
                    let due = commit && deadline.is_some_and(|d| Instant::now() >= d);
                    if batcher.buffered_bytes() >= max_bytes || due || batcher.copy_started() {
                        if !flush(&sink, &mut batcher, &mut idle_after).await {
                            return Ok(());
                        }
                        if batcher.in_transaction() {
                            crate::fault::point("after_flush_in_transaction");
                        } else {
                            deadline = None;
                        }
                    }
                }
            }
            _ = sleep => {
                if batcher.in_transaction() {
                    // Flushed at this transaction's commit: files never end mid-way
                    // for want of time, only for want of memory.
                    deadline = Some(Instant::now() + Duration::from_millis(50));
                    continue;
                }
                deadline = None;
                let _busy = crate::telemetry::STATE.busy("batch");
                if batcher.has_data() && !flush(&sink, &mut batcher, &mut idle_after).await {
                    return Ok(());
                }
            }
        }
    }
    // Input closed: the source stopped at a transaction boundary (or failed, in which
    // case an open transaction is dropped here and streamed again after the restart).
    if batcher.has_data() && !batcher.in_transaction() {
        flush(&sink, &mut batcher, &mut idle_after).await;
    }
    Ok(())
}

/// Hands over everything buffered; at a transaction boundary, also a keepalive's
/// position that came meanwhile. False when the sink is gone.
async fn flush(sink: &mpsc::Sender<SinkMsg>, batcher: &mut Batcher, idle_after: &mut Option<Lsn>) -> bool {
    if sink.send(SinkMsg::Flush(batcher.take())).await.is_err() {
        return false;
    }
    if batcher.in_transaction() {
        return true;
    }
    match idle_after.take() {
        Some(lsn) => sink.send(SinkMsg::Idle(lsn)).await.is_ok(),
        None => true,
    }
}
