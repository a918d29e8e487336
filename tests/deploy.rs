//! What a platform team deploys: the DBA's SQL for RDS, the container image, the compose
//! file and the CDK stack. Each is run or checked here, so none of them is documentation
//! only.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `file` (relative to the repository) with psql in database `db`, stopping at the
/// first error.
fn psql(cluster: &walshore::cluster::TempCluster, db: &str, file: &str) -> String {
    let out = Command::new(cluster.bin().join("psql"))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &cluster.port.to_string(), "-d", db, "-f"])
        .arg(Path::new(ROOT).join(file))
        .output()
        .expect("psql");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "psql -f {file}:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `sql/rds.sql` runs as written (with stand-ins for the roles RDS provides) and its role
/// is enough for walshore: check passes, the tables are copied and changes follow.
#[tokio::test]
async fn rds_sql_gives_walshore_a_role_that_replicates_the_trading_tables() {
    let cluster = cluster(&[]);
    let admin = cluster.connect("postgres").await.unwrap();
    // RDS provides these roles; rds_replication carries REPLICATION there (plain
    // PostgreSQL does not pass that attribute on through membership, hence the ALTER below).
    admin
        .batch_execute("CREATE ROLE rds_replication NOLOGIN; CREATE ROLE rds_iam NOLOGIN;")
        .await
        .unwrap();
    psql(&cluster, "postgres", "sql/trading.sql");
    let out = psql(&cluster, "postgres", "sql/rds.sql");
    assert!(out.contains("logical"), "SHOW wal_level: {out}");
    // The test cluster asks every role but postgres for a password (on RDS: the IAM token).
    admin
        .batch_execute("ALTER ROLE walshore REPLICATION PASSWORD 'pw'")
        .await
        .unwrap();
    admin
        .batch_execute("INSERT INTO fx_rates (pair, rate) VALUES ('EURUSD', 1.085), ('GBPUSD', 1.27)")
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &cluster.url("walshore:pw", "postgres"),
        "walshore",
        "walshore",
        &SinkKind::File(dir.path().join("lake")),
        "",
        "",
    );
    use_initial_snapshot(&config, "");
    let check = walshore(&["check", "--config", config.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "walshore check as the rds.sql role:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    sync(&config);
    admin
        .batch_execute("UPDATE fx_rates SET rate = 1.09 WHERE pair = 'EURUSD'")
        .await
        .unwrap();
    sync(&config);
    let store = open_lake(&config);
    let fx = read_table(&store, "public", "fx_rates").await;
    let ops: Vec<&str> = fx.rows.iter().map(|r| r.op.as_str()).collect();
    assert_eq!(ops, ["R", "R", "U"], "{:?}", fx.rows);
}
