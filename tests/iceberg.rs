//! walshore's Iceberg tables, read by two independent readers: DuckDB's iceberg
//! extension (`iceberg_scan` by path) and pyiceberg (`StaticTable`). Each commit below is
//! read back by both and must equal the rows the test expects: added rows, rows updated
//! and deleted through position deletes, and a truncate.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Decimal128Array, Int16Array, Int64Array, ListBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema as ArrowSchema};
use object_store::local::LocalFileSystem;
use std::time::Duration;

use support::{
    BIN, LogOnPanic, Moto, SinkKind, cluster, edit_config, free_port, lake_config, open_lake, python_json, scrape,
    set_fake_aws_env, source_rows, spawn_run, stop, sync, use_initial_snapshot, wait_until, write_config,
};
use walshore::batch::schema::{LakeColumn, LakeSchema};
use walshore::iceberg::table::{Commit, Location, Table, WATERMARK_LSN, WATERMARK_SEQ};

fn lake() -> LakeSchema {
    let c = |name: &str, arrow_type: DataType, key: bool| LakeColumn {
        name: name.into(),
        arrow_type: arrow_type.to_string(),
        pg_type_oid: 0,
        pg_type_modifier: -1,
        dropped: false,
        key,
    };
    LakeSchema {
        columns: vec![
            c("id", DataType::Int64, true),
            c("sym", DataType::Utf8, false),
            c("px", DataType::Decimal128(18, 6), false),
            c("qty", DataType::Int16, false),
            c(
                "tags",
                DataType::List(Arc::new(Field::new("element", DataType::Utf8, true))),
                false,
            ),
        ],
    }
}

/// One row of the test table: id, sym, px (unscaled, 6 decimals), qty, tags, lsn.
#[derive(Clone)]
struct Row {
    id: i64,
    sym: String,
    px: i128,
    qty: i16,
    tags: Vec<String>,
    lsn: i64,
}

fn row(id: i64, version: i64) -> Row {
    Row {
        id,
        sym: format!("S{id:03}"),
        px: (id * 1_000_000 + version) as i128 * 10 + 5,
        qty: (id % 7) as i16 - 3,
        tags: (0..id % 3).map(|t| format!("t{t}")).collect(),
        lsn: 1000 + version,
    }
}

/// The rows as the change log would hold them (lake types, `_lsn`, `_commit_ts`).
fn batch(rows: &[Row]) -> RecordBatch {
    let mut tags = ListBuilder::new(StringBuilder::new());
    for r in rows {
        for t in &r.tags {
            tags.values().append_value(t);
        }
        tags.append(!r.tags.is_empty() || r.id % 2 == 0);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.id))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.sym.clone()))),
        Arc::new(
            Decimal128Array::from_iter_values(rows.iter().map(|r| r.px))
                .with_precision_and_scale(18, 6)
                .unwrap(),
        ),
        Arc::new(Int16Array::from_iter_values(rows.iter().map(|r| r.qty))),
        Arc::new(tags.finish()),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.lsn))),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| 1_767_225_600_000_000 + r.lsn))
                .with_timezone("UTC"),
        ),
    ];
    let fields: Vec<Field> = ["id", "sym", "px", "qty", "tags", "_lsn", "_commit_ts"]
        .iter()
        .zip(&columns)
        .map(|(n, c)| Field::new(*n, c.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(Arc::new(ArrowSchema::new(fields)), columns).unwrap()
}

/// What a reader should print for `rows`: id, sym, px, qty, tags, _lsn as text, sorted
/// as the reader script sorts them.
fn expected(rows: &BTreeMap<i64, Row>) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = rows
        .values()
        .map(|r| {
            let px = format!("{}.{:06}", r.px / 1_000_000, r.px % 1_000_000);
            let tags = if r.tags.is_empty() && r.id % 2 != 0 {
                "NULL".to_owned()
            } else {
                format!("[{}]", r.tags.join(", "))
            };
            vec![
                r.id.to_string(),
                r.sym.clone(),
                px,
                r.qty.to_string(),
                tags,
                r.lsn.to_string(),
            ]
        })
        .collect();
    out.sort();
    out
}

fn read(reader: &str, dir: &std::path::Path) -> Vec<Vec<String>> {
    let table = dir.to_str().unwrap();
    let v = python_json(
        "read_iceberg.py",
        &[reader, table, "id", "sym", "px", "qty", "tags", "_lsn"],
    );
    serde_json::from_value(v).unwrap()
}

fn assert_both_read(dir: &std::path::Path, want: &BTreeMap<i64, Row>, what: &str) {
    let want = expected(want);
    for reader in ["duckdb", "pyiceberg"] {
        let got = read(reader, dir);
        assert_eq!(got.len(), want.len(), "{reader} after {what}: row count");
        assert_eq!(got, want, "{reader} after {what}");
    }
}

fn watermark(seq: u64, lsn: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        (WATERMARK_SEQ.to_owned(), seq.to_string()),
        (WATERMARK_LSN.to_owned(), lsn.to_string()),
    ])
}

/// The `public.prices` Iceberg table's place in a file lake at `lake_dir`, and its
/// directory.
fn prices_location(lake_dir: &std::path::Path) -> (Location, std::path::PathBuf) {
    let store = Arc::new(LocalFileSystem::new_with_prefix(lake_dir).unwrap());
    let dir = lake_dir.join("_iceberg/public/prices");
    let location = Location {
        store,
        root: "_iceberg/public/prices".into(),
        uri: format!("file://{}", dir.display()),
    };
    (location, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_deletes_and_a_truncate_read_back_in_duckdb_and_pyiceberg() {
    let lake_dir = tempfile::tempdir().unwrap();
    let (location, dir) = prices_location(lake_dir.path());
    assert!(Table::load(location.clone()).await.unwrap().is_none());
    let mut table = Table::create(location.clone(), &lake(), 4).await.unwrap();
    assert_eq!(table.metadata().default_spec().buckets(), Some(4));
    // A crash between the first metadata file and its hint: the table is there.
    std::fs::remove_file(dir.join("metadata/version-hint.text")).unwrap();
    let mut again = Table::load(location.clone())
        .await
        .unwrap()
        .expect("found by its first version");
    assert_eq!(again.version(), 1);
    again.repair_hint().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("metadata/version-hint.text")).unwrap(),
        "1"
    );

    // 1. 200 rows, spread over the four buckets.
    let mut state: BTreeMap<i64, Row> = (0..200).map(|id| (id, row(id, 0))).collect();
    let rows: Vec<Row> = state.values().cloned().collect();
    let committed = table
        .commit(Commit {
            rows: vec![batch(&rows)],
            summary: watermark(1, 1000),
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(committed.data_files.len(), 4, "one data file a bucket");
    assert_both_read(&dir, &state, "the first append");

    // Where each id lives: the file and its position there.
    let mut at: BTreeMap<i64, (String, i64)> = BTreeMap::new();
    let index = |files: &[(String, Option<i32>, RecordBatch)], at: &mut BTreeMap<i64, (String, i64)>| {
        for (path, _, rows) in files {
            let ids = rows.column_by_name("id").unwrap();
            let ids = ids.as_any().downcast_ref::<Int64Array>().unwrap();
            for (pos, id) in ids.values().iter().enumerate() {
                at.insert(*id, (path.clone(), pos as i64));
            }
        }
    };
    index(&committed.data_files, &mut at);

    // 2. Update every fifth id, delete every seventh, add ten new ones.
    let mut deletes: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut rows = Vec::new();
    for id in (0..200).step_by(5) {
        let (file, pos) = at[&id].clone();
        deletes.entry(file).or_default().push(pos);
        let r = row(id, 1);
        state.insert(id, r.clone());
        rows.push(r);
    }
    for id in (3..200).step_by(7).filter(|id| id % 5 != 0) {
        let (file, pos) = at[&id].clone();
        deletes.entry(file).or_default().push(pos);
        state.remove(&id);
    }
    for id in 200..210 {
        let r = row(id, 1);
        state.insert(id, r.clone());
        rows.push(r);
    }
    let committed = table
        .commit(Commit {
            rows: vec![batch(&rows)],
            deletes,
            summary: watermark(2, 1001),
            ..Commit::default()
        })
        .await
        .unwrap();
    index(&committed.data_files, &mut at);
    assert_both_read(&dir, &state, "updates and deletes");

    // 3. Delete an updated row again (a delete of a row added in the last commit).
    let (file, pos) = at[&10].clone();
    state.remove(&10);
    table
        .commit(Commit {
            deletes: BTreeMap::from([(file, vec![pos])]),
            summary: watermark(3, 1002),
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_both_read(&dir, &state, "a delete only");

    // A fresh load sees the same table: version, watermark and live files.
    let loaded = Table::load(location.clone()).await.unwrap().unwrap();
    assert_eq!(loaded.version(), table.version());
    assert_eq!(loaded.watermark(), Some((3, 1002)));
    let live = loaded.live_files().await.unwrap();
    assert_eq!(live.iter().filter(|e| e.file.content == 0).count(), 8);
    assert_eq!(live.iter().filter(|e| e.file.content == 1).count(), 5);

    // 4. A truncate, then three rows.
    let mut table = loaded;
    state = (500..503).map(|id| (id, row(id, 9))).collect();
    let rows: Vec<Row> = state.values().cloned().collect();
    let after_truncate = table
        .commit(Commit {
            rows: vec![batch(&rows)],
            truncate: true,
            summary: watermark(4, 1009),
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_both_read(&dir, &state, "a truncate");
    let s = table.metadata().current_snapshot().unwrap();
    assert_eq!(s.summary["operation"], "overwrite");
    assert_eq!(s.summary["total-records"], "3");
    assert_eq!(s.summary["total-delete-files"], "0");

    // The next commit leaves the truncate's all-deleted manifests behind.
    state.insert(600, row(600, 10));
    let last = table
        .commit(Commit {
            rows: vec![batch(&[row(600, 10)])],
            summary: watermark(5, 1010),
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_both_read(&dir, &state, "an append after the truncate");
    let live = table.live_files().await.unwrap();
    assert_eq!(live.len(), after_truncate.data_files.len() + last.data_files.len());
    assert!(live.iter().all(|e| e.status == 1), "only added entries are live");
}

/// Replaced metadata files go once 16 versions behind and past the grace (zero here),
/// while every version the `metadata-log` lists stays and the table loads; a version
/// a catalog may name (`keep_from`) stays whatever its age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_metadata_files_are_deleted_but_the_logged_and_the_cataloged_stay() {
    let lake_dir = tempfile::tempdir().unwrap();
    let (location, dir) = prices_location(lake_dir.path());
    let mut table = Table::create(location.clone(), &lake(), 4).await.unwrap();
    table.set_metadata_grace(Duration::ZERO);
    async fn commit(table: &mut Table, seq: i64) {
        let c = Commit {
            rows: vec![batch(&[row(seq, seq)])],
            summary: watermark(seq as u64, 1000 + seq as u64),
            ..Commit::default()
        };
        table.commit(c).await.unwrap();
    }
    for seq in 1..=20 {
        commit(&mut table, seq).await;
    }
    let exists = |v: u64| dir.join(format!("metadata/v{v}.metadata.json")).exists();
    let version = table.version();
    assert_eq!(version, 21);
    assert!((1..=4).all(|v| !exists(v)), "versions 16 behind are deleted");
    assert!((5..=21).all(exists), "the last 16 and the current stay");
    let metadata: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("metadata/v{version}.metadata.json"))).unwrap())
            .unwrap();
    let logged = metadata["metadata-log"].as_array().unwrap();
    assert_eq!(logged.len(), 16);
    for entry in logged {
        let file = entry["metadata-file"]
            .as_str()
            .unwrap()
            .strip_prefix("file://")
            .unwrap();
        assert!(std::path::Path::new(file).exists(), "{file} is listed and there");
    }
    // A stale hint still finds the newest version.
    std::fs::write(dir.join("metadata/version-hint.text"), "10").unwrap();
    let loaded = Table::load(location.clone()).await.unwrap().unwrap();
    assert_eq!(loaded.version(), version);
    table.repair_hint().await.unwrap();

    // A catalog names version 21: it stays while 20 more versions follow.
    table.keep_from(Some(21));
    for seq in 21..=40 {
        commit(&mut table, seq).await;
    }
    assert!(exists(21), "the version a catalog may name stays");
    assert!((5..=20).all(|v| !exists(v)), "older ones go");
    // Unknown yet (Some(0)): nothing goes.
    table.keep_from(Some(0));
    commit(&mut table, 41).await;
    assert!(
        exists(21) && exists(22),
        "nothing is deleted while the catalog's version is unknown"
    );
}

/// The `prices` table of these tests.
const PRICES: &str = "CREATE TABLE prices (sym text PRIMARY KEY, px numeric(18,6), qty int, note text)";

/// A throwaway PostgreSQL whose `setup` (SQL) makes the tables and publication `pub`, a
/// file lake with the `[iceberg]` section `iceberg` (and `extra` config after it),
/// synced once so that the slot exists.
/// Destructured as `{ _cluster, _dir, c, config, lake }`: the cluster is dropped last.
struct IcebergLake {
    c: tokio_postgres::Client,
    config: std::path::PathBuf,
    lake: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _cluster: walshore::cluster::TempCluster,
}

async fn iceberg_lake(setup: &str, iceberg: &str, extra: &str) -> IcebergLake {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(setup).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[iceberg]\n{iceberg}\n{extra}")).unwrap();
    let lake = dir.path().join("lake");
    sync(&config);
    IcebergLake {
        c,
        config,
        lake,
        _dir: dir,
        _cluster: cluster,
    }
}

/// The Iceberg table of `public.{table}` under a file-sink lake, read by `reader`, with
/// the columns of `select` (whose rows are compared), as `source_rows` gives them.
fn iceberg_rows(reader: &str, lake: &std::path::Path, table: &str, columns: &[&str]) -> Vec<Vec<Option<String>>> {
    let dir = lake.join("_iceberg/public").join(table);
    let mut args = vec![reader.to_owned(), dir.to_str().unwrap().to_owned()];
    args.extend(columns.iter().map(|c| c.to_string()));
    let rows: Vec<Vec<String>> = serde_json::from_value(python_json("read_iceberg.py", &args)).unwrap();
    let mut rows: Vec<Vec<Option<String>>> = rows
        .into_iter()
        .map(|r| r.into_iter().map(|v| (v != "NULL").then_some(v)).collect())
        .collect();
    rows.sort();
    rows
}

async fn assert_iceberg_equals_source(c: &tokio_postgres::Client, lake: &std::path::Path, what: &str) {
    assert_columns_equal(c, lake, what, &["sym", "px", "qty", "note"]).await;
}

async fn assert_columns_equal(c: &tokio_postgres::Client, lake: &std::path::Path, what: &str, columns: &[&str]) {
    assert_rows_equal(c, lake, "prices", what, columns).await;
}

/// Both readers see `public.{table}`'s Iceberg table hold the source's rows (equal
/// rows as many times as the source has them).
async fn assert_rows_equal(
    c: &tokio_postgres::Client,
    lake: &std::path::Path,
    table: &str,
    what: &str,
    columns: &[&str],
) {
    let select = columns
        .iter()
        .map(|c| format!("{c}::text"))
        .collect::<Vec<_>>()
        .join(", ");
    let want = source_rows(c, &format!("SELECT {select} FROM {table}")).await;
    for reader in ["duckdb", "pyiceberg"] {
        let got = iceberg_rows(reader, lake, table, columns);
        // What the table and the projector said, should the rows differ.
        let state = || {
            let root = lake.join("_iceberg/public").join(table).join("metadata");
            let hint = std::fs::read_to_string(root.join("version-hint.text")).unwrap_or_default();
            let metadata: serde_json::Value =
                serde_json::from_slice(&std::fs::read(root.join(format!("v{hint}.metadata.json"))).unwrap_or_default())
                    .unwrap_or_default();
            let progress = std::fs::read_to_string(lake.join("_walshore/iceberg/progress.json")).unwrap_or_default();
            let summaries: Vec<&serde_json::Value> = metadata["snapshots"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| &s["summary"])
                .collect();
            format!("version {hint}, progress {progress}, snapshots {summaries:?}")
        };
        assert_eq!(got.len(), want.len(), "{reader} after {what}: row count; {}", state());
        assert!(got == want, "{reader} after {what}: rows differ");
    }
}

/// `walshore sync` with `[iceberg]` leaves a table that DuckDB and pyiceberg read equal
/// to the source: inserts, updates, deletes, values PostgreSQL did not send (unchanged
/// TOAST, within one sync and across two), a truncate; a sync with nothing new commits
/// no snapshot; and a table removed with its progress is rebuilt from the whole log.
#[tokio::test]
async fn sync_keeps_the_iceberg_table_equal_to_the_source() {
    keeps_equal("").await;
}

/// The same with a key index bounded below the table (`index_memory`): one of four
/// buckets fits, the others are looked up from their files each interval, and a bucket
/// that outgrows the bound is let go.
#[tokio::test]
async fn sync_keeps_the_iceberg_table_equal_with_a_key_index_smaller_than_the_table() {
    keeps_equal("\nindex_memory = \"2KiB\"").await;
}

/// A first build whose change log is one file larger than `max_fold` (as a copy's
/// files are, up to a million rows) folds it in slices of rows, a snapshot each (the
/// last one carries the watermark), and the key index the slices leave finds every
/// row for the changes after.
#[tokio::test]
async fn a_change_log_file_larger_than_a_fold_is_built_in_slices() {
    // 64 KiB: 256 rows a fold.
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(
        &format!("{PRICES}; CREATE PUBLICATION pub FOR TABLE prices"),
        "commit_interval = \"1s\"\nbuckets = 4\nmax_fold = \"64KiB\"",
        "",
    )
    .await;
    c.batch_execute("INSERT INTO prices SELECT 'S' || i, i * 0.5, i, NULL FROM generate_series(1, 2000) i")
        .await
        .unwrap();
    sync(&config);
    let log_files = files_under(&lake.join("public/prices"));
    assert_eq!(log_files.len(), 1, "one change-log file: {log_files:?}");
    // Built anew from the change log: the first build.
    std::fs::remove_dir_all(lake.join("_iceberg")).unwrap();
    std::fs::remove_file(lake.join("_walshore/iceberg/progress.json")).unwrap();
    sync(&config);
    let metadata = prices_metadata(&lake);
    let snapshots = metadata["snapshots"].as_array().unwrap();
    let unfinished = snapshots
        .iter()
        .take_while(|s| s["summary"].get("walshore.seq").is_none())
        .count();
    assert_eq!(
        unfinished, 7,
        "2,000 rows in slices of 256: 7 unfinished snapshots, then the last"
    );
    assert_iceberg_equals_source(&c, &lake, "a first build in slices").await;

    c.batch_execute("UPDATE prices SET qty = -qty WHERE qty % 3 = 0; DELETE FROM prices WHERE qty % 7 = 0")
        .await
        .unwrap();
    sync(&config);
    assert_iceberg_equals_source(&c, &lake, "changes after a build in slices").await;
    assert_verified(&config, "changes after a build in slices");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_in_chunks_side_by_side_is_built_a_fold_at_a_time() {
    // Two connections copy 4 MiB chunks side by side, each a few files (1 MiB of rows
    // buffered a connection): the copy's commit record lists the chunks in the order
    // they ended, not in (_lsn, _seq) order. A fold holds 16,384 rows (4 MiB).
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(&format!(
        "{PRICES}; INSERT INTO prices SELECT 'S' || i, i * 0.5, i, NULL FROM generate_series(1, 200000) i;
         CREATE PUBLICATION pub FOR TABLE prices"
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    use_initial_snapshot(&config, "parallelism = 2\nchunk_size = \"4MiB\"");
    edit_config(&config, "flush_interval", "max_buffer = \"2MiB\"\nflush_interval");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[iceberg]\ncommit_interval = \"1s\"\nbuckets = 4\nmax_fold = \"4MiB\"\n"),
    )
    .unwrap();
    sync(&config);
    let lake = dir.path().join("lake");
    let log_files = files_under(&lake.join("public/prices")).len();
    assert!(
        log_files >= 6,
        "the copy wrote {log_files} change-log files; the test needs several a chunk"
    );
    // Taken in (_lsn, _seq) order the chunks' files do not overlap: each file larger
    // than a fold is folded in slices, smaller ones together up to a fold. In record
    // order, a part could end only where every chunk before it had ended.
    let metadata = prices_metadata(&lake);
    let added: Vec<u64> = metadata["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["summary"]["operation"] != "replace") // compactions after it
        .map(|s| s["summary"]["added-records"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        added.len() >= 200_000 / (2 * 16_384) && added.iter().all(|n| *n < 2 * 16_384),
        "every part of the build holds less than two folds' rows: {added:?}"
    );
    assert_iceberg_equals_source(&c, &lake, "a copy built a fold at a time").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_beyond_max_snapshots_expire_however_young() {
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(
        &format!(
            "{PRICES}; INSERT INTO prices SELECT 'S' || i, i, i, NULL FROM generate_series(1, 100) i;
             CREATE PUBLICATION pub FOR TABLE prices"
        ),
        "commit_interval = \"1s\"\nbuckets = 4\nmax_snapshots = 4",
        "",
    )
    .await;
    for round in 0..8 {
        c.batch_execute(&format!(
            "UPDATE prices SET qty = qty + 1 WHERE qty % 4 = {}",
            round % 4
        ))
        .await
        .unwrap();
        sync(&config);
    }
    let metadata = prices_metadata(&lake);
    let snapshots = metadata["snapshots"].as_array().unwrap();
    let seqs: Vec<i64> = snapshots
        .iter()
        .map(|s| s["sequence-number"].as_i64().unwrap())
        .collect();
    let newest = metadata["last-sequence-number"].as_i64().unwrap();
    assert!(newest > 8, "each round took a snapshot: {newest}");
    assert_eq!(
        seqs,
        (newest - 3..=newest).collect::<Vec<_>>(),
        "the newest four are kept"
    );
    let current = metadata["current-snapshot-id"].as_i64().unwrap();
    assert!(
        snapshots.iter().any(|s| s["snapshot-id"] == current),
        "the current one among them"
    );
    let log: Vec<&serde_json::Value> = metadata["snapshot-log"].as_array().unwrap().iter().collect();
    assert!(
        log.iter()
            .all(|e| snapshots.iter().any(|s| s["snapshot-id"] == e["snapshot-id"])),
        "the snapshot log names retained snapshots only: {log:?}"
    );
    assert_iceberg_equals_source(&c, &lake, "after snapshots expired by count").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_snapshot_expired_by_count_reaches_stays_for_the_retention() {
    // One snapshot kept, a retention of 3 s: the copy's data files age past it, an
    // update then takes a snapshot that still reads them, and a compaction replaces
    // them in the next. The update's snapshot expires by count, young, while a reader
    // may hold it: its manifest list stays, and so must every file it reaches, old or not.
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(
        &format!("{PRICES}; CREATE PUBLICATION pub FOR TABLE prices"),
        "commit_interval = \"1s\"\nbuckets = 2\nmax_snapshots = 1\nsnapshot_retention = \"3s\"",
        "",
    )
    .await;
    c.batch_execute("INSERT INTO prices SELECT 'S' || i, i, i, NULL FROM generate_series(1, 1000) i")
        .await
        .unwrap();
    sync(&config);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A third of the rows deleted: both buckets are compacted after the update.
    c.batch_execute("DELETE FROM prices WHERE qty % 3 = 0").await.unwrap();
    sync(&config);
    assert_iceberg_equals_source(&c, &lake, "after a count expiry").await;
    let metadata = prices_metadata(&lake);
    assert_eq!(metadata["snapshots"].as_array().unwrap().len(), 1, "one snapshot kept");
    let dir = lake.join("_iceberg/public/prices");
    let lists: Vec<std::path::PathBuf> = files_under(&dir.join("metadata"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("snap-"))
        .collect();
    assert!(
        lists.len() >= 2,
        "the expired snapshots' lists are young and stay: {lists:?}"
    );
    let exists = |uri: &str| std::path::Path::new(uri.strip_prefix("file://").unwrap()).exists();
    let mut files = 0;
    for list in lists {
        let manifests = walshore::iceberg::manifest::read_manifest_list(&std::fs::read(&list).unwrap()).unwrap();
        for m in manifests {
            assert!(exists(&m.path), "{} names {}, deleted", list.display(), m.path);
            let entries = walshore::iceberg::manifest::read_manifest(
                &std::fs::read(m.path.strip_prefix("file://").unwrap()).unwrap(),
                &m,
            )
            .unwrap();
            for e in entries
                .iter()
                .filter(|e| e.status != walshore::iceberg::manifest::DELETED)
            {
                files += 1;
                assert!(
                    exists(&e.file.path),
                    "{} reaches {}, deleted",
                    list.display(),
                    e.file.path
                );
            }
        }
    }
    assert!(files > 0);
}

/// The metadata of `public.prices`'s Iceberg table in the lake, as the hint names it.
fn prices_metadata(lake: &std::path::Path) -> serde_json::Value {
    let dir = lake.join("_iceberg/public/prices/metadata");
    let hint = std::fs::read_to_string(dir.join("version-hint.text")).unwrap();
    serde_json::from_slice(&std::fs::read(dir.join(format!("v{hint}.metadata.json"))).unwrap()).unwrap()
}

/// Every file under `dir`, at any depth.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

async fn keeps_equal(index_memory: &str) {
    // A small fold: the backlog and the rebuild take several snapshots each.
    let setup = format!(
        "{PRICES}; ALTER TABLE prices ALTER COLUMN note SET STORAGE EXTERNAL; CREATE PUBLICATION pub FOR TABLE prices"
    );
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(
        &setup,
        &format!("commit_interval = \"1s\"\nbuckets = 4\nmax_fold = \"4KiB\"{index_memory}"),
        "",
    )
    .await;

    // Inserts, then updates and deletes in the same sync; a large value stored out of
    // line, then its row updated without touching it (PostgreSQL does not send it).
    let big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 200) g)";
    c.batch_execute(&format!(
        "INSERT INTO prices SELECT 'S' || i, i * 1.25, i, NULL FROM generate_series(1, 300) i;
         UPDATE prices SET px = px + 0.000001, qty = -qty WHERE qty % 5 = 0;
         DELETE FROM prices WHERE qty % 7 = 0;
         INSERT INTO prices VALUES ('BIG1', 1, 1, {big}), ('BIG2', 2, 2, 'x' || {big});
         UPDATE prices SET qty = 10 WHERE sym = 'BIG1';"
    ))
    .await
    .unwrap();
    sync(&config);
    assert_iceberg_equals_source(&c, &lake, "inserts, updates and deletes").await;

    // Across syncs: the unchanged value now comes from the Iceberg table's own row,
    // also through a change of key (a delete, then an insert without the value).
    c.batch_execute(
        "UPDATE prices SET sym = 'BIG1X' WHERE sym = 'BIG1';
         UPDATE prices SET qty = 20 WHERE sym IN ('BIG1X', 'BIG2');
         UPDATE prices SET sym = 'BIG2X', qty = 21 WHERE sym = 'BIG2';
         UPDATE prices SET px = 0 WHERE sym LIKE 'S1%';
         DELETE FROM prices WHERE sym LIKE 'S2%';
         INSERT INTO prices VALUES ('S20', 20, 20, 'back');",
    )
    .await
    .unwrap();
    sync(&config);
    assert_iceberg_equals_source(&c, &lake, "a second sync").await;
    assert_verified(&config, "a second sync");
    // `walshore status` shows the table caught up, with its rows and files.
    let status = support::status(&config);
    let iceberg = &status["iceberg"]["public.prices"];
    assert_eq!(iceberg["behind_commits"], 0, "{status}");
    let rows = source_rows(&c, "SELECT count(*)::text FROM prices").await;
    assert_eq!(iceberg["rows"].to_string(), rows[0][0].clone().unwrap(), "{status}");
    assert!(iceberg["data_files"].as_i64().unwrap() >= 1, "{status}");
    let hint = lake.join("_iceberg/public/prices/metadata/version-hint.text");
    let version = std::fs::read_to_string(&hint).unwrap();

    // Nothing new: the table is tidied (every bucket rewritten into one data file, no
    // delete file left; `max_fold` a sync, so a few syncs here), then a sync commits
    // nothing.
    let mut tidy = false;
    for _ in 0..6 {
        sync(&config);
        let status = support::status(&config);
        let iceberg = &status["iceberg"]["public.prices"];
        if iceberg["delete_files"] == 0 && iceberg["data_files"].as_i64().unwrap() <= 4 {
            tidy = true;
            break;
        }
    }
    assert!(tidy, "quiet syncs tidy the table");
    assert_iceberg_equals_source(&c, &lake, "quiet compactions").await;
    let tidied = std::fs::read_to_string(&hint).unwrap();
    assert!(tidied.parse::<u64>().unwrap() >= version.parse::<u64>().unwrap());
    sync(&config);
    assert_eq!(
        std::fs::read_to_string(&hint).unwrap(),
        tidied,
        "a sync with nothing new on a tidy table commits nothing"
    );

    // A truncate, then rows.
    c.batch_execute("TRUNCATE prices; INSERT INTO prices VALUES ('T1', 1, 1, NULL), ('T2', 2, 2, 'two');")
        .await
        .unwrap();
    sync(&config);
    assert_iceberg_equals_source(&c, &lake, "a truncate").await;

    // The source's columns change: one added, one widened (int to bigint), one
    // dropped. The Iceberg schema follows; rows written before read the new column as
    // null, as PostgreSQL shows them.
    c.batch_execute(
        "INSERT INTO prices VALUES ('T3', 3, 3, 'three');
         ALTER TABLE prices ADD COLUMN venue text;
         ALTER TABLE prices ALTER COLUMN qty TYPE bigint;
         ALTER TABLE prices DROP COLUMN note;
         UPDATE prices SET venue = 'XLON', qty = 5000000000 WHERE sym = 'T2';
         INSERT INTO prices VALUES ('T4', 4, 4, 'XNYS');",
    )
    .await
    .unwrap();
    sync(&config);
    let evolved = ["sym", "px", "qty", "venue"];
    assert_columns_equal(&c, &lake, "columns added, widened and dropped", &evolved).await;
    assert_verified(&config, "columns added, widened and dropped");

    // The table and the projector's progress removed: rebuilt from the whole log.
    std::fs::remove_dir_all(lake.join("_iceberg")).unwrap();
    std::fs::remove_file(lake.join("_walshore/iceberg/progress.json")).unwrap();
    c.batch_execute("UPDATE prices SET venue = 'XPAR' WHERE sym = 'T1'")
        .await
        .unwrap();
    sync(&config);
    assert_columns_equal(&c, &lake, "a rebuild", &evolved).await;
    // The rebuild took several snapshots (max_fold): all but the last unfinished.
    let metadata = prices_metadata(&lake);
    let snapshots = metadata["snapshots"].as_array().unwrap();
    let finished = |s: &serde_json::Value| s["summary"].get("walshore.seq").is_some();
    // (A compaction may follow, a `replace` that keeps the watermark.)
    let first = snapshots.iter().position(finished).expect("a finished snapshot");
    assert!(first >= 2, "a rebuild in parts: {first} unfinished snapshots first");
    assert!(
        snapshots[first + 1..]
            .iter()
            .all(|s| finished(s) && s["summary"]["operation"] == "replace"),
        "{snapshots:#?}"
    );

    // `walshore iceberg rebuild` replaces every file in place; a wrong name is refused.
    let version = std::fs::read_to_string(lake.join("_iceberg/public/prices/metadata/version-hint.text")).unwrap();
    let out = support::walshore(&[
        "iceberg",
        "rebuild",
        "--config",
        config.to_str().unwrap(),
        "--table",
        "public.prices",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_columns_equal(&c, &lake, "walshore iceberg rebuild", &evolved).await;
    let after = std::fs::read_to_string(lake.join("_iceberg/public/prices/metadata/version-hint.text")).unwrap();
    assert_eq!(
        after.parse::<u64>().unwrap(),
        version.parse::<u64>().unwrap() + 1,
        "one snapshot replaces the table whole (readers never see it part-built)"
    );
    let out = support::walshore(&[
        "iceberg",
        "rebuild",
        "--config",
        config.to_str().unwrap(),
        "--table",
        "prices",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("schema.table"));
}

/// A crash at each step of the projector's commit (`walshore::fault::ICEBERG_POINTS`):
/// the next `sync` leaves the Iceberg table equal to the source, as both readers see it.
#[tokio::test]
async fn a_crash_at_every_step_of_an_iceberg_commit_leaves_the_table_exact() {
    let setup = format!("{PRICES}; CREATE PUBLICATION pub FOR TABLE prices");
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(&setup, "buckets = 2", "").await;
    c.batch_execute("INSERT INTO prices SELECT 'S' || i, i, i, 'n' || i FROM generate_series(1, 100) i")
        .await
        .unwrap();
    sync(&config);
    for (round, point) in walshore::fault::ICEBERG_POINTS.iter().enumerate() {
        // Updates (position deletes and new rows), deletes and inserts, every round.
        c.batch_execute(&format!(
            "UPDATE prices SET qty = qty + 1, px = px + {round} WHERE qty % 3 = {m};
             DELETE FROM prices WHERE sym = 'S{d}';
             INSERT INTO prices VALUES ('N{round}', {round}, {round}, NULL);",
            m = round % 3,
            d = 10 + round
        ))
        .await
        .unwrap();
        let out = std::process::Command::new(BIN)
            .args(["sync", "--config", config.to_str().unwrap()])
            .env("WALSHORE_FAULT", point)
            .env("WALSHORE_LOG", "info")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(&format!("fault injected at {point}")),
            "{point}: sync did not crash there (built without --features fault-injection?):\n{stderr}"
        );
        sync(&config);
        assert_iceberg_equals_source(&c, &lake, point).await;
    }

    // Expiry: with a retention of a second, every older snapshot goes, and with it
    // every file only they reached and every file the crashes left behind.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}snapshot_retention = \"1s\"\n")).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sync(&config);
    assert_iceberg_equals_source(&c, &lake, "expiry").await;
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&lake).unwrap());
    let table_dir = lake.join("_iceberg/public/prices");
    let location = Location {
        store,
        root: "_iceberg/public/prices".into(),
        uri: format!("file://{}", table_dir.display()),
    };
    let table = Table::load(location).await.unwrap().unwrap();
    assert_eq!(
        table.metadata().snapshots.len(),
        1,
        "only the current snapshot is retained"
    );
    let mut want: Vec<String> = table
        .live_files()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.file.path)
        .collect();
    want.push(table.metadata().current_snapshot().unwrap().manifest_list.clone());
    want.extend(table.manifests().iter().map(|m| m.path.clone()));
    want.sort();
    let mut got: Vec<String> = files_under(&table_dir)
        .into_iter()
        .filter(|p| !p.to_str().unwrap().ends_with(".metadata.json") && !p.ends_with("version-hint.text"))
        .map(|p| format!("file://{}", p.display()))
        .collect();
    got.sort();
    assert_eq!(got, want, "the table holds exactly what its snapshot reaches");
}

/// The commit-log record the lake's head is at once it holds everything PostgreSQL has
/// committed so far, then once the projector has brought every table up to it.
async fn wait_for_projection(c: &tokio_postgres::Client, config: &std::path::Path, table: &str) {
    // The test cluster runs with `synchronous_commit = off`: the WAL write position may
    // still be short of the last commit. A transaction that commits synchronously
    // flushes everything before it.
    c.batch_execute("BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); COMMIT")
        .await
        .unwrap();
    let lsn: walshore::lsn::Lsn = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    let store = open_lake(config);
    let seq = std::cell::Cell::new(0);
    wait_until(Duration::from_secs(60), "the change log to hold the changes", || {
        let store = store.clone();
        let seq = &seq;
        async move {
            match walshore::checkpoint::read_head(store.as_ref()).await.unwrap() {
                Some(h) if h.end_lsn >= lsn => {
                    seq.set(h.seq);
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    let seq = seq.get();
    let progress = config.parent().unwrap().join("lake/_walshore/iceberg/progress.json");
    // The progress record names the tables that hold the log up to its seq (a table
    // whose pass failed is not named, and is tried again the next interval).
    wait_until(Duration::from_secs(90), "the projector to reach the head", || {
        let progress = progress.clone();
        async move {
            std::fs::read(&progress)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| {
                    v["seq"].as_u64().is_some_and(|s| s >= seq)
                        && v["tables"].as_array().is_some_and(|t| t.iter().any(|t| t == table))
                })
        }
    })
    .await;
}

/// `walshore run` with `[iceberg]` projects every interval while it replicates, and a
/// stop while it projects is clean.
#[tokio::test]
async fn run_projects_every_interval_while_it_replicates() {
    let port = free_port();
    let setup = format!("{PRICES}; CREATE PUBLICATION pub FOR TABLE prices");
    let metrics = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(&setup, "commit_interval = \"1s\"", &metrics).await;
    let child = spawn_run(&config);
    let _log = LogOnPanic::new(&child);
    c.batch_execute("INSERT INTO prices SELECT 'S' || i, i, i, NULL FROM generate_series(1, 500) i")
        .await
        .unwrap();
    wait_for_projection(&c, &config, "public.prices").await;
    assert_iceberg_equals_source(&c, &lake, "inserts while running").await;
    c.batch_execute("UPDATE prices SET qty = qty * 2 WHERE qty % 3 = 0; DELETE FROM prices WHERE qty % 5 = 0")
        .await
        .unwrap();
    wait_for_projection(&c, &config, "public.prices").await;
    assert_iceberg_equals_source(&c, &lake, "updates and deletes while running").await;
    // The projector's gauges: caught up, files live, snapshots kept, a recent pass.
    let m = scrape(port);
    let table = "table=\"public.prices\"";
    let get = |name: &str| {
        m.iter()
            .find(|(k, _)| k.starts_with(name) && (k.contains(table) || !k.contains('{')))
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{name} is not exported: {m:?}"))
    };
    assert_eq!(get("walshore_iceberg_behind_commits"), 0.0);
    assert!(get("walshore_iceberg_live_files") >= 1.0);
    assert!(get("walshore_iceberg_snapshots") >= 2.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now - get("walshore_iceberg_projected_timestamp_seconds") < 60.0);
    let (status, stderr) = stop(child);
    assert!(status.success(), "walshore run stopped cleanly:\n{stderr}");
}

/// Many intervals of updates stay compact: every bucket is rewritten once it has more
/// than 2 data files or a fifth of its rows deleted, a data file's delete files are
/// merged into one, manifests are merged, and the readers still see the source.
#[tokio::test]
async fn many_intervals_of_updates_stay_compact() {
    let setup = format!("{PRICES}; CREATE PUBLICATION pub FOR TABLE prices");
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(&setup, "buckets = 2", "").await;
    c.batch_execute("INSERT INTO prices SELECT 'S' || i, i, i, NULL FROM generate_series(1, 200) i")
        .await
        .unwrap();
    sync(&config);
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&lake).unwrap());
    let location = Location {
        store,
        root: "_iceberg/public/prices".into(),
        uri: format!("file://{}", lake.join("_iceberg/public/prices").display()),
    };
    let mut replaced = 0;
    for round in 0..14 {
        c.batch_execute(&format!(
            "UPDATE prices SET qty = qty + 1 WHERE qty % 4 = {m}; DELETE FROM prices WHERE sym = 'S{round}';",
            m = round % 4
        ))
        .await
        .unwrap();
        sync(&config);
        let table = Table::load(location.clone()).await.unwrap().unwrap();
        let live = table.live_files().await.unwrap();
        for bucket in [0, 1] {
            let of = |content: i32| {
                live.iter()
                    .filter(|e| e.file.partition == Some(bucket) && e.file.content == content)
                    .count()
            };
            // More than 2 data files, or a fifth of the rows deleted, is rewritten;
            // a data file's delete files are merged into one.
            assert!(of(0) <= 2, "round {round}, bucket {bucket}: {} data files", of(0));
            assert!(of(1) <= of(0), "round {round}, bucket {bucket}: {} delete files", of(1));
        }
        assert!(
            table.manifests().len() <= 12,
            "round {round}: {} manifests",
            table.manifests().len()
        );
        let s = table.metadata().current_snapshot().unwrap();
        replaced += usize::from(s.summary["operation"] == "replace");
    }
    assert!(replaced > 0, "a compaction took place");
    assert_iceberg_equals_source(&c, &lake, "fourteen intervals").await;
    // Data files carry a bloom filter on the key; a compacted one is sorted by it.
    let table = Table::load(location).await.unwrap().unwrap();
    let mut sorted = 0;
    for e in table.live_files().await.unwrap().iter().filter(|e| e.file.content == 0) {
        let path = e.file.path.strip_prefix("file://").unwrap();
        let reader =
            parquet::file::serialized_reader::SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
        use parquet::file::reader::FileReader;
        let column = reader.metadata().row_group(0).column(0);
        assert_eq!(column.column_path().string(), "sym");
        assert!(
            column.bloom_filter_offset().is_some(),
            "{path}: no bloom filter on the key"
        );
        let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
        let batches: Vec<RecordBatch> = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let keys: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                let a = b
                    .column_by_name("sym")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone();
                (0..arrow::array::Array::len(&a)).map(move |i| a.value(i).to_owned())
            })
            .collect();
        if keys.len() > 1 && keys.windows(2).all(|w| w[0] <= w[1]) {
            sorted += 1;
        }
    }
    assert!(sorted > 0, "a compacted data file is sorted by key");
}

/// Manifests carried from snapshot to snapshot are merged once there are more than 8:
/// twelve one-row appends leave at most nine, and the readers see every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_merged_as_appends_pile_up() {
    let lake_dir = tempfile::tempdir().unwrap();
    let (location, dir) = prices_location(lake_dir.path());
    let mut table = Table::create(location, &lake(), 16).await.unwrap();
    let mut state = BTreeMap::new();
    let mut most = 0;
    for id in 0..12 {
        state.insert(id, row(id, 0));
        table
            .commit(Commit {
                rows: vec![batch(&[row(id, 0)])],
                summary: watermark(id as u64 + 1, 1000),
                ..Commit::default()
            })
            .await
            .unwrap();
        most = most.max(table.manifests().len());
        assert!(
            table.manifests().len() <= 9,
            "after {id}: {} manifests",
            table.manifests().len()
        );
    }
    assert_eq!(most, 9, "the manifests reached the merge threshold");
    assert_eq!(table.live_files().await.unwrap().len(), 12);
    assert_both_read(&dir, &state, "merged manifests");
}

/// With `[catalog] kind = "glue"`, the Iceberg table is registered in Glue under the
/// analyst's name (`prices`), replacing the current-state view walshore kept there
/// before `[iceberg]`, and each sync moves it forward: pyiceberg's GlueCatalog loads
/// it by name from the S3 test server and reads the source's rows.
#[tokio::test]
async fn glue_names_the_iceberg_table_as_the_analyst_knows_it() {
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(&format!("{PRICES}; CREATE PUBLICATION pub FOR TABLE prices"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "cdc",
    };
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &s3,
        "",
        "",
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let catalog = format!(
        "\n[catalog]\nkind = \"glue\"\ndatabase = \"trading\"\nendpoint = \"{}\"\ncreate_views = true\n",
        moto.endpoint()
    );
    std::fs::write(&config, format!("{text}{catalog}")).unwrap();
    sync(&config);
    c.batch_execute("INSERT INTO prices SELECT 'S' || i, i, i, NULL FROM generate_series(1, 50) i")
        .await
        .unwrap();
    sync(&config);
    let glue_rows = || {
        let v = python_json(
            "read_iceberg.py",
            &["glue", &moto.endpoint(), "trading.prices", "sym", "px", "qty", "note"],
        );
        let rows: Vec<Vec<String>> = serde_json::from_value(v).unwrap();
        let mut rows: Vec<Vec<Option<String>>> = rows
            .into_iter()
            .map(|r| r.into_iter().map(|v| (v != "NULL").then_some(v)).collect())
            .collect();
        rows.sort();
        rows
    };
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[iceberg]\nbuckets = 4\n")).unwrap();
    c.batch_execute("UPDATE prices SET qty = 0 WHERE qty % 2 = 0")
        .await
        .unwrap();
    sync(&config);
    let select = "SELECT sym, px::text, qty::text, note FROM prices";
    assert_eq!(
        glue_rows(),
        source_rows(&c, select).await,
        "the Iceberg table in place of the view"
    );
    c.batch_execute("DELETE FROM prices WHERE qty = 0; INSERT INTO prices VALUES ('NEW', 1, 1, 'n')")
        .await
        .unwrap();
    sync(&config);
    assert_eq!(glue_rows(), source_rows(&c, select).await, "Glue moved forward");
}

/// A table whose Iceberg table cannot follow (its primary key changed) fails alone: the
/// other table is projected, `sync` exits 1 naming the table and the fix, and once the
/// fix is done the table is built anew with the new key.
#[tokio::test]
async fn a_failing_table_holds_back_no_other() {
    let setup = format!(
        "CREATE TABLE a (id int PRIMARY KEY, region text NOT NULL, v int); {PRICES}; CREATE PUBLICATION pub FOR TABLE a, prices"
    );
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(&setup, "buckets = 2", "").await;
    c.batch_execute(
        "INSERT INTO a SELECT i, 'r' || (i % 3), i FROM generate_series(1, 30) i;
         INSERT INTO prices SELECT 'S' || i, i, i, NULL FROM generate_series(1, 30) i;",
    )
    .await
    .unwrap();
    sync(&config);
    // a's key grows a column; prices changes too.
    c.batch_execute(
        "ALTER TABLE a DROP CONSTRAINT a_pkey, ADD PRIMARY KEY (id, region);
         UPDATE a SET v = v + 1;
         INSERT INTO a VALUES (1, 'other', 100);
         UPDATE prices SET qty = -qty WHERE qty % 2 = 0;",
    )
    .await
    .unwrap();
    let out = support::walshore(&["sync", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("public.a")
            && stderr.contains("primary key changed")
            && stderr.contains("delete the table's folder"),
        "{stderr}"
    );
    assert_iceberg_equals_source(&c, &lake, "the other table's sync").await;
    // The fix the message names: the table is built anew, keyed (id, region).
    std::fs::remove_dir_all(lake.join("_iceberg/public/a")).unwrap();
    sync(&config);
    let want = source_rows(&c, "SELECT id::text, region, v::text FROM a").await;
    for reader in ["duckdb", "pyiceberg"] {
        assert_eq!(
            iceberg_rows(reader, &lake, "a", &["id", "region", "v"]),
            want,
            "{reader}: a anew"
        );
    }
}

/// `walshore verify --format json` with its exit code.
fn verify_json(config: &std::path::Path) -> (i32, serde_json::Value) {
    let out = support::walshore(&["verify", "--config", config.to_str().unwrap(), "--format", "json"]);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}

/// `walshore verify` finds the change log equal to the source and the Iceberg table
/// equal to the change log at its watermark.
fn assert_verified(config: &std::path::Path, what: &str) {
    let (code, report) = verify_json(config);
    assert_eq!(code, 0, "verify after {what}: {report:#}");
    assert_eq!(
        report["tables"][0]["iceberg"]["result"], "equal",
        "after {what}: {report:#}"
    );
}

/// `walshore verify` also compares each Iceberg table with the change log at the
/// Iceberg table's watermark: equal when it is current, equal when it lags the change
/// log (the records after its watermark are left out), and a row the Iceberg table lost
/// behind the projector's back is found, named by its key, and fails the run.
#[tokio::test]
async fn verify_compares_the_iceberg_table_at_its_watermark() {
    let setup = format!("{PRICES}; CREATE PUBLICATION pub FOR TABLE prices");
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(&setup, "buckets = 2", "").await;
    c.batch_execute(
        "INSERT INTO prices SELECT 'S' || i, i, i, 'n' || i FROM generate_series(1, 50) i;
         UPDATE prices SET qty = -qty WHERE qty % 3 = 0;
         DELETE FROM prices WHERE qty % 5 = 0;",
    )
    .await
    .unwrap();
    sync(&config);
    let (code, report) = verify_json(&config);
    let t = &report["tables"][0];
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(t["iceberg"]["result"], "equal", "{report:#}");
    let rows = source_rows(&c, "SELECT count(*)::text FROM prices").await[0][0]
        .clone()
        .unwrap();
    assert_eq!(t["iceberg"]["rows"].to_string(), rows, "{report:#}");
    assert_eq!(t["iceberg"]["log_rows"].to_string(), rows, "{report:#}");

    // The change log moves on without the projector (a config without [iceberg]): the
    // Iceberg table is compared at its own, older watermark.
    let text = std::fs::read_to_string(&config).unwrap();
    let plain = config.with_file_name("plain.toml");
    std::fs::write(&plain, &text[..text.find("[iceberg]").unwrap()]).unwrap();
    let watermark = t["iceberg"]["seq"].as_u64().unwrap();
    c.batch_execute("UPDATE prices SET px = px * 2; DELETE FROM prices WHERE sym = 'S1'")
        .await
        .unwrap();
    sync(&plain);
    let (code, report) = verify_json(&config);
    let t = &report["tables"][0];
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(t["result"], "equal", "the change log equals the source: {report:#}");
    assert_eq!(t["iceberg"]["result"], "equal", "{report:#}");
    assert_eq!(t["iceberg"]["seq"].as_u64().unwrap(), watermark, "{report:#}");
    assert_eq!(
        t["iceberg"]["rows"].to_string(),
        rows,
        "as of its watermark: {report:#}"
    );
    sync(&config);

    // A row deleted from the Iceberg table behind the projector's back, in a snapshot
    // that claims the same watermark.
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&lake).unwrap());
    let location = Location {
        store,
        root: "_iceberg/public/prices".into(),
        uri: format!("file://{}", lake.join("_iceberg/public/prices").display()),
    };
    let mut table = Table::load(location).await.unwrap().unwrap();
    let summary = table.metadata().current_snapshot().unwrap().summary.clone();
    let live = table.live_files().await.unwrap();
    let data = live
        .iter()
        .find(|e| e.file.content == 0 && e.file.record_count > 0)
        .unwrap();
    table
        .commit(Commit {
            deletes: BTreeMap::from([(data.file.path.clone(), vec![0])]),
            summary: [WATERMARK_SEQ, WATERMARK_LSN]
                .into_iter()
                .map(|k| (k.to_owned(), summary[k].clone()))
                .collect(),
            ..Commit::default()
        })
        .await
        .unwrap();
    let (code, report) = verify_json(&config);
    let t = &report["tables"][0];
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(t["result"], "differs", "{report:#}");
    assert_eq!(t["iceberg"]["result"], "differs", "{report:#}");
    assert_eq!(t["iceberg"]["missing"], 1, "{report:#}");
    assert_eq!(t["iceberg"]["extra"], 0, "{report:#}");
    let sample = &t["iceberg"]["samples"][0];
    assert_eq!(sample["kind"], "missing", "{report:#}");
    assert!(sample["key"].as_str().unwrap().starts_with("sym=S"), "{report:#}");
    // The text report names it too.
    let out = support::walshore(&["verify", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Iceberg table  DIFFERS"), "{text}");
    assert!(text.contains("iceberg missing"), "{text}");
}

/// Tables identified by the whole row (`REPLICA IDENTITY FULL`, and an insert-only table
/// with no identity) are projected as multisets: equal rows stay several, a delete
/// (and an update, a delete and an insert in the change log) removes one of them,
/// within one interval and across syncs, through an added column and a truncate; both
/// readers and `walshore verify` agree with the source.
#[tokio::test]
async fn tables_without_a_key_are_kept_as_multisets() {
    multisets("").await;
}

/// The same with room for no bucket of the key index: every delete is looked up in
/// its bucket's files.
#[tokio::test]
async fn tables_without_a_key_are_kept_as_multisets_with_a_key_index_smaller_than_a_bucket() {
    multisets("\nindex_memory = \"1KiB\"").await;
}

async fn multisets(index_memory: &str) {
    let setup = "CREATE TABLE ledger (account text, amount numeric(12,2), memo text);
         ALTER TABLE ledger REPLICA IDENTITY FULL;
         CREATE TABLE events (kind text, n int);
         CREATE TABLE pairs (a int, b int, PRIMARY KEY (a, b));
         CREATE PUBLICATION pub FOR TABLE ledger, events, pairs WITH (publish = 'insert, update, delete, truncate');
         CREATE PUBLICATION ins FOR TABLE events WITH (publish = 'insert')";
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(setup, &format!("buckets = 4{index_memory}"), "").await;
    let one = |table: &str, filter: &str| format!("ctid = (SELECT ctid FROM {table} WHERE {filter} LIMIT 1)");
    c.batch_execute(
        "INSERT INTO ledger VALUES ('a', 1, 'x'), ('a', 1, 'x'), ('a', 1, 'x'), ('b', 2, NULL);
         INSERT INTO ledger SELECT 'c' || i, i, 'm' || (i % 7) FROM generate_series(1, 120) i;
         INSERT INTO ledger SELECT 'd', 5, 'same' FROM generate_series(1, 10);
         INSERT INTO ledger VALUES ('q', 7, 'q'), ('q', 7, 'q');
         INSERT INTO pairs SELECT i, i % 4 FROM generate_series(1, 20) i;
         INSERT INTO events SELECT 'k' || (i % 5), i % 3 FROM generate_series(1, 60) i;",
    )
    .await
    .unwrap();
    sync(&config);
    let ledger = ["account", "amount", "memo"];
    assert_rows_equal(&c, &lake, "ledger", "inserts with equal rows", &ledger).await;
    assert_rows_equal(&c, &lake, "events", "inserts with equal rows", &["kind", "n"]).await;

    // One of equal rows deleted, one updated; many updated; an equal row added; a row
    // added and deleted in the same interval; a row deleted and an equal one added back.
    c.batch_execute(&format!(
        "DELETE FROM ledger WHERE {};
         UPDATE ledger SET memo = 'y' WHERE {};
         UPDATE ledger SET amount = amount + 1 WHERE account LIKE 'c1%';
         INSERT INTO ledger VALUES ('a', 1, 'x'), ('z', 9, 'z');
         DELETE FROM ledger WHERE account = 'z';
         DELETE FROM ledger WHERE {};
         INSERT INTO ledger VALUES ('d', 5, 'same');
         DELETE FROM ledger WHERE account = 'c50';
         INSERT INTO ledger VALUES ('q', 7, 'q'), ('q', 7, 'q');
         INSERT INTO events VALUES ('k1', 1), ('k1', 1);
         UPDATE pairs SET a = a WHERE a < 5;
         UPDATE pairs SET b = b + 10 WHERE a > 15;
         DELETE FROM pairs WHERE a = 10;",
        one("ledger", "account = 'a'"),
        one("ledger", "account = 'a' AND memo = 'x'"),
        one("ledger", "account = 'd'"),
    ))
    .await
    .unwrap();
    sync(&config);
    assert_rows_equal(&c, &lake, "ledger", "one of equal rows deleted and updated", &ledger).await;

    // Across syncs: equal rows deleted one by one from the table's files (three of
    // four `q` rows, in two data files); a column added (rows written before read it
    // as null, and their images match).
    let q = one("ledger", "account = 'q'");
    c.batch_execute(&format!(
        "DELETE FROM ledger WHERE {q}; DELETE FROM ledger WHERE {q}; DELETE FROM ledger WHERE {q};
         DELETE FROM ledger WHERE {};
         DELETE FROM ledger WHERE {};
         ALTER TABLE ledger ADD COLUMN tag text;
         UPDATE ledger SET tag = 't' WHERE account = 'b';
         DELETE FROM ledger WHERE {};
         UPDATE ledger SET memo = 'w' WHERE account = 'c2';",
        one("ledger", "account = 'd'"),
        one("ledger", "account = 'd'"),
        one("ledger", "account = 'a'"),
    ))
    .await
    .unwrap();
    sync(&config);
    let evolved = ["account", "amount", "memo", "tag"];
    assert_rows_equal(&c, &lake, "ledger", "deletes across syncs and a column added", &evolved).await;
    let (code, report) = verify_json(&config);
    assert_eq!(code, 0, "{report:#}");
    for t in report["tables"].as_array().unwrap() {
        assert_eq!(t["iceberg"]["result"], "equal", "{report:#}");
    }

    // A truncate, then rows.
    c.batch_execute("TRUNCATE ledger; INSERT INTO ledger VALUES ('e', 1, 'x', NULL), ('e', 1, 'x', NULL)")
        .await
        .unwrap();
    sync(&config);
    assert_rows_equal(&c, &lake, "ledger", "a truncate", &evolved).await;
    assert_rows_equal(&c, &lake, "events", "the end", &["kind", "n"]).await;
    // Keyed by all its columns: an update that keeps the key is the row as it was.
    assert_rows_equal(&c, &lake, "pairs", "the end", &["a", "b"]).await;
}

/// In one `walshore run`, a table without a key is compacted (a quiet interval tidies
/// each bucket into one file) and then loses equal rows one at a time: the rewritten
/// buckets' old places leave the key index, so each delete removes exactly one row.
#[tokio::test]
async fn a_multiset_compacted_while_running_loses_equal_rows_one_at_a_time() {
    let setup = "CREATE TABLE ledger (account text, amount numeric(12,2), memo text);
         ALTER TABLE ledger REPLICA IDENTITY FULL;
         CREATE PUBLICATION pub FOR TABLE ledger";
    let IcebergLake {
        _cluster,
        _dir,
        c,
        config,
        lake,
    } = iceberg_lake(setup, "commit_interval = \"1s\"\nbuckets = 2", "").await;
    let child = spawn_run(&config);
    let _log = LogOnPanic::new(&child);
    let ledger = ["account", "amount", "memo"];
    for round in 0..2 {
        c.batch_execute(&format!(
            "INSERT INTO ledger VALUES ('a', 1, 'x'), ('a', 1, 'x');
             INSERT INTO ledger SELECT 'r{round}-' || i, i, 'm' FROM generate_series(1, 40) i;"
        ))
        .await
        .unwrap();
        wait_for_projection(&c, &config, "public.ledger").await;
    }
    // Two appends: two data files a bucket, until a quiet interval rewrites them.
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&lake).unwrap());
    let location = Location {
        store,
        root: "_iceberg/public/ledger".into(),
        uri: format!("file://{}", lake.join("_iceberg/public/ledger").display()),
    };
    wait_until(Duration::from_secs(60), "a quiet interval to compact the table", || {
        let location = location.clone();
        async move {
            let table = Table::load(location).await.unwrap().unwrap();
            table.metadata().current_snapshot().unwrap().summary["operation"] == "replace"
                && table
                    .live_files()
                    .await
                    .unwrap()
                    .iter()
                    .filter(|e| e.file.content == 0)
                    .count()
                    <= 2
        }
    })
    .await;
    let one = "DELETE FROM ledger WHERE ctid = (SELECT ctid FROM ledger WHERE account = 'a' LIMIT 1)";
    for left in [3, 1] {
        let deletes = if left == 3 { 1 } else { 2 };
        for _ in 0..deletes {
            c.batch_execute(one).await.unwrap();
        }
        wait_for_projection(&c, &config, "public.ledger").await;
        assert_rows_equal(&c, &lake, "ledger", &format!("{left} equal rows left"), &ledger).await;
    }
    let (status, stderr) = stop(child);
    assert!(status.success(), "walshore run stopped cleanly:\n{stderr}");
}
