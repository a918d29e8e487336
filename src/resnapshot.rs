//! `walshore resnapshot`: asks the pipeline of a sink to copy one table again.
//!
//! The request is an object of its own under `{sink.url}/_walshore/requests/`; the
//! running pipeline (or the next `run`/`sync`) picks it up within
//! `snapshot.poll_interval`, copies the table beside the stream and deletes the request
//! once the copy is committed (a request made while a copy of the table runs waits for
//! the next copy). The copy starts with a `T` row, then the table's rows as `R` at a new
//! snapshot point (see [`crate::snapshot`]).

use std::time::Duration;

use crate::checkpoint::read_head;
use crate::config::Config;
use crate::sink::open_store;
use crate::snapshot::request_resnapshot;
use crate::source::sql;

#[derive(Debug, thiserror::Error)]
pub enum ResnapshotError {
    #[error("--table {0:?} is not schema.table, e.g. public.trades")]
    Name(String),
    #[error(
        "{table} is not in publication {publication:?}: only published tables are replicated; ALTER PUBLICATION {publication} ADD TABLE {table}, or check the name"
    )]
    NotPublished { table: String, publication: String },
    #[error(
        "the request to copy {table} again was removed without a new copy: the table left publication {publication:?} meanwhile"
    )]
    Dropped { table: String, publication: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl ResnapshotError {
    /// Exit code: 2 for a wrong table name, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ResnapshotError::Name(_) | ResnapshotError::NotPublished { .. } => 2,
            ResnapshotError::Dropped { .. } | ResnapshotError::Other(_) => 1,
        }
    }
}

/// How often `--wait` looks: two small reads (the request, the log's head).
const WAIT_POLL: Duration = Duration::from_millis(500);

/// Leaves the request; with `wait`, returns once the copy that carries out this very
/// request is committed (a copy already running when it was made does not count).
/// Returns the snapshot point of that copy when waited for.
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
    // The request is deleted only by the commit of the copy that carried it out (or,
    // with a warning, when its table left the publication).
    while crate::snapshot::requests::pending(store.as_ref(), &key)
        .await
        .map_err(anyhow::Error::from)?
    {
        tokio::time::sleep(WAIT_POLL).await;
    }
    let now = read_head(store.as_ref())
        .await
        .map_err(anyhow::Error::from)?
        .and_then(|h| h.snapshots.get(table).copied());
    match now {
        Some(point) if Some(point) != before => Ok(Some(point.to_string())),
        _ => Err(ResnapshotError::Dropped {
            table: table.to_owned(),
            publication: cfg.source.publication.clone(),
        }),
    }
}
