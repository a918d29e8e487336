//! `walshore demo`: a throwaway PostgreSQL with a small trading schema, a few thousand
//! changes, replicated into `./walshore-demo/lake` with the file sink, with the
//! current-state Iceberg tables beside the change log.

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

async fn run_demo(cluster: &TempCluster, dir: &Path, lake: &Path) -> anyhow::Result<()> {
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
            "[source]\nurl = \"{}\"\npublication = \"walshore\"\nslot = \"walshore_demo\"\n\n[sink]\nurl = \"file://{}\"\nflush_interval = \"1s\"\n\n[snapshot]\nmode = \"initial\"\n\n[iceberg]\nbuckets = 4\n",
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
    // As `walshore sync` does: the Iceberg tables catch up with what it committed.
    if let Some(mut projector) = crate::iceberg::projector::Projector::new(&cfg)? {
        projector.catch_up().await?;
    }
    println!(
        "\nreplicated up to LSN {} in {} commit(s), {} file(s), {} bytes:",
        summary.end_lsn, summary.commits, summary.files, summary.bytes
    );
    for (table, rows) in &summary.rows {
        println!("  {table:<20} {rows:>6} rows");
    }
    let mut files = Vec::new();
    collect(lake, &mut files)?;
    println!(
        "\n{} files under {} (change logs in public/<table>/dt=<day>/, the commit log in _walshore/, current-state Iceberg tables in _iceberg/public/<table>/)",
        files.len(),
        lake.display()
    );
    analyst_view(lake)?;
    println!(
        "\nconfig used: {} (its PostgreSQL is thrown away now: point source.url at your own database and run `walshore check` then `walshore run`)",
        config_path.display()
    );
    Ok(())
}

/// DuckDB over the demo's lake: the current state of a table is each key's last change
/// by (_lsn, _seq) unless that is a delete. `{lake}` is the lake's folder. The demo
/// truncates nothing, and these columns are never TOASTed; `walshore athena-sql`'s views
/// handle both.
const DUCKDB_ANALYST_SQL: &str = "\
SELECT symbol, arg_max(bid, ts) AS bid, arg_max(ask, ts) AS ask, max(ts) AS quoted_at FROM (
  SELECT * FROM read_parquet('{lake}/public/prices/*/*.parquet')
  QUALIFY row_number() OVER (PARTITION BY symbol, ts ORDER BY _lsn DESC, _seq DESC) = 1
) WHERE _op <> 'D' GROUP BY symbol ORDER BY symbol;
SELECT trader, sum(CASE side WHEN 'B' THEN quantity ELSE -quantity END) AS position, count(*) AS trades FROM (
  SELECT * FROM read_parquet('{lake}/public/trades/*/*.parquet')
  QUALIFY row_number() OVER (PARTITION BY id ORDER BY _lsn DESC, _seq DESC) = 1
) WHERE _op <> 'D' GROUP BY trader ORDER BY trader;
";

/// DuckDB over the demo's Iceberg table of `trades` (`[iceberg]`): the current state is
/// the table itself.
const DUCKDB_ICEBERG_SQL: &str = "\
INSTALL iceberg;
LOAD iceberg;
SELECT trader, sum(CASE side WHEN 'B' THEN quantity ELSE -quantity END) AS position, count(*) AS trades
FROM iceberg_scan('{lake}/_iceberg/public/trades') GROUP BY trader ORDER BY trader;
";

/// What an analyst sees: two tables in their current state, replayed from the lake's
/// change rows, and the DuckDB command that asks the same of the same files.
fn analyst_view(lake: &Path) -> anyhow::Result<()> {
    let prices = crate::lake::current_state(&lake.join("public/prices"), &["symbol", "ts"], &["bid", "ask"])?;
    let mut latest: std::collections::BTreeMap<String, (String, String, String)> = Default::default();
    for row in prices {
        let (symbol, ts, bid, ask) = (row[0].clone(), row[1].clone(), row[2].clone(), row[3].clone());
        if latest.get(&symbol).is_none_or(|(t, _, _)| ts > *t) {
            latest.insert(symbol, (ts, bid, ask));
        }
    }
    println!(
        "\nwhat an analyst sees, read back from the lake (current state: each key's last change, deletes applied):"
    );
    println!("\n  latest price per symbol (prices)");
    println!("  {:<8} {:>14} {:>14}  quoted at", "symbol", "bid", "ask");
    for (symbol, (ts, bid, ask)) in &latest {
        println!("  {symbol:<8} {bid:>14} {ask:>14}  {ts}");
    }
    let trades = crate::lake::current_state(&lake.join("public/trades"), &["id"], &["trader", "side", "quantity"])?;
    let mut positions: std::collections::BTreeMap<String, (i64, u64)> = Default::default();
    for row in trades {
        let quantity: i64 = row[3].parse()?;
        let p = positions.entry(row[1].clone()).or_default();
        p.0 += if row[2] == "B" { quantity } else { -quantity };
        p.1 += 1;
    }
    println!("\n  position per trader (trades)");
    println!("  {:<10} {:>10} {:>7}", "trader", "position", "trades");
    for (trader, (position, count)) in &positions {
        println!("  {trader:<10} {position:>10} {count:>7}");
    }
    let sql = DUCKDB_ANALYST_SQL.replace("{lake}", &lake.display().to_string());
    println!("\nthe same from DuckDB (https://duckdb.org), over the same files:\n\nduckdb -c \"{sql}\"");
    let iceberg = DUCKDB_ICEBERG_SQL.replace("{lake}", &lake.display().to_string());
    println!(
        "\nand from the current-state Iceberg table walshore keeps beside the change log (no replay: one row per key):\n\nduckdb -c \"{iceberg}\""
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
