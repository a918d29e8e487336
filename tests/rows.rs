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
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &SinkKind::File(dir.path().join("lake")),
        "",
        "",
    );
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
