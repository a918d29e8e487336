//! Compaction of the change log (`[compaction]`): a closed partition's files are
//! rewritten into one, swapped in by one commit record, and the replaced files deleted
//! `delete_after` later. Readers that follow the log see every change once, before,
//! during and after; a late row is compacted again; a crash at each step leaves the
//! lake exact and nothing behind.

mod support;

use std::time::Duration;

use support::*;
use walshore::compaction::is_compacted;

const QUOTES: &str = "SELECT id::text, region, px::text FROM quotes";

struct Lab {
    _cluster: walshore::cluster::TempCluster,
    client: tokio_postgres::Client,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

/// `quotes` partitioned by region, compacted once a partition is quiet for 2 s; the
/// replaced files go 3 s after the swap.
async fn lab() -> Lab {
    let cluster = cluster(&[]);
    let client = cluster.connect("postgres").await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE quotes (id int PRIMARY KEY, region text NOT NULL, px numeric(12,4));
             CREATE PUBLICATION pub FOR TABLE quotes",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}poll_interval = \"300ms\"\n\n[partitions]\n\"public.quotes\" = \"column:region\"\n\n[compaction]\ngrace = \"2s\"\ndelete_after = \"3s\"\ntarget_file_size = \"1MiB\"\n"
        ),
    )
    .unwrap();
    Lab {
        _cluster: cluster,
        client,
        _dir: dir,
        config,
    }
}

/// Starts `walshore run` (with `env`) and waits until it streams: the slot is active.
async fn start(l: &Lab, env: &[(&str, &str)]) -> std::process::Child {
    let run = spawn_run_with(&l.config, env);
    wait_until(Duration::from_secs(60), "walshore streaming", || async {
        slot_count(&l.client, true).await == 1
    })
    .await;
    run
}

/// `n` transactions in `region`, each its own flush (the sink flushes every 200 ms):
/// inserts of ids `base..`, and updates of the rows inserted before.
async fn write_region(c: &tokio_postgres::Client, region: &str, base: i32, n: i32) {
    for i in 0..n {
        let id = base + i;
        c.batch_execute(&format!(
            "INSERT INTO quotes VALUES ({id}, '{region}', {id}.5);
             UPDATE quotes SET px = px + 1 WHERE region = '{region}' AND id < {id} AND id % 2 = 0"
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The keys of the committed files of `quotes`' partition `region=…`.
async fn files_of(config: &std::path::Path, region: &str) -> Vec<String> {
    let store = open_lake(config);
    let partition = format!("region={region}");
    walshore::checkpoint::committed_files(store.as_ref())
        .await
        .unwrap()
        .into_iter()
        .filter(|f| f.table == "public.quotes" && f.partition == partition)
        .map(|f| f.key)
        .collect()
}

/// Waits until the partition's committed files are one compacted file.
async fn wait_compacted(config: &std::path::Path, region: &str) -> String {
    wait_until(
        Duration::from_secs(90),
        &format!("region={region} compacted"),
        || async {
            let f = files_of(config, region).await;
            f.len() == 1 && is_compacted(&f[0])
        },
    )
    .await;
    files_of(config, region).await.remove(0)
}

/// Files in the table's folder: what a reader that globs it sees.
async fn listed(config: &std::path::Path) -> Vec<String> {
    let store = open_lake(config);
    let prefix = object_store::path::Path::from("public/quotes");
    let metas: Vec<_> = futures::TryStreamExt::try_collect(store.list(Some(&prefix)))
        .await
        .unwrap();
    metas
        .into_iter()
        .map(|m| m.location.to_string())
        .filter(|l| l.ends_with(".parquet"))
        .collect()
}

/// Tickets of compactions not settled yet.
async fn tickets(config: &std::path::Path) -> usize {
    let store = open_lake(config);
    walshore::compaction::tickets(store.as_ref(), &mut Default::default())
        .await
        .unwrap()
        .len()
}

/// The lake, read as the log names it, replays to the source, every change once; so
/// does the folder once the replaced files are gone.
async fn assert_exact(l: &Lab, what: &str) {
    let store = open_lake(&l.config);
    let committed = read_committed(&store, "public", "quotes").await;
    assert_unique_positions(&committed);
    assert_eq!(
        replay(&committed, Some(&["id"])),
        source_rows(&l.client, QUOTES).await,
        "{what}: the committed files replayed differ from the source"
    );
}

#[tokio::test]
async fn a_quiet_partition_is_compacted_and_a_late_row_compacts_it_again() {
    let l = lab().await;
    let run = start(&l, &[]).await;
    let _log = LogOnPanic::new(&run);
    write_region(&l.client, "eu", 0, 8).await;
    write_region(&l.client, "us", 100, 6).await;
    let before = read_committed(&open_lake(&l.config), "public", "quotes").await;

    let eu = wait_compacted(&l.config, "eu").await;
    let us = wait_compacted(&l.config, "us").await;
    assert_exact(&l, "after the first compactions").await;
    let after = read_committed(&open_lake(&l.config), "public", "quotes").await;
    // The same rows, position by position.
    let rows = |t: &LakeTable| {
        t.rows
            .iter()
            .map(|r| (r.lsn, r.seq, r.op.clone(), r.values.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rows(&after)[..before.rows.len()],
        rows(&before)[..],
        "compaction changed rows"
    );

    // The replaced files go once delete_after has passed, and with them the tickets:
    // then the folder holds only the compacted files.
    wait_until(Duration::from_secs(60), "replaced files deleted", || async {
        tickets(&l.config).await == 0 && listed(&l.config).await.len() == 2
    })
    .await;
    let mut folder = listed(&l.config).await;
    folder.sort();
    let mut want = vec![eu.clone(), us];
    want.sort();
    assert_eq!(folder, want);
    let globbed = read_table(&open_lake(&l.config), "public", "quotes").await;
    assert_unique_positions(&globbed);
    assert_no_orphans(&l.config).await;
    wait_until(
        Duration::from_secs(30),
        "status: nothing waiting, nothing unsettled",
        || async {
            let s = status(&l.config);
            s["compaction"]["waiting"] == 0 && s["compaction"]["unsettled"] == 0
        },
    )
    .await;

    // A late row in eu: a loose file beside the compacted one, then one file again.
    write_region(&l.client, "eu", 50, 2).await;
    wait_until(
        Duration::from_secs(90),
        "eu compacted again, with the late rows",
        || async {
            let f = files_of(&l.config, "eu").await;
            f.len() == 1 && is_compacted(&f[0]) && f[0] != eu
        },
    )
    .await;
    assert_exact(&l, "after a late row's compaction").await;

    let verified = walshore(&["verify", "--config", l.config.to_str().unwrap()]);
    assert!(
        verified.status.success(),
        "verify after compaction: {}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let (status, stderr) = stop(run);
    assert!(status.success(), "walshore run failed:\n{stderr}");
    assert_pyarrow_reads(&l.config);
}

/// A crash at each step of a compaction (`walshore::fault::COMPACTION_POINTS`): the next
/// run settles it, the lake read as the log names it equals the source, and nothing is
/// left behind.
#[tokio::test]
async fn a_crash_at_every_step_of_a_compaction_leaves_the_lake_exact() {
    let l = lab().await;
    for (round, point) in walshore::fault::COMPACTION_POINTS.iter().enumerate() {
        let region = format!("r{round}");
        let crashing = start(&l, &[("WALSHORE_FAULT", point)]).await;
        write_region(&l.client, &region, round as i32 * 100, 5).await;
        let mut crashing = crashing;
        wait_for(Duration::from_secs(90), &format!("a crash at {point}"), || {
            crashing.try_wait().unwrap().is_some()
        });
        let stderr = stderr_of(&crashing);
        assert!(
            stderr.contains(&format!("fault injected at {point}")),
            "{point}: run did not crash there (built without --features fault-injection?):\n{stderr}"
        );
        let run = start(&l, &[]).await;
        let _log = LogOnPanic::new(&run);
        wait_compacted(&l.config, &region).await;
        wait_until(Duration::from_secs(60), "every ticket settled", || async {
            tickets(&l.config).await == 0
        })
        .await;
        let (status, stderr) = stop(run);
        assert!(status.success(), "{point}: walshore run failed:\n{stderr}");
        assert_exact(&l, point).await;
        // Every file in the folder is committed and visible: the crash left nothing.
        let store = open_lake(&l.config);
        let globbed = read_table(&store, "public", "quotes").await;
        assert_unique_positions(&globbed);
        assert_no_orphans(&l.config).await;
    }
}
