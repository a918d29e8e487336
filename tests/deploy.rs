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
    run_ok(
        Command::new(cluster.bin().join("psql"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &cluster.port.to_string(), "-d", db, "-f"])
            .arg(Path::new(ROOT).join(file)),
        &format!("psql -f {file}"),
    )
    .stdout
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

fn read(file: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// `${NAME}` references in `text`.
fn env_refs(text: &str) -> Vec<String> {
    text.split("${")
        .skip(1)
        .filter_map(|s| s.split_once('}').map(|(name, _)| name.to_owned()))
        .collect()
}

/// The Dockerfile's `INSTRUCTION [ ... ]` argument as a JSON array (exec form).
fn exec_form(dockerfile: &str, instruction: &str) -> Vec<String> {
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with(instruction))
        .unwrap_or_else(|| panic!("the Dockerfile has no {instruction}"));
    let json = &line[line
        .find('[')
        .unwrap_or_else(|| panic!("{instruction} is not in exec form: {line}"))..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{instruction} {json}: {e}"))
}

#[test]
fn dockerfile_builds_walshore_from_the_repository_and_runs_it_as_non_root() {
    let text = read("Dockerfile");
    let cargo = read("Cargo.toml");
    let rust_version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: a build and a run stage: {froms:?}");
    assert!(
        froms[0].starts_with(&format!("FROM rust:{rust_version}-")),
        "the build stage uses the pinned toolchain {rust_version}: {}",
        froms[0]
    );
    assert!(
        froms[1].contains("distroless/cc") && froms[1].ends_with(":nonroot"),
        "{}",
        froms[1]
    );
    let last_stage = text.split("\nFROM ").last().unwrap();
    assert!(last_stage.contains("\nUSER nonroot\n"), "runs as non-root");
    assert!(
        text.contains("cargo build --release --locked --bin walshore"),
        "release build from Cargo.lock"
    );
    // The release profile the image is built with carries no debug info.
    let release = cargo
        .split("[profile.release]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    assert!(
        release.contains("debug = false") && release.contains("strip = \"debuginfo\""),
        "{release}"
    );
    // Every COPY from the build context names something in the repository.
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                Path::new(ROOT).join(src).exists(),
                "{line}: {src} is not in the repository"
            );
        }
    }
    for ignored in read(".dockerignore").lines() {
        assert!(!["src", "Cargo.toml", "Cargo.lock", "sql", "bench"].contains(&ignored));
    }
    assert_eq!(exec_form(&text, "ENTRYPOINT"), ["/usr/local/bin/walshore"]);
    assert_eq!(
        exec_form(&text, "CMD"),
        ["run", "--config", "/etc/walshore/config.toml"]
    );
    let health = exec_form(&text, "HEALTHCHECK");
    assert_eq!(health[..2], ["/usr/local/bin/walshore", "health"], "{health:?}");
    for secret in ["PASSWORD", "SECRET", "AWS_ACCESS_KEY_ID"] {
        assert!(
            !text.contains(&format!("ENV {secret}")),
            "no secret baked into the image"
        );
    }
}

#[test]
fn compose_file_is_valid_and_mounts_only_files_of_the_repository() {
    run_ok(
        Command::new("docker-compose")
            .args(["-f", "docker-compose.yml", "config", "-q"])
            .current_dir(ROOT),
        "docker-compose config (Debian package docker-compose; scripts/test installs it)",
    );
    let services = python_json("compose_services.py", &[format!("{ROOT}/docker-compose.yml")]);
    let services = services.as_object().unwrap();
    for name in ["postgres", "moto", "walshore", "load"] {
        assert!(services.contains_key(name), "service {name}");
    }
    for (name, s) in services {
        for v in s["volumes"].as_array().into_iter().flatten() {
            let host = v.as_str().unwrap().split(':').next().unwrap();
            assert!(
                Path::new(host).is_file(),
                "{name} mounts {host}, not a file of the repository"
            );
        }
        if let Some(ctx) = s["build"]["context"].as_str() {
            assert!(Path::new(ctx).join("Dockerfile").is_file(), "{name} builds {ctx}");
        }
        // The metrics endpoint has no authentication, the database a demo password:
        // nothing is published beyond this machine.
        for p in s["ports"].as_array().into_iter().flatten() {
            let p = p.as_str().unwrap_or_default();
            assert!(p.starts_with("127.0.0.1:"), "{name} publishes {p} beyond loopback");
        }
    }
    assert!(
        services["walshore"]["ports"][0]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:9100:")),
        "the metrics port, on loopback"
    );
    let pg = &services["postgres"];
    assert!(pg["command"].to_string().contains("wal_level=logical"), "{pg}");
    let init: Vec<String> = pg["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert!(init.iter().any(|v| v.contains("sql/trading.sql")) && init.iter().any(|v| v.contains("sql/setup.sql")));

    let w = &services["walshore"];
    assert_eq!(
        w["command"],
        serde_json::json!(exec_form(&read("Dockerfile"), "CMD")),
        "the image's default command"
    );
    assert!(
        w["volumes"][0]
            .as_str()
            .unwrap()
            .ends_with("ops/compose/walshore.toml:/etc/walshore/config.toml:ro")
    );
    // Every ${VAR} of the config is set for the container (or walshore would stop on it).
    for var in env_refs(&read("ops/compose/walshore.toml")) {
        assert!(
            w["environment"].get(&var).is_some(),
            "walshore's environment lacks {var}"
        );
    }
    let load = services["load"]["command"].to_string();
    assert!(
        load.contains("pgbench") && load.contains("-f /ops/trading.pgbench") && load.contains("-R 20"),
        "{load}"
    );
}

/// What docker-compose.yml runs, run here without Docker: the schema and setup SQL, the
/// pgbench trading script, walshore with the compose config against PostgreSQL and moto,
/// the image's health check, and the analyst's DuckDB queries, whose answers must be
/// PostgreSQL's.
#[tokio::test]
async fn compose_config_load_health_check_and_analyst_queries_work_outside_docker() {
    set_fake_aws_env();
    let cluster = cluster(&[]);
    let admin = cluster.connect("postgres").await.unwrap();
    admin.batch_execute("CREATE DATABASE trading").await.unwrap();
    psql(&cluster, "trading", "sql/trading.sql");
    psql(&cluster, "trading", "sql/setup.sql");
    let moto = Moto::start("lake");
    // The addresses and secret compose gives the container, here given to this process
    // (so that its children and its own reading of the config see them).
    let metrics_port = free_port();
    for (name, value) in [
        ("PGHOST", "127.0.0.1".to_owned()),
        ("PGPORT", cluster.port.to_string()),
        ("PGPASSWORD", "change-me".to_owned()),
        ("S3_ENDPOINT", moto.endpoint()),
        ("METRICS_LISTEN", format!("127.0.0.1:{metrics_port}")),
    ] {
        unsafe { std::env::set_var(name, value) };
    }
    let config = format!("{ROOT}/ops/compose/walshore.toml");
    let child = spawn_run(Path::new(&config));
    let _log = LogOnPanic::new(&child);

    run_ok(
        Command::new(cluster.bin().join("pgbench"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &cluster.port.to_string()])
            .args([
                "-n",
                "-c",
                "2",
                "-t",
                "150",
                "-f",
                &format!("{ROOT}/ops/trading.pgbench"),
                "trading",
            ]),
        "pgbench",
    );
    let db = cluster.connect("trading").await.unwrap();
    let store = open_lake(Path::new(&config));
    wait_until(std::time::Duration::from_secs(120), "300 trades in the lake", || {
        let store = store.clone();
        async move { read_table(&store, "public", "trades").await.rows.len() == 300 }
    })
    .await;

    // The image's health check, as Docker runs it, against this walshore.
    let health = exec_form(&read("Dockerfile"), "HEALTHCHECK");
    let run_health = || {
        let args: Vec<String> = health[1..]
            .iter()
            .map(|a| a.replace("/etc/walshore/config.toml", &config))
            .collect();
        Command::new(BIN).args(&args).output().unwrap()
    };
    let up = run_health();
    assert!(up.status.success(), "health: {}", String::from_utf8_lossy(&up.stderr));

    // The analyst's queries over S3 answer what PostgreSQL answers.
    let lake_rows: serde_json::Value = python_json(
        "duckdb_sql.py",
        &[
            format!("{ROOT}/ops/compose/analyst.sql"),
            "localhost:5000".to_owned(),
            moto.endpoint().trim_start_matches("http://").to_owned(),
        ],
    );
    let latest_prices = source_rows(
        &db,
        "SELECT symbol, (array_agg(bid ORDER BY ts DESC))[1]::text, (array_agg(ask ORDER BY ts DESC))[1]::text,
                to_char(max(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM prices GROUP BY symbol ORDER BY symbol",
    )
    .await;
    let positions = source_rows(
        &db,
        "SELECT trader, sum(CASE side WHEN 'B' THEN quantity ELSE -quantity END)::text, count(*)::text
         FROM trades GROUP BY trader ORDER BY trader",
    )
    .await;
    let as_json = |rows: Vec<Vec<Option<String>>>| serde_json::json!(rows);
    assert_eq!(lake_rows[1], as_json(positions), "position per trader");
    let lake_prices: Vec<Vec<Option<String>>> = serde_json::from_value(lake_rows[0].clone()).unwrap();
    let norm = |rows: &[Vec<Option<String>>]| -> Vec<(String, f64, f64, String)> {
        rows.iter()
            .map(|r| {
                let ts = r[3].clone().unwrap();
                (
                    r[0].clone().unwrap(),
                    r[1].as_ref().unwrap().parse().unwrap(),
                    r[2].as_ref().unwrap().parse().unwrap(),
                    ts[..19].to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(norm(&lake_prices), norm(&latest_prices), "latest price per symbol");

    let (status, stderr) = support::stop(child);
    assert!(status.success(), "{stderr}");
    let down = run_health();
    assert_eq!(down.status.code(), Some(1), "health of a stopped walshore");
}

/// Runs `program args` in ops/cdk and returns all it printed.
fn in_cdk(program: &str, args: &[&str]) -> String {
    let dir = Path::new(ROOT).join("ops/cdk");
    assert!(
        dir.join("node_modules/aws-cdk-lib").is_dir(),
        "ops/cdk has no node_modules: run scripts/test (it runs npm ci there)"
    );
    let out = run_ok(
        Command::new(program).args(args).current_dir(&dir),
        &format!("{program} {args:?} in ops/cdk (Node with npm is needed)"),
    );
    out.stdout + &out.stderr
}

/// The CDK app synthesizes offline (no lookups, no account) without warnings, and its
/// assertion tests (ops/cdk/test, Node's test runner) pass.
#[test]
fn cdk_app_synthesizes_offline_and_its_assertion_tests_pass() {
    let out = in_cdk("npm", &["test"]);
    assert!(out.contains("# fail 0") && !out.contains("# pass 0"), "{out}");
    let outdir = tempfile::tempdir().unwrap();
    let out = in_cdk(
        "npx",
        &["cdk", "synth", "--quiet", "--output", outdir.path().to_str().unwrap()],
    );
    assert!(
        !out.contains("WARNING") && !out.contains("[Warning]"),
        "cdk synth warns:\n{out}"
    );
    let template: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(outdir.path().join("Walshore.template.json")).unwrap()).unwrap();
    let types: std::collections::BTreeSet<&str> = template["Resources"]
        .as_object()
        .unwrap()
        .values()
        .map(|r| r["Type"].as_str().unwrap())
        .collect();
    for t in [
        "AWS::ECS::Service",
        "AWS::S3::Bucket",
        "AWS::KMS::Key",
        "AWS::Glue::Database",
        "AWS::Athena::WorkGroup",
        "AWS::CloudWatch::Alarm",
    ] {
        assert!(types.contains(t), "the synthesized template has no {t}: {types:?}");
    }
    // The image asset is the repository's Dockerfile, with .dockerignore applied.
    let assets = std::fs::read_to_string(outdir.path().join("Walshore.assets.json")).unwrap();
    let assets: serde_json::Value = serde_json::from_str(&assets).unwrap();
    let image = assets["dockerImages"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .expect("an image asset");
    let dir = outdir.path().join(image["source"]["directory"].as_str().unwrap());
    assert!(dir.join("Dockerfile").is_file() && dir.join("src/main.rs").is_file());
    assert!(!dir.join("target").exists(), "the build context leaves out target/");
}

/// `walshore demo` ends with what an analyst sees: the latest price per symbol and the
/// position per trader, replayed from the lake; the DuckDB command it prints answers the
/// same over the same files.
#[test]
fn demo_ends_with_the_analyst_view_and_the_duckdb_command_that_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = run_ok(
        Command::new(BIN)
            .arg("demo")
            .current_dir(dir.path())
            .env("WALSHORE_LOG", "warn"),
        "walshore demo",
    )
    .stdout;
    let section = |title: &str| -> Vec<Vec<String>> {
        stdout
            .split(title)
            .nth(1)
            .unwrap_or_else(|| panic!("no {title:?} in:\n{stdout}"))
            .lines()
            .skip(2)
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    };
    let prices = section("latest price per symbol (prices)");
    let positions = section("position per trader (trades)");
    assert_eq!(prices.len(), 5, "{prices:?}");
    assert_eq!(positions.len(), 17, "{positions:?}");
    let trades: u64 = positions.iter().map(|p| p[2].parse::<u64>().unwrap()).sum();
    assert_eq!(trades, 2000 - 20, "2000 trades, every hundredth deleted");

    let sql = stdout
        .split("duckdb -c \"")
        .nth(1)
        .and_then(|s| s.split("\"\n").next())
        .expect("a duckdb command");
    let file = dir.path().join("analyst.sql");
    std::fs::write(&file, sql).unwrap();
    let duck = python_json("duckdb_sql.py", &[file]);
    let duck: Vec<Vec<Vec<String>>> = serde_json::from_value(duck).unwrap();
    let num = |s: &str| s.parse::<f64>().unwrap();
    assert_eq!(duck[0].len(), prices.len());
    for (d, p) in duck[0].iter().zip(&prices) {
        assert_eq!(d[0], p[0]);
        assert_eq!((num(&d[1]), num(&d[2])), (num(&p[1]), num(&p[2])), "{d:?} {p:?}");
        assert_eq!(d[3][..19].replace(' ', "T"), p[3][..19], "{d:?} {p:?}");
    }
    assert_eq!(duck[1], positions, "position per trader");

    // The Iceberg table of trades, read by DuckDB's iceberg extension, agrees too.
    let sql = stdout
        .split("duckdb -c \"")
        .nth(2)
        .and_then(|s| s.split("\"\n").next())
        .expect("a duckdb command over the Iceberg table");
    let file = dir.path().join("iceberg.sql");
    std::fs::write(&file, sql).unwrap();
    let duck: Vec<Vec<Vec<String>>> = serde_json::from_value(python_json("duckdb_sql.py", &[file])).unwrap();
    assert_eq!(duck[0], positions, "position per trader from the Iceberg table");

    // sql/athena/trading.sql is this lake's generated Athena SQL, not a hand-kept copy.
    let generated = run_ok(
        Command::new(BIN)
            .args([
                "athena-sql",
                "--config",
                "walshore-demo/config.toml",
                "--database",
                "trading_cdc",
            ])
            .current_dir(dir.path()),
        "walshore athena-sql",
    );
    let kept = read("sql/athena/trading.sql");
    let body = kept.split_once("\n\n").expect("a header, a blank line, the SQL").1;
    assert!(
        body == generated.stdout,
        "sql/athena/trading.sql differs from `walshore athena-sql` over the demo's lake: regenerate it (its header says how)"
    );
}
