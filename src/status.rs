//! `walshore status`: the committed position in the lake beside the slot's state, as JSON.

use serde_json::{Value, json};

use crate::checkpoint::read_head;
use crate::config::Config;
use crate::sink::open_store;
use crate::source::sql;

pub async fn status(cfg: &Config) -> anyhow::Result<Value> {
    let store = open_store(&cfg.sink)?;
    let head = read_head(store.as_ref()).await?;
    let client = sql::connect(&cfg.source.conn).await?;
    let slot = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, restart_lsn::text, active, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, wal_status \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await?;
    // A table copy waiting for its snapshot point: its temporary slot exists but has no
    // consistent point yet, and the transactions open now are what it waits for.
    let copy_slots = client
        .query(
            "SELECT slot_name::text, active_pid FROM pg_catalog.pg_replication_slots
             WHERE temporary AND confirmed_flush_lsn IS NULL AND starts_with(slot_name::text, $1)",
            &[&format!(
                "{}_copy_",
                cfg.source.slot.chars().take(40).collect::<String>()
            )],
        )
        .await?;
    let copies_waiting = if copy_slots.is_empty() {
        Value::Array(Vec::new())
    } else {
        let blocking = match sql::open_transactions(&client).await {
            Ok(list) => json!(list),
            Err(e) => json!({ "error": e }),
        };
        Value::Array(
            copy_slots
                .iter()
                .map(|r| {
                    json!({
                        "temporary_slot": r.get::<_, String>(0),
                        "walsender_pid": r.get::<_, Option<i32>>(1),
                        "waits_for": blocking,
                    })
                })
                .collect(),
        )
    };
    let slot = match slot {
        Some(r) => json!({
            "name": cfg.source.slot,
            "exists": true,
            "confirmed_flush_lsn": r.get::<_, Option<String>>(0),
            "restart_lsn": r.get::<_, Option<String>>(1),
            "active": r.get::<_, bool>(2),
            "retained_wal_bytes": r.get::<_, Option<i64>>(3),
            "wal_status": r.get::<_, Option<String>>(4),
        }),
        None => json!({ "name": cfg.source.slot, "exists": false }),
    };
    let (committed, tables) = match &head {
        Some(h) => (
            json!({
                "seq": h.seq,
                "lsn": h.end_lsn.to_string(),
                "commit_time": h.commit_ts.map(micros_to_rfc3339),
                "written_at": micros_to_rfc3339(h.written_at),
                "log": {
                    "folded_through": h.folded,
                    "pruned_through": h.pruned,
                    "retention": humantime::format_duration(cfg.sink.log_retention).to_string(),
                },
            }),
            h.tables
                .keys()
                .chain(h.snapshots.keys())
                .chain(h.identities.keys())
                .map(|t| {
                    let s = h.tables.get(t).cloned().unwrap_or_default();
                    (
                        t.clone(),
                        json!({
                            "rows": s.rows,
                            "last_commit_time": s.last_commit_ts.map(micros_to_rfc3339),
                            "snapshot_lsn": h.snapshots.get(t).map(|l| l.to_string()),
                            "oid": h.identities.get(t).map(|i| i.oid),
                        }),
                    )
                })
                .collect::<serde_json::Map<_, _>>(),
        ),
        None => (Value::Null, Default::default()),
    };
    let last_verify = match crate::verify::read_last(store.as_ref()).await {
        Ok(Some(r)) => last_verify(&r),
        Ok(None) => Value::Null,
        Err(e) => json!({ "error": e }),
    };
    let catalog = match &cfg.glue {
        Some(g) => catalog_status(cfg, g, store.as_ref()).await,
        None => Value::Null,
    };
    // What the running walshore's last compaction pass found.
    let compaction = match &cfg.compaction {
        None => Value::Null,
        Some(_) => match crate::checkpoint::log::read_json::<crate::compaction::Report>(
            store.as_ref(),
            &object_store::path::Path::from(crate::compaction::REPORT),
        )
        .await
        {
            Ok(r) => json!(r),
            Err(e) if crate::checkpoint::log::is_not_found(&e) => {
                json!({ "note": "no compaction pass yet: compaction runs inside walshore run" })
            }
            Err(e) => json!({ "error": e.to_string() }),
        },
    };
    let iceberg = match (&cfg.iceberg, &head) {
        (Some(_), Some(h)) => iceberg_status(cfg, h).await,
        (Some(_), None) => json!({}),
        (None, _) => Value::Null,
    };
    Ok(json!({
        "sink": cfg.sink.url.to_string(),
        "publication": cfg.source.publication,
        "committed": committed,
        "slot": slot,
        "tables": tables,
        "copies_waiting": copies_waiting,
        "last_verify": last_verify,
        "catalog": catalog,
        "iceberg": iceberg,
        "compaction": compaction,
    }))
}

/// Each covered table's Iceberg table: its version, snapshots, watermark, how many
/// commit records it is behind the head, and its live files.
async fn iceberg_status(cfg: &Config, head: &crate::checkpoint::CommitRecord) -> Value {
    let projector = match crate::iceberg::projector::Projector::new(cfg) {
        Ok(Some(p)) => p,
        Ok(None) => return Value::Null,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let progress = projector.progress_seq().await;
    let mut out = serde_json::Map::new();
    for name in head
        .tables
        .keys()
        .filter(|t| cfg.iceberg.as_ref().is_some_and(|i| i.covers(t)))
    {
        let location = projector.location(name);
        let uri = location.uri.clone();
        let value = match crate::iceberg::table::Table::load(location).await {
            Ok(None) => json!({ "location": uri, "exists": false }),
            Err(e) => json!({ "location": uri, "error": e.to_string() }),
            Ok(Some(t)) => {
                let watermark = t.watermark().map(|(seq, _)| seq);
                let held = match (watermark, &progress) {
                    (Some(w), Some((p, listed))) if listed.contains(name) => w.max(*p),
                    (w, _) => w.unwrap_or(0),
                };
                let current = t.metadata().current_snapshot();
                json!({
                    "location": uri,
                    "version": t.version(),
                    "snapshots": t.metadata().snapshots.len(),
                    "watermark_seq": watermark,
                    "behind_commits": head.seq.saturating_sub(held),
                    "data_files": t.live_file_count(crate::iceberg::manifest::DATA),
                    "delete_files": t.live_file_count(crate::iceberg::manifest::POSITION_DELETES),
                    // Rows in data files less the positions deleted (each deleted once).
                    "rows": current.and_then(|s| {
                        let n = |k: &str| s.summary.get(k).and_then(|v| v.parse::<i64>().ok());
                        Some(n("total-records")? - n("total-position-deletes")?)
                    }),
                    "last_snapshot": current.map(|s| micros_to_rfc3339(s.timestamp_ms * 1000)),
                    "last_operation": current.and_then(|s| s.summary.get("operation")),
                })
            }
        };
        out.insert(name.clone(), value);
    }
    Value::Object(out)
}

/// The last `walshore verify`: when, at which point, and what it found.
pub fn last_verify(r: &crate::verify::Report) -> Value {
    let named = |o: crate::verify::Outcome| -> Vec<&str> {
        r.tables
            .iter()
            .filter(|t| t.result == o)
            .map(|t| t.table.as_str())
            .collect()
    };
    json!({
        "result": r.result,
        "point": r.point,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "tables": r.tables.len(),
        "tables_differing": named(crate::verify::Outcome::Differs),
        "tables_unverified": named(crate::verify::Outcome::Unverified),
        "summary": r.summary,
    })
}

/// Glue against the lake: per table, whether its change-log table exists and how many
/// of the lake's partition folders are registered (the next start registers the
/// missing ones). A Glue or lake error is reported in place; the rest of `status` stands.
async fn catalog_status(cfg: &Config, g: &crate::config::GlueConfig, store: &dyn object_store::ObjectStore) -> Value {
    let catalog = crate::catalog::Catalog::open(g, &cfg.sink, &cfg.partitions).await;
    let schemas = match crate::checkpoint::read_schemas(store).await {
        Ok(s) => s,
        Err(e) => return json!({ "database": g.database, "error": e.to_string() }),
    };
    let lake =
        match crate::catalog::lake_partitions(store, &schemas.keys().cloned().collect::<Vec<_>>(), &cfg.partitions)
            .await
        {
            Ok(l) => l,
            Err(e) => return json!({ "database": g.database, "error": e.to_string() }),
        };
    let mut tables = serde_json::Map::new();
    for (table, parts) in &lake {
        let described = catalog.describe(table, parts).await;
        tables.insert(
            table.clone(),
            described.unwrap_or_else(|e| json!({ "error": e.to_string() })),
        );
    }
    json!({ "database": g.database, "tables": tables })
}

/// RFC 3339 in UTC with microseconds.
pub fn micros_to_rfc3339(us: i64) -> String {
    let days = us.div_euclid(86_400_000_000);
    let rem = us.rem_euclid(86_400_000_000);
    let (y, m, d) = crate::batch::civil_from_days(days);
    let secs = rem / 1_000_000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        rem % 1_000_000
    )
}
