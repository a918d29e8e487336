//! The Glue catalog, against moto's Glue and S3: tables and partitions registered before
//! their commit, the documented column types, schema changes, a crash between
//! registration and commit, and what a reader of exactly the registered partitions
//! (DuckDB over S3) sees.

mod support;

use std::collections::BTreeMap;

use serde_json::Value;
use support::trades::{SELECT, env, env_on, insert_sql};
use support::*;

const DATABASE: &str = "trading_cdc";
/// The source side of what `glue_check.py` reads, as DuckDB renders it.
const TRADES: &str =
    "SELECT id::text, symbol, qty::text, price::text, '[' || array_to_string(tags, ', ') || ']' FROM trades";
const PRICES: &str = "SELECT symbol, ts::text, px::text, note FROM prices";

struct Lake {
    moto: Moto,
    e: support::trades::Env,
    config: std::path::PathBuf,
    /// The server's clock, when the test moves it.
    clock: Option<Clock>,
}

/// trades (partitioned by commit date) and prices (by `symbol`, values with `/`, `=`
/// and `%`) in a publication, an S3 lake on moto, and `[catalog] kind = "glue"`.
async fn lake(extra_catalog: &str) -> Lake {
    lake_with(extra_catalog, false).await
}

/// [`lake`], with a server clock the test can move when `moving_clock`.
async fn lake_with(extra_catalog: &str, moving_clock: bool) -> Lake {
    lake_on(extra_catalog, moving_clock, &[]).await
}

/// [`lake_with`] on a server with `settings`.
async fn lake_on(extra_catalog: &str, moving_clock: bool, settings: &[&str]) -> Lake {
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let (e, clock) = if moving_clock {
        let (cluster, clock) = cluster_with_clock(settings);
        (env_on(cluster).await, Some(clock))
    } else {
        (env(settings).await, None)
    };
    e.client
        .batch_execute(
            "CREATE TABLE prices (symbol text, ts bigint, px numeric(10,4), note text, PRIMARY KEY (symbol, ts));
             INSERT INTO prices SELECT (ARRAY['EUR/USD', 'A=B', '100%', 'plain'])[1 + i % 4], i, i * 0.5, NULL FROM generate_series(1, 400) i;
             ALTER PUBLICATION pub ADD TABLE prices",
        )
        .await
        .unwrap();
    e.client.batch_execute(&insert_sql(1, 500)).await.unwrap();
    let s3 = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "cdc",
    };
    let config = e.config(&e.cluster.url("postgres", "t"), &s3, "", "");
    use_initial_snapshot(&config, "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[partitions]\n\"public.prices\" = \"column:symbol\"\n\n[catalog]\nkind = \"glue\"\ndatabase = \"{DATABASE}\"\nendpoint = \"{}\"\n{extra_catalog}\n",
        moto.endpoint()
    ));
    std::fs::write(&config, text).unwrap();
    Lake { moto, e, config, clock }
}

/// What `tests/py/glue_check.py` reports: Glue's tables and partitions, the current
/// state replayed from the registered partitions' files by DuckDB, and (with
/// `athena-sql` output) the generated views run in DuckDB over those files.
fn glue_view(l: &Lake) -> Value {
    glue_view_with(l, None)
}

fn glue_view_with(l: &Lake, views: Option<&std::path::Path>) -> Value {
    glue_view_args(l, views, false)
}

fn glue_view_args(l: &Lake, views: Option<&std::path::Path>, glue_views: bool) -> Value {
    let mut args: Vec<std::ffi::OsString> = vec![
        l.moto.endpoint().into(),
        DATABASE.into(),
        "trades_changes:id:id,symbol,qty,price,tags".into(),
        "prices_changes:symbol,ts:symbol,ts,px,note".into(),
    ];
    if let Some(v) = views {
        args.extend(["--views".into(), v.as_os_str().to_owned()]);
    }
    if glue_views {
        args.push("--glue-views".into());
    }
    python_json("glue_check.py", &args)
}

/// `text`, a config of [`lake`], with Glue at `endpoint` instead of moto.
fn with_glue_endpoint(l: &Lake, text: &str, endpoint: &str) -> String {
    let moto = format!("database = \"{DATABASE}\"\nendpoint = \"{}\"", l.moto.endpoint());
    assert!(text.contains(&moto), "{text}");
    text.replace(&moto, &format!("database = \"{DATABASE}\"\nendpoint = \"{endpoint}\""))
}

fn state(v: &Value, table: &str) -> Vec<Vec<Option<String>>> {
    rows_of(v, "state", table)
}

fn rows_of(v: &Value, what: &str, table: &str) -> Vec<Vec<Option<String>>> {
    let mut rows: Vec<Vec<Option<String>>> = v[what][table]
        .as_array()
        .unwrap_or_else(|| panic!("no state for {table}: {v}"))
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .collect();
    rows.sort();
    rows
}

fn columns(v: &Value, table: &str) -> BTreeMap<String, String> {
    v["tables"][table]["columns"]
        .as_array()
        .unwrap_or_else(|| panic!("table {table} is not in Glue: {v}"))
        .iter()
        .map(|c| (c[0].as_str().unwrap().to_owned(), c[1].as_str().unwrap().to_owned()))
        .collect()
}

/// The partition paths of the lake's files of `schema.table`.
async fn lake_partitions(config: &std::path::Path, table: &str) -> std::collections::BTreeSet<String> {
    let store = open_lake(config);
    let prefix = table.replace('.', "/");
    let mut out = std::collections::BTreeSet::new();
    for m in futures::TryStreamExt::try_collect::<Vec<_>>(store.list(Some(&prefix.as_str().into())))
        .await
        .unwrap()
    {
        let key = m
            .location
            .as_ref()
            .strip_prefix(&format!("{prefix}/"))
            .unwrap()
            .to_owned();
        let dir = key.rsplit_once('/').unwrap().0;
        // A compacted file is in its partition's `_c{tag}` folder.
        let partition = match dir.rsplit_once("/_c") {
            Some((p, _)) => p,
            None => dir,
        };
        out.insert(partition.to_owned());
    }
    out
}

/// The current-state views that `glue_check.py` ran give the source's rows.
async fn assert_views_return_the_source(l: &Lake, v: &Value) {
    for (view, select) in [("trades", TRADES), ("prices", PRICES)] {
        assert_eq!(
            rows_of(v, "views", view),
            source_rows(&l.e.client, select).await,
            "the {view} view"
        );
    }
}

async fn assert_readers_see_the_source(l: &Lake) -> Value {
    let v = glue_view(l);
    assert_eq!(
        state(&v, "trades_changes"),
        source_rows(&l.e.client, TRADES).await,
        "trades: DuckDB over the registered partitions vs the source"
    );
    assert_eq!(
        state(&v, "prices_changes"),
        source_rows(&l.e.client, PRICES).await,
        "prices: DuckDB over the registered partitions vs the source"
    );
    // pyarrow read every registered file: as many rows as the lake's commit records hold.
    let status = walshore(&["status", "--config", l.config.to_str().unwrap()]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    for (table, glue) in [("public.trades", "trades_changes"), ("public.prices", "prices_changes")] {
        assert_eq!(
            v["pyarrow_rows"][glue], status["tables"][table]["rows"],
            "{glue}: rows pyarrow read from the registered partitions vs rows committed"
        );
    }
    // Every partition holding a committed file is registered, at its own location.
    for (table, glue) in [("public.trades", "trades_changes"), ("public.prices", "prices_changes")] {
        let registered: std::collections::BTreeSet<String> = v["tables"][glue]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let loc = p["location"].as_str().unwrap();
                let base = format!("s3://lake/cdc/{}/", table.replace('.', "/"));
                let rel = loc.strip_prefix(&base).unwrap().trim_end_matches('/');
                // A compacted partition's location is its `_c{tag}` folder.
                match rel.rsplit_once("/_c") {
                    Some((partition, _)) => partition.to_owned(),
                    None => rel.to_owned(),
                }
            })
            .collect();
        let in_lake = lake_partitions(&l.config, table).await;
        assert!(!in_lake.is_empty());
        assert!(
            in_lake.is_subset(&registered),
            "{table}: partitions in the lake {in_lake:?}, registered {registered:?}"
        );
    }
    v
}

/// With `[compaction]`: the server's day closes once its clock has moved on, that
/// day's partition of `trades` is compacted, and Glue's partition points at the
/// compacted folder; DuckDB and pyarrow over exactly the registered partitions see
/// every row once, with the replaced files there and once they are deleted. `prices`,
/// partitioned by a column, is not compacted with Glue.
#[tokio::test]
async fn a_closed_day_is_compacted_and_its_glue_partition_points_at_the_compacted_files() {
    let l = lake_with("", true).await;
    edit_config(
        &l.config,
        "mode = \"initial\"",
        "mode = \"initial\"\npoll_interval = \"300ms\"",
    );
    let text = std::fs::read_to_string(&l.config).unwrap();
    std::fs::write(
        &l.config,
        format!("{text}\n[compaction]\ngrace = \"1s\"\ndelete_after = \"2s\"\n"),
    )
    .unwrap();
    let clock = l.clock.as_ref().unwrap();
    let run = spawn_run(&l.config);
    let _log = LogOnPanic::new(&run);
    let day = server_date(&l).await;
    for i in 0..4 {
        l.e.client
            .batch_execute(&insert_sql(1000 + i * 10, 1009 + i * 10))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    clock.shift_days(1);
    l.e.client.batch_execute(&insert_sql(2000, 2010)).await.unwrap();

    let cfg = walshore::config::Config::load(&l.config).unwrap();
    let catalog = walshore::catalog::Catalog::open(cfg.glue.as_ref().unwrap(), &cfg.sink, &cfg.partitions).await;
    let partition = format!("dt={day}");
    wait_until(
        std::time::Duration::from_secs(120),
        "the closed day's Glue partition points at its compacted folder",
        || async {
            catalog
                .partition_location("public.trades", &partition)
                .await
                .unwrap()
                .is_some_and(|l| {
                    l.trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .is_some_and(|f| f.starts_with("_c"))
                })
        },
    )
    .await;
    assert_readers_see_the_source(&l).await;
    let store = open_lake(&l.config);
    wait_until(
        std::time::Duration::from_secs(60),
        "the replaced files deleted",
        || async {
            walshore::compaction::tickets(store.as_ref(), &mut Default::default())
                .await
                .unwrap()
                .is_empty()
        },
    )
    .await;
    assert_readers_see_the_source(&l).await;
    let committed = walshore::checkpoint::committed_files(store.as_ref()).await.unwrap();
    assert!(
        committed
            .iter()
            .filter(|f| f.table == "public.trades" && f.partition == partition)
            .all(|f| walshore::compaction::is_compacted(&f.key)),
        "the closed day holds compacted files only"
    );
    assert!(
        !committed
            .iter()
            .any(|f| f.table == "public.prices" && walshore::compaction::is_compacted(&f.key)),
        "column partitions are not compacted with Glue"
    );
    let (status, stderr) = stop(run);
    assert!(status.success(), "walshore run failed:\n{stderr}");

    // The partition deleted from Glue by hand: the next start registers it at its
    // compacted folder, not at the partition's own (which holds no file now).
    let folder = catalog
        .partition_location("public.trades", &partition)
        .await
        .unwrap()
        .unwrap();
    run_ok(
        std::process::Command::new("python3").args([
            "-c",
            &format!(
                "import boto3; boto3.client('glue', endpoint_url='{}', region_name='us-east-1').delete_partition(DatabaseName='{DATABASE}', TableName='trades_changes', PartitionValues=['{day}'])",
                l.moto.endpoint()
            ),
        ]),
        "delete the Glue partition",
    );
    assert_eq!(
        catalog.partition_location("public.trades", &partition).await.unwrap(),
        None
    );
    let run = spawn_run(&l.config);
    let _log = LogOnPanic::new(&run);
    wait_until(
        std::time::Duration::from_secs(60),
        "the partition registered again at its compacted folder",
        || async {
            catalog
                .partition_location("public.trades", &partition)
                .await
                .unwrap()
                .as_ref()
                == Some(&folder)
        },
    )
    .await;
    assert_readers_see_the_source(&l).await;
    let (status, stderr) = stop(run);
    assert!(status.success(), "walshore run failed:\n{stderr}");
}

/// PostgreSQL's own UTC date, on its (possibly moved) clock.
async fn server_date(l: &Lake) -> String {
    l.e.client
        .query_one("SELECT (now() AT TIME ZONE 'UTC')::date::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// Commits on three days (the server's clock moved a day at a time): both tables
/// registered with the documented types, one `dt` partition per commit date holding
/// exactly that date's commits, and every registered file read back exactly.
#[tokio::test]
async fn tables_and_partitions_are_registered_with_the_documented_types_and_read_back_exactly() {
    let l = lake_with("", true).await;
    let clock = l.clock.as_ref().unwrap();
    let mut days = std::collections::BTreeSet::new();
    let out = walshore(&["check", "--config", l.config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("catalog") && l.contains("created at the first commit")),
        "{stdout}"
    );
    days.insert(server_date(&l).await);
    sync(&l.config);
    days.insert(server_date(&l).await);
    clock.shift_days(1);
    days.insert(server_date(&l).await);
    l.e.client
        .batch_execute(
            "UPDATE trades SET qty = qty + 1 WHERE id % 3 = 0; DELETE FROM trades WHERE id % 7 = 0;
             INSERT INTO prices VALUES ('new/sym', 1, 1.25, 'x'), ('a''quote', 2, 2.5, NULL);
             UPDATE prices SET note = 'n' || ts WHERE ts % 5 = 0; DELETE FROM prices WHERE ts % 11 = 0",
        )
        .await
        .unwrap();
    days.insert(server_date(&l).await);
    sync(&l.config);
    clock.shift_days(2);
    days.insert(server_date(&l).await);
    l.e.client
        .batch_execute(&format!(
            "{}; UPDATE trades SET price = price + 1 WHERE id % 5 = 0; DELETE FROM prices WHERE ts % 13 = 0",
            insert_sql(600, 650)
        ))
        .await
        .unwrap();
    sync(&l.config);
    // The date after the last commits too: a run across a real midnight then still
    // knows every date the server committed on.
    days.insert(server_date(&l).await);
    assert!(days.len() >= 3, "the server's clock moved: {days:?}");
    let v = assert_readers_see_the_source(&l).await;
    // One registered `dt` partition per commit date, each holding that date's commits only.
    let registered: std::collections::BTreeSet<String> = v["tables"]["trades_changes"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["values"][0].as_str().unwrap().to_owned())
        .collect();
    assert!(
        registered.len() >= 3 && registered.is_subset(&days),
        "trades_changes partitions {registered:?} vs the server's commit dates {days:?}"
    );
    for (location, dates) in v["commit_dates"]["trades_changes"].as_object().unwrap() {
        let dt = location
            .trim_end_matches('/')
            .rsplit_once("/dt=")
            .unwrap_or_else(|| panic!("{location}"))
            .1;
        assert_eq!(
            dates,
            &serde_json::json!([dt]),
            "commit dates of the rows in {location}"
        );
    }

    let trades = columns(&v, "trades_changes");
    for (c, t) in [
        ("_op", "string"),
        ("_lsn", "bigint"),
        ("_seq", "bigint"),
        ("_xid", "bigint"),
        ("_commit_ts", "timestamp"),
        ("_unchanged", "array<string>"),
        ("id", "bigint"),
        ("symbol", "string"),
        ("qty", "int"),
        ("price", "decimal(12,2)"),
        ("active", "boolean"),
        ("ts", "timestamp"),
        ("tags", "array<string>"),
        ("payload", "binary"),
    ] {
        assert_eq!(
            trades.get(c).map(String::as_str),
            Some(t),
            "trades_changes.{c}: {trades:?}"
        );
    }
    let t = &v["tables"]["trades_changes"];
    assert_eq!(t["partition_keys"], serde_json::json!([["dt", "string"]]));
    assert_eq!(t["location"], "s3://lake/cdc/public/trades/");
    assert_eq!(
        t["serde"],
        "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
    );
    assert_eq!(t["parameters"]["walshore_source_table"], "public.trades");
    assert_eq!(t["parameters"]["walshore_version"], env!("CARGO_PKG_VERSION"));
    let p = &v["tables"]["prices_changes"];
    assert_eq!(p["partition_keys"], serde_json::json!([["symbol", "string"]]));
    let values: std::collections::BTreeSet<String> = p["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["values"][0].as_str().unwrap().to_owned())
        .collect();
    for s in ["EUR/USD", "A=B", "100%", "plain", "new/sym", "a'quote"] {
        assert!(
            values.contains(s),
            "partition value {s:?} registered unescaped: {values:?}"
        );
    }
    assert_eq!(columns(&v, "prices_changes")["px"], "decimal(10,4)");
}

#[tokio::test]
async fn a_column_added_while_streaming_reaches_glue_and_old_partitions_still_read() {
    let l = lake("").await;
    sync(&l.config);
    let run = spawn_run(&l.config);
    l.e.client
        .batch_execute(&format!(
            "ALTER TABLE trades ADD COLUMN venue text; {}; UPDATE trades SET venue = 'XNYS' WHERE id > 490",
            insert_sql(1000, 1100)
        ))
        .await
        .unwrap();
    // Widening too: int -> bigint.
    l.e.client
        .batch_execute(
            "ALTER TABLE trades ALTER COLUMN qty TYPE bigint; UPDATE trades SET qty = 5000000000 WHERE id = 1",
        )
        .await
        .unwrap();
    wait_until(std::time::Duration::from_secs(60), "the new column in Glue", || async {
        let v = glue_view(&l);
        columns(&v, "trades_changes").get("venue").map(String::as_str) == Some("string")
            && columns(&v, "trades_changes").get("qty").map(String::as_str) == Some("bigint")
    })
    .await;
    let (status, stderr) = stop(run);
    assert!(status.success(), "{stderr}");
    let v = assert_readers_see_the_source(&l).await;
    // Nothing dropped: the metadata columns and every old column are still there.
    let cols = columns(&v, "trades_changes");
    assert!(cols.contains_key("_op") && cols.contains_key("payload"), "{cols:?}");
    // The whole table replays with the new column too.
    l.e.assert_lake_equals_source(
        &l.config,
        &SELECT.replace("payload::text FROM", "payload::text, venue FROM"),
    )
    .await;
}

#[tokio::test]
async fn a_crash_between_registration_and_commit_leaves_no_missing_and_no_duplicate_partition() {
    let l = lake("").await;
    let out = std::process::Command::new(BIN)
        .args(["sync", "--config", l.config.to_str().unwrap()])
        .env("WALSHORE_FAULT", "after_catalog_registration")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("fault injected at after_catalog_registration"),
        "{stderr}"
    );
    l.e.client
        .batch_execute("INSERT INTO prices VALUES ('after/crash', 1, 9, NULL)")
        .await
        .unwrap();
    sync(&l.config);
    let v = assert_readers_see_the_source(&l).await;
    for glue in ["trades_changes", "prices_changes"] {
        let parts: Vec<String> = v["tables"][glue]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["location"].as_str().unwrap().to_owned())
            .collect();
        let unique: std::collections::BTreeSet<_> = parts.iter().collect();
        assert_eq!(parts.len(), unique.len(), "{glue}: duplicate partitions {parts:?}");
    }
}

#[tokio::test]
async fn glue_unreachable_is_retried_and_nothing_is_lost() {
    // A Glue endpoint nobody listens on: the failure is transient, retried, and
    // `sync` gives up after its attempts without committing anything.
    let l = lake("").await;
    let text = std::fs::read_to_string(&l.config).unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    std::fs::write(&l.config, with_glue_endpoint(&l, &text, &dead)).unwrap();
    let out = walshore(&["check", "--config", l.config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("catalog") && l.contains("GetDatabase")),
        "{stdout}"
    );
    let out = walshore(&["sync", "--config", l.config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Glue"), "{stderr}");
    assert!(stderr.contains("transient failure"), "retried:\n{stderr}");
    // With Glue back, everything arrives.
    std::fs::write(&l.config, text).unwrap();
    sync(&l.config);
    assert_readers_see_the_source(&l).await;
}

/// `walshore athena-sql` prints a current-state view per table; DuckDB runs each over
/// exactly the registered partitions' files and gets the source's rows, after updates
/// that leave a TOAST value out (`_unchanged`), deletes and a truncate.
#[tokio::test]
async fn the_athena_current_state_views_return_the_source_rows() {
    let l = lake("").await;
    l.e.client
        .batch_execute(
            "ALTER TABLE trades ALTER COLUMN tags SET STORAGE EXTERNAL;
             UPDATE trades SET tags = ARRAY(SELECT 'tag' || g FROM generate_series(1, 2000) g) WHERE id % 50 = 0",
        )
        .await
        .unwrap();
    sync(&l.config);
    l.e.client
        .batch_execute(
            "UPDATE trades SET qty = qty + 1 WHERE id % 10 = 0; DELETE FROM trades WHERE id % 7 = 0;
             INSERT INTO prices VALUES ('x/y', 1, 1.5, 'n');
             TRUNCATE prices; INSERT INTO prices VALUES ('after', 1, 2.5, NULL), ('EUR/USD', 9, 3, 'z');
             UPDATE prices SET note = 'upd' WHERE symbol = 'after'",
        )
        .await
        .unwrap();
    sync(&l.config);
    let sql = walshore(&["athena-sql", "--config", l.config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&sql.stdout).into_owned();
    assert!(sql.status.success(), "{}", String::from_utf8_lossy(&sql.stderr));
    for view in ["trades", "prices"] {
        assert!(
            text.contains(&format!("CREATE OR REPLACE VIEW \"{DATABASE}\".\"{view}\"")),
            "{text}"
        );
    }
    // Some updates really left the big value out.
    let lake = read_table(&open_lake(&l.config), "public", "trades").await;
    assert!(
        lake.rows.iter().any(|r| r.unchanged.contains(&"tags".to_string())),
        "no update left tags out: the carry-forward is not exercised"
    );
    let file = l.e.dir.path().join("views.sql");
    std::fs::write(&file, &text).unwrap();
    let v = glue_view_with(&l, Some(&file));
    assert_views_return_the_source(&l, &v).await;
}

/// With `create_views = true` walshore keeps each table's current-state view in Glue,
/// in Athena's view format, in step with schema changes; run from Glue's definition
/// over the registered partitions, it gives the source rows.
#[tokio::test]
async fn glue_views_in_athena_format_follow_schema_changes_and_return_the_source_rows() {
    let l = lake("create_views = true").await;
    sync(&l.config);
    l.e.client
        .batch_execute(
            "ALTER TABLE prices ADD COLUMN venue text; UPDATE prices SET venue = 'X', px = px + 1 WHERE ts % 3 = 0;
             DELETE FROM trades WHERE id % 4 = 0",
        )
        .await
        .unwrap();
    sync(&l.config);
    let v = glue_view_args(&l, None, true);
    for view in ["trades", "prices"] {
        let g = &v["glue_views"][view];
        assert_eq!(g["parameters"]["presto_view"], "true", "{view}: {g}");
        assert_eq!(g["definition"]["catalog"], "awsdatacatalog");
        assert_eq!(g["definition"]["schema"], DATABASE);
    }
    let prices = &v["glue_views"]["prices"]["definition"]["columns"];
    assert!(
        prices
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "venue" && c["type"] == "varchar"),
        "the view follows the added column: {prices}"
    );
    assert!(
        prices
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "px" && c["type"] == "decimal(10,4)"),
        "{prices}"
    );
    assert_views_return_the_source(&l, &v).await;
}

/// With `partition_projection = true` no partition is registered; the table tells
/// Athena how to compute them, and its location template, filled with each partition's
/// values, names exactly the lake's partition folders.
#[tokio::test]
async fn partition_projection_registers_no_partition_and_its_template_finds_the_lake() {
    let l = lake("partition_projection = true").await;
    sync(&l.config);
    let v = glue_view(&l);
    let t = &v["tables"]["trades_changes"];
    assert_eq!(t["partitions"], serde_json::json!([]), "{t}");
    let p = &t["parameters"];
    assert_eq!(p["projection.enabled"], "true", "{p}");
    assert_eq!(p["projection.dt.type"], "date");
    assert_eq!(p["projection.dt.format"], "yyyy-MM-dd");
    assert_eq!(p["projection.dt.range"], "2026-01-01,NOW");
    let template = p["storage.location.template"].as_str().unwrap();
    for dir in lake_partitions(&l.config, "public.trades").await {
        let dt = dir.strip_prefix("dt=").unwrap();
        assert!(dt >= "2026-01-01", "{dt} is inside the projected range");
        assert_eq!(
            template.replace("${dt}", dt),
            format!("s3://lake/cdc/public/trades/{dir}/"),
            "the template finds partition {dir}"
        );
    }
    let p = &v["tables"]["prices_changes"]["parameters"];
    assert_eq!(p["projection.symbol.type"], "injected", "{p}");
    assert_eq!(
        p["storage.location.template"],
        "s3://lake/cdc/public/prices/symbol=${symbol}/"
    );
    assert_eq!(v["tables"]["prices_changes"]["partitions"], serde_json::json!([]));

    // Projection switched off: the next start drops the parameters and registers
    // every partition of the lake.
    edit_config(&l.config, "partition_projection = true", "partition_projection = false");
    sync(&l.config);
    let v = assert_readers_see_the_source(&l).await;
    for t in ["trades_changes", "prices_changes"] {
        let p = &v["tables"][t]["parameters"];
        assert!(p.get("projection.enabled").is_none(), "{t}: {p}");
    }
}

/// A Glue that refuses walshore's credentials (moto enforcing IAM): a definite error
/// naming the credentials and the IAM actions, not retried; nothing committed.
#[tokio::test]
async fn glue_refusing_the_credentials_is_a_definite_error() {
    let l = lake("").await;
    let port = free_port();
    let mut denying = std::process::Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(std::time::Duration::from_secs(30), "the IAM-enforcing moto", || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let text = std::fs::read_to_string(&l.config).unwrap();
    std::fs::write(
        &l.config,
        with_glue_endpoint(&l, &text, &format!("http://127.0.0.1:{port}")),
    )
    .unwrap();
    let out = walshore(&["sync", "--config", l.config.to_str().unwrap()]);
    let _ = denying.kill();
    let _ = denying.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("glue:BatchCreatePartition") && stderr.contains("credentials"),
        "the error names the credentials and the IAM actions:\n{stderr}"
    );
    assert!(!stderr.contains("transient failure"), "not retried:\n{stderr}");
    assert_eq!(committed_rows(&l.config, "public.trades"), 0, "nothing was committed");
}

fn committed_rows(config: &std::path::Path, table: &str) -> u64 {
    let status = walshore(&["status", "--config", config.to_str().unwrap()]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    status["tables"][table]["rows"].as_u64().unwrap_or(0)
}

/// Glue throttling, then refusing with concurrent-modification errors (AWS JSON errors
/// answered by a proxy in front of moto's Glue), then not answering at all, while `run`
/// streams: no commit reaches the lake before its partition is in Glue; throttling and
/// concurrent modification are waited out in place (the replication connection stays
/// up); a silent Glue times out and the pipeline reconnects; once Glue answers again
/// the new partitions and column arrive and the lake is exact.
#[tokio::test]
async fn glue_throttling_concurrent_changes_and_silence_are_retried_and_nothing_is_lost() {
    use support::proxy::{Mode, Proxy};
    let l = lake("").await;
    let proxy = Proxy::start(l.moto.port);
    let text = std::fs::read_to_string(&l.config).unwrap();
    let text = with_glue_endpoint(&l, &text, &format!("http://127.0.0.1:{}", proxy.port));
    assert!(text.contains("[sink]\n"), "{text}");
    std::fs::write(
        &l.config,
        text.replace("[sink]\n", "[sink]\nrequest_timeout = \"3s\"\n"),
    )
    .unwrap();
    sync(&l.config);
    let before = committed_rows(&l.config, "public.prices");
    let run = spawn_run(&l.config);
    let _log = LogOnPanic::new(&run);
    wait_until(std::time::Duration::from_secs(30), "replication to start", || async {
        stderr_of(&run).contains("replication started")
    })
    .await;

    // Throttled: a row in a new partition cannot commit, since its partition cannot be
    // registered first.
    proxy.set(Mode::AwsJsonError("ThrottlingException"));
    l.e.client
        .batch_execute("INSERT INTO prices VALUES ('throttled/1', 1, 1, NULL)")
        .await
        .unwrap();
    wait_until(std::time::Duration::from_secs(30), "throttling answers", || async {
        proxy.errors_served() >= 4
    })
    .await;
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        committed_rows(&l.config, "public.prices"),
        before,
        "a row committed while its partition could not be registered"
    );

    // Concurrent modification, with a column to add to Glue's table.
    let served = proxy.errors_served();
    proxy.set(Mode::AwsJsonError("ConcurrentModificationException"));
    l.e.client
        .batch_execute(
            "ALTER TABLE prices ADD COLUMN venue text; INSERT INTO prices VALUES ('busy/2', 2, 2, NULL, 'X')",
        )
        .await
        .unwrap();
    wait_until(
        std::time::Duration::from_secs(60),
        "concurrent-modification answers",
        || async { proxy.errors_served() >= served + 2 },
    )
    .await;
    assert_eq!(committed_rows(&l.config, "public.prices"), before);
    proxy.set(Mode::Forward);
    wait_until(
        std::time::Duration::from_secs(120),
        "the rows after Glue answers again",
        || async { committed_rows(&l.config, "public.prices") == before + 2 },
    )
    .await;
    let log = stderr_of(&run);
    for kind in ["ThrottlingException", "ConcurrentModificationException"] {
        assert!(
            log.lines().any(|l| l.contains("Glue is busy") && l.contains(kind)),
            "{kind} waited out in place:\n{log}"
        );
    }
    assert!(
        !log.contains("transient failure") && log.matches("replication started").count() == 1,
        "the pipeline did not reconnect for a busy Glue:\n{log}"
    );

    // Silence: each attempt times out (`sink.request_timeout`); the pipeline retries.
    proxy.set(Mode::Blackhole);
    l.e.client
        .batch_execute("INSERT INTO prices VALUES ('silent/3', 3, 3, NULL, 'Y')")
        .await
        .unwrap();
    wait_until(std::time::Duration::from_secs(90), "a timed-out Glue call", || async {
        stderr_of(&run).contains("transient failure")
    })
    .await;
    assert_eq!(committed_rows(&l.config, "public.prices"), before + 2);
    proxy.set(Mode::Forward);
    wait_until(
        std::time::Duration::from_secs(120),
        "the row after Glue answers again",
        || async { committed_rows(&l.config, "public.prices") == before + 3 },
    )
    .await;
    let log = stderr_of(&run);
    assert!(
        log.lines()
            .any(|l| l.contains("transient failure") && l.contains("Glue") && l.contains("timeout")),
        "the silent Glue's timeout named:\n{log}"
    );
    // The reconnect did not list the lake and Glue again: once per process.
    assert!(log.matches("replication started").count() >= 2, "{log}");
    assert_eq!(log.matches("Glue catalog reconciled with the lake").count(), 1, "{log}");

    // A stop while Glue throttles ends the wait at once; the row comes with the next sync.
    let served = proxy.errors_served();
    proxy.set(Mode::AwsJsonError("ThrottlingException"));
    l.e.client
        .batch_execute("INSERT INTO prices VALUES ('stopped/4', 4, 4, NULL, 'Z')")
        .await
        .unwrap();
    wait_until(std::time::Duration::from_secs(30), "throttling answers", || async {
        proxy.errors_served() >= served + 3
    })
    .await;
    let asked = std::time::Instant::now();
    let (_, stderr) = stop(run);
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(15),
        "the stop waited {:?} for Glue:\n{stderr}",
        asked.elapsed()
    );
    assert_eq!(committed_rows(&l.config, "public.prices"), before + 3);
    proxy.set(Mode::Forward);
    sync(&l.config);
    let v = assert_readers_see_the_source(&l).await;
    assert_eq!(
        columns(&v, "prices_changes").get("venue").map(String::as_str),
        Some("string")
    );
    let values: std::collections::BTreeSet<String> = v["tables"]["prices_changes"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["values"][0].as_str().unwrap().to_owned())
        .collect();
    for p in ["throttled/1", "busy/2", "silent/3", "stopped/4"] {
        assert!(values.contains(p), "{p} registered: {values:?}");
    }
}

/// Glue's side, changed by hand with boto3 (`python3 -c`); panics with its stderr.
fn glue_by_hand(l: &Lake, python: &str) {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import boto3\ng = boto3.client('glue', endpoint_url='{}', region_name='us-east-1')\n{python}",
                l.moto.endpoint()
            ),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A lake that gains `[catalog]` after it has data, then a Glue table and a partition
/// deleted by hand: each start registers what the lake holds and Glue lacks, with no
/// new change in PostgreSQL to trigger it.
#[tokio::test]
async fn a_start_registers_what_the_lake_holds_and_glue_lacks() {
    let l = lake("").await;
    let with_catalog = std::fs::read_to_string(&l.config).unwrap();
    let (without, _) = with_catalog.split_once("\n[catalog]\n").unwrap();
    std::fs::write(&l.config, without).unwrap();
    sync(&l.config);
    l.e.client
        .batch_execute(
            "UPDATE trades SET qty = qty + 1 WHERE id % 4 = 0; INSERT INTO prices VALUES ('late/1', 1, 1, NULL)",
        )
        .await
        .unwrap();
    sync(&l.config);
    assert!(lake_partitions(&l.config, "public.prices").await.len() >= 5);

    // The catalog turned on: nothing new in PostgreSQL, yet everything is registered.
    std::fs::write(&l.config, &with_catalog).unwrap();
    let out = walshore(&["sync", "--config", l.config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("registered partitions of the lake that Glue did not have"),
        "{stderr}"
    );
    assert_readers_see_the_source(&l).await;

    // Deleted by hand: the prices table, and one partition of trades.
    glue_by_hand(
        &l,
        &format!(
            "g.delete_table(DatabaseName='{DATABASE}', Name='prices_changes')\n\
             p = g.get_partitions(DatabaseName='{DATABASE}', TableName='trades_changes')['Partitions'][0]\n\
             g.batch_delete_partition(DatabaseName='{DATABASE}', TableName='trades_changes', PartitionsToDelete=[{{'Values': p['Values']}}])"
        ),
    );
    let v = glue_view(&l);
    assert!(v["tables"].get("prices_changes").is_none(), "{v}");
    assert_eq!(v["tables"]["trades_changes"]["partitions"], serde_json::json!([]));
    // `status` shows what Glue lacks.
    let c = catalog_status(&l);
    assert_eq!(c["database"], DATABASE, "{c}");
    assert_eq!(c["tables"]["public.prices"]["exists"], false, "{c}");
    assert_eq!(c["tables"]["public.trades"]["exists"], true, "{c}");
    assert_eq!(c["tables"]["public.trades"]["missing_partitions"], 1, "{c}");
    sync(&l.config);
    let v = assert_readers_see_the_source(&l).await;
    assert_eq!(columns(&v, "prices_changes")["px"], "decimal(10,4)");
    let c = catalog_status(&l);
    for t in ["public.prices", "public.trades"] {
        assert_eq!(c["tables"][t]["exists"], true, "{c}");
        assert_eq!(c["tables"][t]["missing_partitions"], 0, "{c}");
        assert_eq!(
            c["tables"][t]["registered_partitions"], c["tables"][t]["lake_partitions"],
            "{c}"
        );
    }
}

/// The start-up reconciliation with Glue takes longer than `wal_sender_timeout`: the
/// stream runs meanwhile and answers the server, so the walsender is not cut and the
/// start goes through at once; nothing commits before Glue has what the lake holds.
#[tokio::test]
async fn a_reconciliation_slower_than_wal_sender_timeout_keeps_the_stream_up() {
    let l = lake_on("", false, &["wal_sender_timeout = 2s"]).await;
    edit_config(&l.config, "\n\n[sink]", "status_interval = \"500ms\"\n\n[sink]");
    sync(&l.config);
    l.e.client.batch_execute(&insert_sql(1000, 1100)).await.unwrap();
    // Every answer from Glue a second late: the reconciliation takes several seconds.
    let proxy = support::proxy::Proxy::start(l.moto.port);
    let text = std::fs::read_to_string(&l.config).unwrap();
    std::fs::write(
        &l.config,
        with_glue_endpoint(&l, &text, &format!("http://127.0.0.1:{}", proxy.port)),
    )
    .unwrap();
    proxy.set(support::proxy::Mode::Delay(std::time::Duration::from_millis(1000)));
    let started = std::time::Instant::now();
    let out = walshore(&["sync", "--config", l.config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Without the log's colours (escape sequences hold digits too).
    let plain: String = stderr
        .split('\x1b')
        .enumerate()
        .map(|(i, part)| {
            if i == 0 {
                part
            } else {
                part.split_once('m').map_or(part, |(_, rest)| rest)
            }
        })
        .collect();
    let reconciled = plain
        .lines()
        .find(|l| l.contains("Glue catalog reconciled with the lake"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let elapsed_ms: u64 = reconciled
        .split("elapsed_ms")
        .nth(1)
        .and_then(|r| {
            r.trim_start_matches(|c: char| !c.is_ascii_digit())
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{reconciled}"));
    assert!(
        elapsed_ms > 3000,
        "the reconciliation outlasted wal_sender_timeout: {elapsed_ms} ms"
    );
    assert!(
        !stderr.contains("transient failure"),
        "the stream was never cut:\n{stderr}"
    );
    let log = std::fs::read_to_string(l.e.cluster.data_dir().join("server.log")).unwrap();
    assert!(!log.contains("replication timeout"), "{}", l.e.cluster.postmortem());
    eprintln!("sync with a slow Glue: {:?}", started.elapsed());
    proxy.set(support::proxy::Mode::Forward);
    l.e.assert_lake_equals_source(&l.config, SELECT).await;
    assert_readers_see_the_source(&l).await;
}

/// The `catalog` part of `walshore status`.
fn catalog_status(l: &Lake) -> Value {
    let out = walshore(&["status", "--config", l.config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["catalog"].clone()
}

/// A Glue table walshore did not make, and two PostgreSQL tables whose names map to one
/// Glue name: a definite error naming both and the way out; the foreign table is left
/// as it was, and nothing of the refused table is committed.
#[tokio::test]
async fn a_glue_table_walshore_does_not_own_is_never_overwritten() {
    let l = lake("").await;
    glue_by_hand(
        &l,
        &format!(
            "g.create_database(DatabaseInput={{'Name': '{DATABASE}'}})\n\
             g.create_table(DatabaseName='{DATABASE}', TableInput={{'Name': 'prices_changes', \
             'StorageDescriptor': {{'Columns': [{{'Name': 'mine', 'Type': 'string'}}], 'Location': 's3://elsewhere/'}}}})"
        ),
    );
    let out = walshore(&["sync", "--config", l.config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("prices_changes")
            && stderr.contains("not made by walshore")
            && stderr.contains("another catalog.database"),
        "{stderr}"
    );
    assert!(!stderr.contains("transient failure"), "not retried:\n{stderr}");
    assert_eq!(committed_rows(&l.config, "public.prices"), 0);
    let v = glue_view(&l);
    assert_eq!(
        columns(&v, "prices_changes").keys().collect::<Vec<_>>(),
        ["mine"],
        "left as it was"
    );

    // Without it, the lake fills; then a second table whose name maps to trades_changes.
    glue_by_hand(
        &l,
        &format!("g.delete_table(DatabaseName='{DATABASE}', Name='prices_changes')"),
    );
    sync(&l.config);
    l.e.client
        .batch_execute(
            "CREATE TABLE \"TRADES\" (id bigint PRIMARY KEY, note text); INSERT INTO \"TRADES\" VALUES (1, 'x');
             ALTER PUBLICATION pub ADD TABLE \"TRADES\"",
        )
        .await
        .unwrap();
    let out = walshore(&["check", "--config", l.config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("FAIL")
            && l.contains("public.TRADES, public.trades all map to the Glue table trades_changes")),
        "check sees the clash first:\n{stdout}"
    );
    let out = walshore(&["sync", "--config", l.config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("it holds public.trades, and public.TRADES maps to the same Glue name"),
        "{stderr}"
    );
    assert_eq!(committed_rows(&l.config, "public.TRADES"), 0);
    let v = assert_readers_see_the_source(&l).await;
    assert_eq!(
        v["tables"]["trades_changes"]["parameters"]["walshore_source_table"],
        "public.trades"
    );
}
