//! `walshore demo`: a throwaway PostgreSQL with a small trading schema, a few thousand
//! changes, replicated into `./walshore-demo/lake` with the file sink.

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use crate::cluster::{ClusterOptions, TempCluster};
use crate::config::Config;
use crate::pipeline::{self, Mode};

/// The trading schema of `sql/trading.sql` (also what docker-compose.yml loads), and
/// the publication.
const SCHEMA: &str = concat!(
    include_str!("../sql/trading.sql"),
    "CREATE PUBLICATION walshore FOR TABLE trades, prices, fx_rates, news;\n"
);

const CHANGES: &str = r#"
INSERT INTO fx_rates (pair, rate) VALUES ('EURUSD', 1.0850000000), ('GBPUSD', 1.2700000000), ('USDJPY', 151.2000000000);
INSERT INTO trades (symbol, side, quantity, price, trader)
  SELECT (ARRAY['AAPL','MSFT','NVDA','TSLA','AMZN'])[1 + i % 5], CASE WHEN i % 2 = 0 THEN 'B' ELSE 'S' END,
         100 + i % 900, round((100 + (i * 7919 % 10000) / 100.0)::numeric, 6), 'trader' || (i % 17)
  FROM generate_series(1, 2000) AS i;
INSERT INTO prices (symbol, ts, bid, ask)
  SELECT (ARRAY['AAPL','MSFT','NVDA','TSLA','AMZN'])[1 + i % 5], timestamptz '2026-11-20 09:30:00+00' + i * interval '1 second',
         100 + i / 1000.0, 100.01 + i / 1000.0
  FROM generate_series(1, 1000) AS i;
UPDATE fx_rates SET rate = rate * 1.001, updated_at = now();
UPDATE trades SET price = price + 0.01 WHERE id % 10 = 0;
DELETE FROM trades WHERE id % 100 = 0;
UPDATE trades SET id = id + 100000 WHERE id = 1;
INSERT INTO news (headline, body, tags)
  SELECT 'Headline ' || i, repeat('Markets moved on story ' || i || '. ', 2000), ARRAY['markets', 'story' || i]
  FROM generate_series(1, 50) AS i;
UPDATE news SET headline = headline || ' (updated)' WHERE id <= 10;
"#;

/// Sent on its own: inside one multi-statement query string the ROLLBACK would undo
/// everything before it too.
const ROLLED_BACK: &str = "BEGIN; INSERT INTO trades (symbol, side, quantity, price, trader) VALUES ('ROLLED', 'B', 1, 1, 'nobody'); ROLLBACK;";

pub async fn demo(dir: &Path) -> anyhow::Result<()> {
    let dir = std::path::absolute(dir)?;
    let lake = dir.join("lake");
    if lake.exists() {
        std::fs::remove_dir_all(&lake)?;
    }
    std::fs::create_dir_all(&dir)?;
    println!("starting a throwaway PostgreSQL ...");
    let mut cluster = TempCluster::start(ClusterOptions::default())?;
    let result = run_demo(&cluster, &dir, &lake).await;
    cluster.stop()?;
    println!("stopped PostgreSQL");
    result
}

async fn run_demo(cluster: &TempCluster, dir: &Path, lake: &PathBuf) -> anyhow::Result<()> {
    let admin = cluster.connect("postgres").await?;
    admin.batch_execute("CREATE DATABASE trading").await?;
    let db = cluster.connect("trading").await?;
    db.batch_execute(SCHEMA).await?;
    println!(
        "created tables trades, prices, fx_rates, news and publication walshore (port {})",
        cluster.port
    );

    let config_path = dir.join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "[source]\nurl = \"{}\"\npublication = \"walshore\"\nslot = \"walshore_demo\"\n\n[sink]\nurl = \"file://{}\"\nflush_interval = \"1s\"\n\n[snapshot]\nmode = \"initial\"\n",
            cluster.url("postgres", "trading"),
            lake.display()
        ),
    )?;
    let cfg = Config::load(&config_path)?;
    // First sync creates the slot; from then on every change is captured.
    pipeline::run(&cfg, Mode::Sync, CancellationToken::new()).await?;
    // One statement, one transaction: a multi-statement string would be one transaction.
    for statement in CHANGES.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
        db.batch_execute(statement).await?;
    }
    db.batch_execute(ROLLED_BACK).await?;
    println!(
        "wrote changes: 2000 trades, 1000 prices, fx updates, deletes, a key change, 50 news with large bodies, a rollback"
    );
    let summary = pipeline::run(&cfg, Mode::Sync, CancellationToken::new()).await?;
    println!(
        "\nreplicated up to LSN {} in {} commit(s), {} file(s), {} bytes:",
        summary.end_lsn, summary.commits, summary.files, summary.bytes
    );
    for (table, rows) in &summary.rows {
        println!("  {table:<20} {rows:>6} rows");
    }
    println!("\nfiles under {}:", lake.display());
    let mut files = Vec::new();
    collect(lake, &mut files)?;
    files.sort();
    for f in files {
        println!("  {}", f.strip_prefix(lake).unwrap_or(&f).display());
    }
    println!(
        "\nconfig used: {} (its PostgreSQL is thrown away now: point source.url at your own database and run `walshore check` then `walshore run`)",
        config_path.display()
    );
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            collect(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}
