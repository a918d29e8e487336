//! Row semantics analysts rely on: unchanged TOAST values are never invented, and
//! `check` says which tables will carry them.

mod support;

use support::*;

/// Rows of `table` whose `_op` is `op`, as (unchanged columns, body).
fn ops(t: &LakeTable, op: &str) -> Vec<(Vec<String>, Option<String>)> {
    t.rows
        .iter()
        .filter(|r| r.op == op)
        .map(|r| (r.unchanged.clone(), r.values["body"].clone()))
        .collect()
}

#[tokio::test]
async fn unchanged_toast_is_carried_from_the_old_row_or_named_never_invented() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    // EXTERNAL storage keeps the 8 kB values out of line, uncompressed: TOASTed.
    c.batch_execute(
        "CREATE TABLE doc_default (id int PRIMARY KEY, qty int, body text);
         CREATE TABLE doc_full (id int PRIMARY KEY, qty int, body text);
         ALTER TABLE doc_default ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE doc_full ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE doc_full REPLICA IDENTITY FULL;
         CREATE PUBLICATION pub FOR TABLE doc_default, doc_full;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    let out = walshore(&["check", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("toast") && l.contains("public.doc_default") && l.contains("REPLICA IDENTITY FULL")),
        "check warns about the table without FULL:\n{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.contains("toast") && l.contains("public.doc_full")),
        "no warning for the FULL table:\n{text}"
    );
    sync(&config);
    for t in ["doc_default", "doc_full"] {
        c.batch_execute(&format!(
            "INSERT INTO {t} SELECT i, i, (SELECT string_agg(md5(i::text || g::text), '') FROM generate_series(1, 256) g)
             FROM generate_series(1, 3) i;"
        ))
        .await
        .unwrap();
    }
    sync(&config);
    c.batch_execute("UPDATE doc_default SET qty = qty + 10; UPDATE doc_full SET qty = qty + 10; UPDATE doc_default SET qty = 0 WHERE id = 1")
        .await
        .unwrap();
    sync(&config);
    let store = open_lake(&config);
    let select = |t: &str| format!("SELECT id::text, qty::text, body FROM {t}");

    let default = read_table(&store, "public", "doc_default").await;
    let updates = ops(&default, "U");
    assert_eq!(updates.len(), 4);
    assert!(
        updates
            .iter()
            .all(|(unchanged, body)| unchanged == &["body"] && body.is_none()),
        "DEFAULT identity: the unchanged value is null and named in _unchanged: {updates:?}"
    );
    assert_eq!(
        replay(&default, Some(&["id"])),
        source_rows(&c, &select("doc_default")).await,
        "carried forward, the lake equals the source"
    );

    let full = read_table(&store, "public", "doc_full").await;
    let inserts = ops(&full, "I");
    assert_eq!(inserts.len(), 6, "3 inserts, then 3 updates as D + I");
    assert!(
        inserts
            .iter()
            .all(|(unchanged, body)| unchanged.is_empty() && body.as_ref().is_some_and(|b| b.len() == 8192)),
        "FULL identity: the value comes from the old row"
    );
    assert_eq!(replay(&full, Some(&["id"])), source_rows(&c, &select("doc_full")).await);
}

/// Columns to compare: `(name, name before a rename)`.
type Columns<'a> = &'a [(&'a str, Option<&'a str>)];

/// The replayed rows projected on `cols` (a `(new, old)` pair reads `new`, or `old`
/// where the row predates a rename).
fn project(t: &LakeTable, rows: Vec<Vec<Option<String>>>, cols: &[(&str, Option<&str>)]) -> Vec<Vec<Option<String>>> {
    let at = |c: &str| t.columns.iter().position(|x| x == c);
    let mut out: Vec<Vec<Option<String>>> = rows
        .into_iter()
        .map(|r| {
            cols.iter()
                .map(|(c, old)| {
                    let v = at(c).and_then(|i| r[i].clone());
                    v.or_else(|| old.and_then(at).and_then(|i| r[i].clone()))
                })
                .collect()
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn schema_changes_during_a_busy_stream_follow_the_lake_schema() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(
        "CREATE TABLE evo (id int PRIMARY KEY, qty int4, price numeric(10,2), label varchar(10), old_col text, gone text);
         CREATE PUBLICATION pub FOR TABLE evo;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    sync(&config);
    c.batch_execute(
        "INSERT INTO evo SELECT i, i, i / 4.0, 'l' || i, 'o' || i, 'g' || i FROM generate_series(1, 200) i",
    )
    .await
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let w = cluster.connect("postgres").await.unwrap();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                w.batch_execute(&format!(
                    "BEGIN; INSERT INTO evo (id, qty, price, label) VALUES ({id}, 1, 0.5, 'w'); UPDATE evo SET qty = qty + 1 WHERE id = {u}; DELETE FROM evo WHERE id = {d}; COMMIT",
                    id = 1000 + i, u = 1 + i % 200, d = 1000 + i / 2
                ))
                .await
                .unwrap();
                i += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
    };
    let store = open_lake(&config);
    let steps: [(&str, &str, Columns); 4] = [
        (
            "add",
            "ALTER TABLE evo ADD COLUMN note text; UPDATE evo SET note = 'n' || id WHERE id % 3 = 0",
            &[("id", None), ("qty", None), ("price", None), ("label", None), ("old_col", None), ("gone", None), ("note", None)],
        ),
        (
            "drop",
            "ALTER TABLE evo DROP COLUMN gone; UPDATE evo SET note = 'd' WHERE id % 5 = 0",
            &[("id", None), ("qty", None), ("price", None), ("label", None), ("old_col", None), ("note", None)],
        ),
        (
            "rename",
            "ALTER TABLE evo RENAME COLUMN old_col TO new_col; UPDATE evo SET new_col = 'r' || id WHERE id % 7 = 0",
            &[("id", None), ("qty", None), ("price", None), ("label", None), ("new_col", Some("old_col")), ("note", None)],
        ),
        (
            "widen",
            "ALTER TABLE evo ALTER COLUMN qty TYPE int8, ALTER COLUMN price TYPE numeric(12,2), ALTER COLUMN label TYPE text;
             UPDATE evo SET qty = 5000000000, price = 1234567890.25, label = repeat('x', 30) WHERE id = 2",
            &[("id", None), ("qty", None), ("price", None), ("label", None), ("new_col", Some("old_col")), ("note", None)],
        ),
    ];
    for (what, ddl, cols) in steps {
        c.batch_execute(ddl).await.unwrap();
        // Let the writer commit under the new schema too.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let names: Vec<String> = cols.iter().map(|(c, _)| c.to_string()).collect();
        let select = format!(
            "SELECT {} FROM evo",
            names
                .iter()
                .map(|n| format!("{n}::text"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Hold writers off while both sides are read.
        c.batch_execute("BEGIN; LOCK TABLE evo IN EXCLUSIVE MODE")
            .await
            .unwrap();
        let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let source = source_rows(&c, &select).await;
        c.batch_execute("COMMIT").await.unwrap();
        let lake = read_table(&store, "public", "evo").await;
        assert_unique_positions(&lake);
        let replayed = replay(&lake, Some(&["id"]));
        assert_eq!(project(&lake, replayed, cols), source, "after {what}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let schema: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("lake/_walshore/schemas/public.evo.json")).unwrap())
            .unwrap();
    let column = |n: &str| {
        schema["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
    };
    assert_eq!(column("gone").unwrap()["dropped"], true, "{schema}");
    assert_eq!(
        column("old_col").unwrap()["dropped"],
        true,
        "a rename drops the old name"
    );
    assert_eq!(column("new_col").unwrap()["dropped"], false);
    assert_eq!(column("qty").unwrap()["arrow_type"], "Int64", "widened");
    assert_eq!(column("price").unwrap()["arrow_type"], "Decimal128(12, 2)", "widened");

    // Not a widening: the pipeline stops and says what and how to go on.
    c.batch_execute(
        "ALTER TABLE evo ALTER COLUMN label TYPE int USING length(label); UPDATE evo SET qty = 1 WHERE id = 3",
    )
    .await
    .unwrap();
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("column public.evo.label changed type from Utf8 to Int32")
            && stderr.contains("walshore resnapshot --table public.evo"),
        "{stderr}"
    );
    // The way out the message gives: the old version aside, a new copy.
    std::fs::rename(dir.path().join("lake/public/evo"), dir.path().join("evo-v1")).unwrap();
    std::fs::remove_file(dir.path().join("lake/_walshore/schemas/public.evo.json")).unwrap();
    let out = walshore(&[
        "resnapshot",
        "--config",
        config.to_str().unwrap(),
        "--table",
        "public.evo",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.batch_execute("UPDATE evo SET label = 42 WHERE id = 4").await.unwrap();
    sync(&config);
    let lake = read_table(&store, "public", "evo").await;
    assert_unique_positions(&lake);
    assert!(
        lake.rows.first().is_some_and(|r| r.op == "T"),
        "the new version starts with T"
    );
    let cols: Columns = &[
        ("id", None),
        ("qty", None),
        ("label", None),
        ("new_col", None),
        ("note", None),
    ];
    let names: Vec<&str> = cols.iter().map(|(c, _)| *c).collect();
    let select = format!(
        "SELECT {} FROM evo",
        names
            .iter()
            .map(|n| format!("{n}::text"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(
        project(&lake, replay(&lake, Some(&["id"])), cols),
        source_rows(&c, &select).await,
        "the table copied anew, with its new types, then streamed"
    );
}

#[tokio::test]
async fn values_parquet_cannot_hold_follow_the_configured_policy() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(
        "CREATE TABLE odd (id int PRIMARY KEY, d date, ts timestamptz, n numeric(10,2), f float8);
         INSERT INTO odd VALUES (1, 'infinity', '-infinity', 'NaN', 'Infinity'), (2, '-infinity', 'infinity', 1.5, '-0'),
                                (3, '2026-01-01', '2026-01-01 00:00:00+00', 2.25, 'NaN'),
                                (5, '2026-01-01', '294276-12-31 23:59:59+00', 1, 1);
         CREATE PUBLICATION pub FOR TABLE odd;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_for = |policy: &str| {
        let sub = dir.path().join(policy);
        std::fs::create_dir_all(&sub).unwrap();
        let config = write_config(
            &sub,
            &cluster.url("postgres", "postgres"),
            "pub",
            &format!("s_{policy}"),
            &SinkKind::File(sub.join("lake")),
            &format!("unrepresentable = \"{policy}\""),
            "",
        );
        use_initial_snapshot(&config, "");
        config
    };

    // The default: stop, naming table, column and value.
    let out = walshore(&["sync", "--config", config_for("error").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("public.odd.d") && stderr.contains("\"infinity\" cannot be represented"),
        "{stderr}"
    );

    let null = config_for("null");
    let clamp = config_for("clamp");
    sync(&null);
    sync(&clamp);
    c.batch_execute("INSERT INTO odd VALUES (4, '-infinity', 'infinity', 'NaN', 1), (6, '2026-01-01', '294276-12-31 23:59:59+00', 1, 1)")
        .await
        .unwrap();
    sync(&null);
    sync(&clamp);

    let row = |t: &LakeTable, id: &str| {
        t.rows
            .iter()
            .find(|r| r.values["id"].as_deref() == Some(id))
            .cloned()
            .unwrap()
    };
    let cols =
        |r: &LakeRow| -> Vec<Option<String>> { ["d", "ts", "n", "f"].iter().map(|c| r.values[*c].clone()).collect() };
    let s = |v: &str| Some(v.to_owned());
    let lake = read_table(&open_lake(&null), "public", "odd").await;
    for id in ["1", "2", "4"] {
        assert!(row(&lake, id).replaced.contains(&"d".to_owned()), "row {id} names d");
    }
    assert_eq!(
        cols(&row(&lake, "1")),
        [None, None, None, s("inf")],
        "null: the value is null, float keeps infinity"
    );
    assert_eq!(row(&lake, "1").replaced, ["d", "ts", "n"]);
    assert_eq!(row(&lake, "4").replaced, ["d", "ts", "n"], "streamed rows too");
    assert!(row(&lake, "3").replaced.is_empty(), "an ordinary row names nothing");
    assert_eq!(
        cols(&row(&lake, "3")),
        [s("20454"), s("1767225600000000"), s("2.25"), s("NaN")]
    );

    let lake = read_table(&open_lake(&clamp), "public", "odd").await;
    // 9999-12-31 is day 2932896, 0001-01-01 day -719162 of the Unix epoch.
    assert_eq!(
        cols(&row(&lake, "1")),
        [s("2932896"), s("-62135596800000000"), None, s("inf")],
        "clamp: the nearest value; NaN has none"
    );
    assert_eq!(
        cols(&row(&lake, "2")),
        [s("-719162"), s("253402300799999999"), s("1.50"), s("-0")]
    );
    assert_eq!(row(&lake, "2").replaced, ["d", "ts"]);
    assert_eq!(cols(&row(&lake, "4"))[..2], [s("-719162"), s("253402300799999999")]);
    // Past year 294247 (PostgreSQL goes to 294276): copied (binary) and streamed (text).
    for id in ["5", "6"] {
        assert_eq!(cols(&row(&lake, id))[1], s("253402300799999999"), "row {id}");
        assert_eq!(row(&lake, id).replaced, ["ts"], "row {id}");
    }
}

/// Partition paths of a table's objects (the object keys, as S3 would hold them; the
/// local-directory store escapes `%` once more on disk).
async fn partition_dirs(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    table: &str,
) -> std::collections::BTreeSet<String> {
    use futures::TryStreamExt;
    let prefix = object_store::path::Path::from(format!("public/{table}"));
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    metas
        .iter()
        .map(|m| {
            let key = m.location.as_ref();
            let rel = &key[prefix.as_ref().len() + 1..];
            rel[..rel.rfind('/').unwrap()].to_owned()
        })
        .collect()
}

#[tokio::test]
async fn tables_partition_by_commit_date_commit_hour_or_an_escaped_column_value() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(
        "CREATE TABLE fills (id int PRIMARY KEY, venue text, qty int);
         CREATE TABLE ticks (id int PRIMARY KEY, px numeric(10,2));
         CREATE TABLE plain (id int PRIMARY KEY);
         INSERT INTO fills VALUES (1, 'NYSE', 1), (2, 'a/b', 2), (3, 'x=y%', 3), (4, NULL, 4), (5, '../up', 5);
         INSERT INTO ticks SELECT i, i FROM generate_series(1, 10) i;
         INSERT INTO plain VALUES (1);
         CREATE PUBLICATION pub FOR TABLE fills, ticks, plain;",
    )
    .await
    .unwrap();
    // On S3 (moto), where keys are what Athena sees; the local-directory store would
    // escape `%` once more in its file names.
    set_fake_aws_env();
    let moto = Moto::start("lake");
    let dir = tempfile::tempdir().unwrap();
    let sink = SinkKind::S3 {
        moto: &moto,
        bucket: "lake",
        prefix: "cdc",
    };
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &sink,
        "",
        "",
    );
    use_initial_snapshot(&config, "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[partitions]\n\"public.fills\" = \"column:venue\"\n\"public.ticks\" = \"commit_hour\"\n"),
    )
    .unwrap();
    sync(&config);
    c.batch_execute(
        "INSERT INTO fills VALUES (6, 'NYSE', 6), (7, 'LSE', 7); UPDATE fills SET venue = 'LSE' WHERE id = 1;
         UPDATE fills SET qty = 30 WHERE id = 3; DELETE FROM fills WHERE id = 2; UPDATE ticks SET px = px * 2",
    )
    .await
    .unwrap();
    sync(&config);

    let store = open_lake(&config);
    let fills = partition_dirs(&store, "fills").await;
    for venue in [
        "venue=NYSE",
        "venue=LSE",
        "venue=a%2Fb",
        "venue=x%3Dy%25",
        "venue=__HIVE_DEFAULT_PARTITION__",
        "venue=..%2Fup",
    ] {
        assert!(fills.contains(venue), "{venue} in {fills:?}");
    }
    assert!(
        fills.iter().all(|p| !p.contains('/')),
        "one segment per value: {fills:?}"
    );
    let ticks = partition_dirs(&store, "ticks").await;
    assert!(
        !ticks.is_empty()
            && ticks.iter().all(|p| {
                let (dt, hour) = p.split_once('/').unwrap();
                dt.len() == 13 && dt.starts_with("dt=") && hour.len() == 7 && hour.starts_with("hour=")
            }),
        "dt=YYYY-MM-DD/hour=HH: {ticks:?}"
    );
    let plain = partition_dirs(&store, "plain").await;
    assert!(plain.iter().all(|p| p.starts_with("dt=") && p.len() == 13), "{plain:?}");

    let fills = read_table(&store, "public", "fills").await;
    assert_unique_positions(&fills);
    assert_eq!(
        replay(&fills, Some(&["id"])),
        source_rows(&c, "SELECT id::text, venue, qty::text FROM fills").await,
        "replayed across partitions, fills equals the source"
    );
    let ticks = read_table(&store, "public", "ticks").await;
    assert_eq!(
        replay(&ticks, Some(&["id"])),
        source_rows(&c, "SELECT id::text, px::text FROM ticks").await
    );

    // A partition column the table does not have is named, with the fix.
    std::fs::write(
        &config,
        format!("{text}\n[partitions]\n\"public.fills\" = \"column:nope\"\n"),
    )
    .unwrap();
    c.batch_execute("INSERT INTO fills VALUES (8, 'NYSE', 8)")
        .await
        .unwrap();
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("public.fills has no column nope"), "{stderr}");

    // The same mistake on a new lake stops its copy with the same message.
    let fresh = tempfile::tempdir().unwrap();
    let config = lake_config(fresh.path(), &cluster, "postgres");
    use_initial_snapshot(&config, "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[partitions]\n\"public.fills\" = \"column:nope\"\n"),
    )
    .unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("slot = \"walshore\"", "slot = \"fresh\"");
    std::fs::write(&config, text).unwrap();
    let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("public.fills has no column nope"), "{stderr}");
}
