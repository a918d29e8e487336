//! `walshore resnapshot`: asks the pipeline of a sink to copy one table again.
//!
//! The request is an object under `{sink.url}/_walshore/requests/`; the running
//! pipeline (or the next `run`/`sync`) picks it up within `snapshot.poll_interval`,
//! copies the table beside the stream and deletes the request once the copy is
//! committed. The copy starts with a `T` row, then the table's rows as `R` at a new
//! snapshot point (see [`crate::snapshot`]).

use std::time::Duration;

use object_store::ObjectStoreExt;

use crate::checkpoint::read_head;
use crate::config::Config;
use crate::sink::open_store;
use crate::snapshot::{request_key, request_resnapshot};
use crate::source::sql;

#[derive(Debug, thiserror::Error)]
pub enum ResnapshotError {
    #[error("--table {0:?} is not schema.table, e.g. public.trades")]
    Name(String),
    #[error(
        "{table} is not in publication {publication:?}: only published tables are replicated; ALTER PUBLICATION {publication} ADD TABLE {table}, or check the name"
    )]
    NotPublished { table: String, publication: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl ResnapshotError {
    /// Exit code: 2 for a wrong table name, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ResnapshotError::Name(_) | ResnapshotError::NotPublished { .. } => 2,
            ResnapshotError::Other(_) => 1,
        }
    }
}

/// Leaves the request; with `wait`, returns once a copy of the table newer than the
/// request is committed. Returns the snapshot point of that copy when waited for.
pub async fn resnapshot(cfg: &Config, table: &str, wait: bool) -> Result<Option<String>, ResnapshotError> {
    if table.split_once('.').is_none_or(|(s, t)| s.is_empty() || t.is_empty()) {
        return Err(ResnapshotError::Name(table.to_owned()));
    }
    let client = sql::connect(&cfg.source.conn).await.map_err(anyhow::Error::from)?;
    let published = client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = $1 AND schemaname::text || '.' || tablename::text = $2",
            &[&cfg.source.publication, &table],
        )
        .await
        .map_err(anyhow::Error::from)?;
    if published.is_none() {
        return Err(ResnapshotError::NotPublished {
            table: table.to_owned(),
            publication: cfg.source.publication.clone(),
        });
    }
    let store = open_store(&cfg.sink).map_err(anyhow::Error::from)?;
    let before = read_head(store.as_ref())
        .await
        .map_err(anyhow::Error::from)?
        .and_then(|h| h.snapshots.get(table).copied());
    let key = request_resnapshot(store.as_ref(), table)
        .await
        .map_err(anyhow::Error::from)?;
    tracing::info!(table, request = %key, "resnapshot requested; a running walshore copies the table within snapshot.poll_interval, or the next run or sync does");
    if !wait {
        return Ok(None);
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let request_left = match store.head(&request_key(table)).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(anyhow::Error::from(e).into()),
        };
        let now = read_head(store.as_ref())
            .await
            .map_err(anyhow::Error::from)?
            .and_then(|h| h.snapshots.get(table).copied());
        if !request_left && now.is_some() && now != before {
            return Ok(now.map(|l| l.to_string()));
        }
    }
}
