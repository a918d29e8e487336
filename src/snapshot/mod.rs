//! The initial copy: every published table's rows as of the slot's consistent point,
//! handed to the batcher as one transaction of `R` rows committed at that point.
//!
//! How it stays consistent with the stream: the slot is created with an exported
//! snapshot (`EXPORT_SNAPSHOT`); every copy connection imports it (`SET TRANSACTION
//! SNAPSHOT`) while the replication connection stays idle, so the copy sees exactly the
//! transactions committed before the consistent point and the stream, started at that
//! point afterwards, exactly the ones after it: no gap, no overlap.
//!
//! Contract: [`copy`] sends `Begin`, one synthesized `Relation` per table (the columns
//! pgoutput will send: attnum order, no dropped or generated columns, replica-identity
//! flags), the rows as [`Change::Snapshot`], and finally `Commit` at the consistent
//! point. The copy is all or nothing: the commit record that publishes it is written
//! only after the last row, so a crash part-way leaves only uncommitted files, which the
//! next start deletes before it copies again (resuming finished chunks is future work).

use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batch::copies_binary;
use crate::batch::copy_binary::RowCutter;
use crate::change::{Change, Event, TxInfo};
use crate::config::SourceConfig;
use crate::decode::{Column, Relation, ReplicaIdentity};
use crate::lsn::Lsn;
use crate::source::{quote_ident, quote_literal, sql};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Connect(#[from] sql::SqlError),
    #[error("initial copy: {what}: {source}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("initial copy of {table}: permission denied; GRANT SELECT ON {table} TO {user}")]
    Permission { table: String, user: String },
    #[error("initial copy of {table}: malformed COPY data: {what}")]
    Format { table: String, what: String },
    #[error("initial copy interrupted by shutdown; it starts again at the next start")]
    Interrupted,
}

/// Where the copy stands.
pub struct Exported {
    pub name: String,
    pub consistent_point: Lsn,
    /// µs since the Unix epoch: `_commit_ts` of the snapshot rows.
    pub taken_at: i64,
}

struct Table {
    relation: Relation,
    quoted: String,
}

/// Session settings that make COPY's text output the same as pgoutput's.
const SESSION: &str = "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'; \
                       SET extra_float_digits = 3; SET bytea_output = 'hex'; SET client_encoding = 'UTF8'";

async fn import(cfg: &SourceConfig, snapshot: &str) -> Result<tokio_postgres::Client, SnapshotError> {
    let client = sql::connect(&cfg.conn).await?;
    let stmt = format!(
        "{SESSION}; BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    );
    client.batch_execute(&stmt).await.map_err(|source| SnapshotError::Sql {
        what: "importing the slot's exported snapshot".into(),
        source,
    })?;
    Ok(client)
}

async fn published_tables(client: &tokio_postgres::Client, publication: &str) -> Result<Vec<Table>, SnapshotError> {
    let sql_err = |what: &str| {
        let what = what.to_owned();
        move |source| SnapshotError::Sql { what, source }
    };
    let tables = client
        .query(
            "SELECT c.oid, pt.schemaname::text, pt.tablename::text, c.relreplident::text
             FROM pg_catalog.pg_publication_tables pt
             JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&publication],
        )
        .await
        .map_err(sql_err("listing the publication's tables"))?;
    let mut out = Vec::new();
    for t in tables {
        let oid: u32 = t.get(0);
        let (schema, name, ident): (String, String, String) = (t.get(1), t.get(2), t.get(3));
        let columns = client
            .query(
                "SELECT a.attname::text, a.atttypid, a.atttypmod,
                        CASE WHEN $2 = 'f' THEN true
                             ELSE EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                                          WHERE i.indrelid = a.attrelid AND a.attnum = ANY (i.indkey)
                                            AND CASE WHEN $2 = 'i' THEN i.indisreplident ELSE i.indisprimary END)
                        END
                 FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                 ORDER BY a.attnum",
                &[&oid, &ident],
            )
            .await
            .map_err(sql_err("reading table columns"))?;
        let replica_identity = match ident.as_str() {
            "f" => ReplicaIdentity::Full,
            "i" => ReplicaIdentity::Index,
            "n" => ReplicaIdentity::Nothing,
            _ => ReplicaIdentity::Default,
        };
        let columns = columns
            .iter()
            .map(|c| Column {
                name: c.get(0),
                type_oid: c.get(1),
                type_modifier: c.get(2),
                key: c.get(3),
            })
            .collect();
        out.push(Table {
            quoted: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
            relation: Relation {
                id: oid,
                namespace: schema,
                name,
                replica_identity,
                columns,
            },
        });
    }
    Ok(out)
}

/// Copies every published table under the exported snapshot with `parallelism`
/// connections (one table at a time each), sending events to the batcher.
pub async fn copy(
    cfg: &SourceConfig,
    exported: &Exported,
    parallelism: usize,
    events: mpsc::Sender<Vec<Event>>,
    shutdown: CancellationToken,
) -> Result<u64, SnapshotError> {
    let catalog = import(cfg, &exported.name).await?;
    let tables = published_tables(&catalog, &cfg.publication).await?;
    let mut head = vec![Event::Begin(TxInfo {
        xid: 0,
        commit_lsn: exported.consistent_point,
        commit_ts: exported.taken_at,
    })];
    head.extend(tables.iter().map(|t| Event::Relation(Arc::new(t.relation.clone()))));
    if events.send(head).await.is_err() {
        return Ok(0);
    }
    // Workers import the snapshot before any copy starts: the exporting connection
    // must stay idle until then, and it is.
    let mut workers = vec![catalog];
    for _ in 1..parallelism.max(1) {
        workers.push(import(cfg, &exported.name).await?);
    }
    let queue = Arc::new(tokio::sync::Mutex::new(tables.into_iter()));
    let started = Instant::now();
    let results = futures::future::join_all(workers.into_iter().map(|client| {
        let queue = queue.clone();
        let events = events.clone();
        let shutdown = shutdown.clone();
        let user = cfg.conn.user.clone();
        async move {
            let mut rows = 0u64;
            loop {
                let Some(table) = queue.lock().await.next() else {
                    return Ok::<u64, SnapshotError>(rows);
                };
                rows += copy_table(&client, &table, &events, &shutdown, &user).await?;
            }
        }
    }))
    .await;
    let mut total = 0;
    for r in results {
        total += r?;
    }
    if events
        .send(vec![Event::Commit {
            end_lsn: exported.consistent_point,
        }])
        .await
        .is_err()
    {
        return Ok(total);
    }
    tracing::info!(rows = total, secs = started.elapsed().as_secs_f64(), consistent_point = %exported.consistent_point, "initial copy read");
    Ok(total)
}

async fn copy_table(
    client: &tokio_postgres::Client,
    table: &Table,
    events: &mpsc::Sender<Vec<Event>>,
    shutdown: &CancellationToken,
    user: &str,
) -> Result<u64, SnapshotError> {
    let name = format!("{}.{}", table.relation.namespace, table.relation.name);
    // Binary where walshore decodes the binary form (cheaper for PostgreSQL and for us),
    // text for the rest: the text of a `::text` column is its binary form.
    let cols: Vec<String> = table
        .relation
        .columns
        .iter()
        .map(|c| {
            let q = quote_ident(&c.name);
            if copies_binary(c.type_oid, c.type_modifier) {
                q
            } else {
                format!("{q}::text")
            }
        })
        .collect();
    let sql = format!(
        "COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)",
        cols.join(", "),
        table.quoted
    );
    let stream = client.copy_out(&sql).await.map_err(|source| {
        if source.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            SnapshotError::Permission {
                table: table.quoted.clone(),
                user: quote_ident(user),
            }
        } else {
            SnapshotError::Sql {
                what: format!("COPY {name}"),
                source,
            }
        }
    })?;
    let started = Instant::now();
    let mut stream = std::pin::pin!(stream.map_err(|source| SnapshotError::Sql {
        what: format!("COPY {name}"),
        source
    }));
    let mut cutter = RowCutter::default();
    let mut bytes = 0u64;
    let mut rows;
    let mut last_log = Instant::now();
    while let Some(data) = stream.next().await {
        let data = data?;
        bytes += data.len() as u64;
        let format_err = |what| SnapshotError::Format {
            table: name.clone(),
            what,
        };
        let pushed = cutter.push(&data).map_err(format_err)?;
        rows = cutter.rows();
        let Some(rows_block) = pushed else { continue };
        if shutdown.is_cancelled() {
            return Err(SnapshotError::Interrupted);
        }
        if events
            .send(vec![Event::Change(Change::SnapshotBinaryRows {
                rel_id: table.relation.id,
                rows: rows_block,
            })])
            .await
            .is_err()
        {
            return Ok(rows);
        }
        if last_log.elapsed().as_secs() >= 10 {
            last_log = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(table = %name, rows, bytes, rows_per_sec = (rows as f64 / secs) as u64, "copying");
        }
    }
    rows = cutter.rows();
    let rest = cutter.finish().map_err(|what| SnapshotError::Format {
        table: name.clone(),
        what,
    })?;
    if !rest.is_empty()
        && events
            .send(vec![Event::Change(Change::SnapshotBinaryRows {
                rel_id: table.relation.id,
                rows: rest,
            })])
            .await
            .is_err()
    {
        return Ok(rows);
    }
    tracing::info!(table = %name, rows, bytes, secs = started.elapsed().as_secs_f64(), "copied table");
    Ok(rows)
}
