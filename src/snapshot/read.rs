//! Reading tables under a snapshot point without writing anything: what `walshore
//! verify` compares the lake with. The rows come out exactly as a copy would write
//! them (same COPY, same decoding into Arrow), so a value compares with the lake's
//! representation of it, not with some other rendering.

use std::sync::Arc;

use super::copy::{CopyReader, batcher_for, copy_sql};
use super::{Chunk, Prepared, SnapshotError};
use crate::change::{Change, Event};
use crate::config::{Partitions, Unrepresentable};
use crate::decode::Relation;
use arrow::record_batch::RecordBatch;

/// A published table as the snapshot sees it.
pub struct SnapshotTable {
    pub name: String,
    pub relation: Arc<Relation>,
    /// Heap bytes when the snapshot was taken (0 when unknown, e.g. a partitioned root).
    pub bytes: u64,
    /// What makes it the table it is, as of the snapshot.
    pub identity: crate::change::TableIdentity,
}

impl Prepared {
    /// The tables this snapshot reads, in order.
    pub fn snapshot_tables(&self) -> Vec<SnapshotTable> {
        self.tables
            .iter()
            .map(|t| SnapshotTable {
                name: t.name.clone(),
                relation: t.relation.clone(),
                bytes: t.pages * 8192,
                identity: t.identity.clone(),
            })
            .collect()
    }

    /// Reads table `index` whole on the first connection, handing `on_batch` the rows as
    /// `R` rows of the lake every `buffer_bytes` of row data. Returns the rows read.
    pub async fn read_table<E: From<SnapshotError>>(
        &mut self,
        index: usize,
        unrepresentable: Unrepresentable,
        partitions: &Arc<Partitions>,
        buffer_bytes: usize,
        mut on_batch: impl FnMut(RecordBatch) -> Result<(), E>,
    ) -> Result<u64, E> {
        let table = &self.tables[index];
        let whole = Chunk {
            table: index,
            index: 0,
            lo: 0,
            hi: None,
        };
        let sql = copy_sql(table, &whole, partitions);
        let mut reader = CopyReader::start(&mut self.workers[0], &sql, table, &self.user).await?;
        let mut batcher = batcher_for(table, &self.point, unrepresentable, partitions).map_err(SnapshotError::from)?;
        let mut rows = 0;
        loop {
            let block = reader.next().await?;
            let ended = block.is_none();
            if let Some(block) = block.filter(|b| !b.is_empty()) {
                batcher
                    .push(Event::Change(Change::SnapshotBinaryRows {
                        rel_id: table.relation.id,
                        rows: block,
                    }))
                    .map_err(SnapshotError::from)?;
            }
            if ended || batcher.buffered_bytes() >= buffer_bytes {
                for file in batcher.take().files {
                    rows += file.batch.num_rows() as u64;
                    on_batch(file.batch)?;
                }
            }
            if ended {
                break;
            }
        }
        Ok(rows)
    }
}
