//! The queue from source to batcher, bounded in bytes: a chunk holds a permit for the
//! bytes of the messages it was decoded from until the batcher has taken it in, so a
//! backlog of 64 KiB rows holds as many bytes in flight as one of 100-byte rows.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::change::Event;

/// A chunk is handed over at this many bytes of messages (or `EVENTS_PER_CHUNK` events).
pub(super) const CHUNK_BYTES: usize = 1 << 20;
/// Bytes of messages in flight between source and batcher: eight full chunks, enough
/// to keep the batcher busy while the source reads.
pub(super) const QUEUE_BYTES: usize = 8 * CHUNK_BYTES;

/// A chunk of events, holding its share of the queue until dropped.
pub(super) struct Chunk {
    pub events: Vec<Event>,
    _permit: OwnedSemaphorePermit,
}

pub(super) struct EventSender {
    tx: mpsc::UnboundedSender<Chunk>,
    budget: Arc<Semaphore>,
}

pub(super) struct EventReceiver {
    rx: mpsc::UnboundedReceiver<Chunk>,
    budget: Arc<Semaphore>,
}

pub(super) fn channel() -> (EventSender, EventReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
    (
        EventSender {
            tx,
            budget: budget.clone(),
        },
        EventReceiver { rx, budget },
    )
}

impl EventSender {
    /// Waits for room for `bytes` (a chunk larger than the whole queue waits for all
    /// of it), then sends. False when the receiver is gone.
    pub async fn send(&self, events: Vec<Event>, bytes: usize) -> bool {
        let n = bytes.clamp(1, QUEUE_BYTES) as u32;
        let Ok(permit) = self.budget.clone().acquire_many_owned(n).await else {
            return false;
        };
        self.tx
            .send(Chunk {
                events,
                _permit: permit,
            })
            .is_ok()
    }
}

impl EventReceiver {
    pub async fn recv(&mut self) -> Option<Chunk> {
        self.rx.recv().await
    }

    /// Message bytes in the queue now.
    pub fn bytes(&self) -> usize {
        QUEUE_BYTES.saturating_sub(self.budget.available_permits())
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        // A sender waiting for room learns the receiver is gone.
        self.budget.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_queue_holds_bytes_not_chunks() {
        let (tx, mut rx) = channel();
        // Fills the queue; the next send waits until a chunk is taken in and dropped.
        assert!(tx.send(Vec::new(), QUEUE_BYTES - 10).await);
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(50), tx.send(Vec::new(), 100)).await;
        assert!(blocked.is_err(), "a send beyond the byte budget waits");
        let chunk = rx.recv().await.unwrap();
        drop(chunk);
        assert!(tx.send(Vec::new(), 100).await);
        drop(rx);
        assert!(!tx.send(Vec::new(), QUEUE_BYTES).await, "a gone receiver is reported");
    }
}
