//! `walshore check`: one line per check, with the fix for each failure.

use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use crate::config::Config;
use crate::sink::open_store;
use crate::source::{Replication, quote_ident, sql};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Warn,
    Fail,
}

struct Report {
    failures: usize,
}

impl Report {
    fn line(&mut self, outcome: Outcome, name: &str, text: impl std::fmt::Display) {
        let tag = match outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => {
                self.failures += 1;
                "FAIL"
            }
        };
        println!("{tag} {name:<18} {text}");
    }
}

/// Runs every check; returns the number of failures.
pub async fn check(cfg: &Config) -> usize {
    let mut r = Report { failures: 0 };
    r.line(Outcome::Ok, "config", "parsed and valid");
    database_checks(cfg, &mut r).await;
    store_check(cfg, &mut r).await;
    catalog_check(cfg, &mut r).await;
    r.failures
}

async fn database_checks(cfg: &Config, r: &mut Report) {
    let target = cfg.source.conn.redacted();
    let client = match sql::connect(&cfg.source.conn).await {
        Ok(c) => c,
        Err(e) => {
            r.line(Outcome::Fail, "connect", crate::retry::ErrorChain(&e));
            return;
        }
    };
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or_default();
    r.line(Outcome::Ok, "connect", format!("{target} (PostgreSQL {version})"));

    match client.query_one("SHOW wal_level", &[]).await {
        Ok(row) if row.get::<_, String>(0) == "logical" => r.line(Outcome::Ok, "wal_level", "logical"),
        Ok(row) => r.line(Outcome::Fail, "wal_level", format!(
            "is {:?}; set wal_level = logical (Amazon RDS/Aurora: rds.logical_replication = 1 in the parameter group) and restart PostgreSQL",
            row.get::<_, String>(0)
        )),
        Err(e) => r.line(Outcome::Fail, "wal_level", e),
    }

    match Replication::probe(&cfg.source).await {
        Ok((sys, _)) => r.line(Outcome::Ok, "replication", format!("replication connection works (system {}, timeline {})", sys.system_id, sys.timeline)),
        Err(e) => r.line(Outcome::Fail, "replication", format!(
            "{}; the user needs the REPLICATION attribute (ALTER ROLE {} REPLICATION; on RDS: GRANT rds_replication TO {}) and a pg_hba.conf line for replication connections",
            crate::retry::ErrorChain(&e), quote_ident(&cfg.source.conn.user), quote_ident(&cfg.source.conn.user)
        )),
    }

    let publication = &cfg.source.publication;
    let tables = match client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
    {
        Ok(None) => {
            r.line(Outcome::Fail, "publication", format!("{publication:?} does not exist; create it (see sql/setup.sql): CREATE PUBLICATION {} FOR TABLE ...", quote_ident(publication)));
            return;
        }
        Err(e) => {
            r.line(Outcome::Fail, "publication", e);
            return;
        }
        Ok(Some(_)) => client
            .query(
                "SELECT pt.schemaname, pt.tablename, c.relreplident::text, \
                        EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                        has_table_privilege(c.oid, 'SELECT'), \
                        ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a \
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                                AND a.attlen = -1 AND a.attstorage <> 'p' ORDER BY a.attnum) \
                 FROM pg_catalog.pg_publication_tables pt \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname \
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
                 WHERE pt.pubname = $1 ORDER BY 1, 2",
                &[publication],
            )
            .await
            .unwrap_or_default(),
    };
    if tables.is_empty() {
        r.line(
            Outcome::Fail,
            "publication",
            format!(
                "{publication:?} publishes no table; ALTER PUBLICATION {} ADD TABLE ...",
                quote_ident(publication)
            ),
        );
    } else {
        r.line(
            Outcome::Ok,
            "publication",
            format!("{publication:?} publishes {} table(s)", tables.len()),
        );
    }
    if cfg.glue.is_some() {
        // Glue names are lower case with other characters as `_`: two tables may meet.
        let mut by_glue: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for t in &tables {
            let name = format!("{}.{}", t.get::<_, String>(0), t.get::<_, String>(1));
            by_glue.entry(crate::catalog::table_name(&name)).or_default().push(name);
        }
        for (glue, names) in by_glue.iter().filter(|(_, n)| n.len() > 1) {
            r.line(
                Outcome::Fail,
                "catalog names",
                format!(
                    "{} all map to the Glue table {glue}; rename all but one, or take them out of the publication",
                    names.join(", ")
                ),
            );
        }
    }
    for t in &tables {
        let name = format!("{}.{}", t.get::<_, String>(0), t.get::<_, String>(1));
        let quoted = format!(
            "{}.{}",
            quote_ident(&t.get::<_, String>(0)),
            quote_ident(&t.get::<_, String>(1))
        );
        let (ident, has_pk, can_select): (String, bool, bool) = (t.get(2), t.get(3), t.get(4));
        match (ident.as_str(), has_pk) {
            ("f", _) => r.line(Outcome::Ok, "replica identity", format!("{name}: FULL")),
            ("d", true) => r.line(Outcome::Ok, "replica identity", format!("{name}: primary key")),
            ("i", _) => r.line(Outcome::Ok, "replica identity", format!("{name}: index")),
            _ => r.line(Outcome::Fail, "replica identity", format!(
                "{name}: no primary key and no replica identity, so PostgreSQL rejects its UPDATEs and DELETEs; ALTER TABLE {quoted} REPLICA IDENTITY FULL (or add a primary key)"
            )),
        }
        let toastable: Vec<String> = t.get(5);
        if ident != "f" && !toastable.is_empty() {
            r.line(
                Outcome::Warn,
                "toast",
                format!(
                    "{name}: {} can be stored out of line (TOAST); an UPDATE that leaves such a value unchanged does not send it, so the lake has null there and names the column in _unchanged (readers carry the previous value forward); for complete rows: ALTER TABLE {quoted} REPLICA IDENTITY FULL (more WAL per update)",
                    toastable.join(", ")
                ),
            );
        }
        if !has_pk && matches!(ident.as_str(), "f" | "i") {
            r.line(
                Outcome::Warn,
                "primary key",
                format!(
                    "{name}: no primary key; {}",
                    if ident == "f" {
                        "rows are identified by the whole row, so every update is written as D + I and readers key rows by all columns"
                    } else {
                        "rows are identified by the replica identity index"
                    }
                ),
            );
        }
        if !can_select {
            r.line(
                Outcome::Warn,
                "privileges",
                format!(
                    "{name}: no SELECT privilege, which table copies need: GRANT SELECT ON {quoted} TO {}",
                    quote_ident(&cfg.source.conn.user)
                ),
            );
        }
    }

    match client
        .query_opt(
            "SELECT plugin, database, active, wal_status FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await
    {
        Ok(None) => r.line(
            Outcome::Ok,
            "slot",
            format!(
                "{:?} does not exist yet; walshore creates it on first run",
                cfg.source.slot
            ),
        ),
        Ok(Some(row)) => {
            let (plugin, db, active, wal): (Option<String>, Option<String>, bool, Option<String>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            if plugin.as_deref() != Some("pgoutput") || db.as_deref() != Some(cfg.source.conn.dbname.as_str()) {
                r.line(
                    Outcome::Fail,
                    "slot",
                    format!(
                        "{:?} belongs to plugin {plugin:?} in database {db:?}; choose another source.slot",
                        cfg.source.slot
                    ),
                );
            } else if wal.as_deref() == Some("lost") {
                r.line(Outcome::Fail, "slot", format!("{:?} has lost required WAL (max_slot_wal_keep_size exceeded); drop it and take a new initial snapshot", cfg.source.slot));
            } else if active {
                r.line(
                    Outcome::Warn,
                    "slot",
                    format!("{:?} is in use right now (another walshore running?)", cfg.source.slot),
                );
            } else {
                r.line(
                    Outcome::Ok,
                    "slot",
                    format!("{:?} exists (wal_status {})", cfg.source.slot, wal.unwrap_or_default()),
                );
            }
        }
        Err(e) => r.line(Outcome::Fail, "slot", e),
    }
    // How close the slot is to max_slot_wal_keep_size, and whether there is a limit.
    match crate::telemetry::slot::sample(&client, &cfg.source.slot).await {
        Ok(Some(s)) => match s.risk(&cfg.source.slot) {
            Some(risk) => r.line(Outcome::Warn, "slot WAL", risk),
            None => match (s.keep_size, s.safe_wal_size) {
                (Some(keep), Some(safe)) => r.line(
                    Outcome::Ok,
                    "slot WAL",
                    format!(
                        "holds {} MiB; {} MiB more before max_slot_wal_keep_size ({} MiB) invalidates it",
                        s.retained_bytes.unwrap_or(0).max(0) >> 20,
                        safe.max(0) >> 20,
                        keep >> 20
                    ),
                ),
                _ => r.line(
                    Outcome::Ok,
                    "slot WAL",
                    format!(
                        "holds {} MiB; max_slot_wal_keep_size = -1: a stopped walshore makes the server keep WAL until its disk is full (alert on walshore_slot_retained_bytes, or set a limit)",
                        s.retained_bytes.unwrap_or(0).max(0) >> 20
                    ),
                ),
            },
        },
        Ok(None) => {}
        Err(e) => r.line(Outcome::Warn, "slot WAL", format!("cannot read the slot's WAL figures: {e}")),
    }

    // Copies made while streaming (new tables, resnapshot, a copy a crash cut short)
    // take their snapshot from a temporary slot on a WAL sender of their own.
    match client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_catalog.pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_catalog.pg_stat_replication)::int",
            &[],
        )
        .await
    {
        Ok(row) => {
            let (slots, senders): (i32, i32) = (row.get(0), row.get(1));
            // Our own slot and sender are not taken yet when walshore is not running.
            if slots >= 2 && senders >= 2 {
                r.line(
                    Outcome::Ok,
                    "copy slots",
                    format!("{slots} replication slots and {senders} WAL senders free (table copies while streaming need one of each for a moment)"),
                );
            } else {
                r.line(
                    Outcome::Warn,
                    "copy slots",
                    format!("only {slots} replication slots and {senders} WAL senders free: copies of tables added later or resnapshot need one more of each beside walshore's own; raise max_replication_slots and max_wal_senders"),
                );
            }
        }
        Err(e) => r.line(Outcome::Warn, "copy slots", e),
    }
}

async fn store_check(cfg: &Config, r: &mut Report) {
    let store = match open_store(&cfg.sink) {
        Ok(s) => s,
        Err(e) => {
            r.line(Outcome::Fail, "object store", crate::retry::ErrorChain(&e));
            return;
        }
    };
    let probe = Path::from(format!(
        "_walshore/check-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = async {
        store.put(&probe, PutPayload::from_static(b"walshore check")).await?;
        store.get(&probe).await?.bytes().await?;
        store.delete(&probe).await
    }
    .await;
    match result {
        Ok(()) => r.line(Outcome::Ok, "object store", format!("{} is writable", cfg.sink.url)),
        Err(e) => r.line(
            Outcome::Fail,
            "object store",
            format!(
                "cannot write to {}: {}; check the bucket, prefix, endpoint and credentials (the standard AWS chain)",
                cfg.sink.url,
                crate::retry::ErrorChain(&e)
            ),
        ),
    }
}

async fn catalog_check(cfg: &Config, r: &mut Report) {
    let Some(glue) = &cfg.glue else {
        r.line(Outcome::Ok, "catalog", "catalog.kind = \"none\": nothing to register");
        return;
    };
    let catalog = crate::catalog::Catalog::open(glue, &cfg.sink, &cfg.partitions).await;
    match catalog.probe().await {
        Ok(true) => r.line(
            Outcome::Ok,
            "catalog",
            format!("Glue database {} is reachable", glue.database),
        ),
        Ok(false) => r.line(
            Outcome::Ok,
            "catalog",
            format!(
                "Glue is reachable; database {} does not exist yet and is created at the first commit",
                glue.database
            ),
        ),
        Err(e) => r.line(Outcome::Fail, "catalog", e),
    }
}
