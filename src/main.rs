//! Command line: parse, load config, init logging, run. Nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use walshore::config::{Config, ConfigError};
use walshore::pipeline::{self, Mode};
use walshore::retry::ErrorChain;

/// `eprintln!` for the command line's own messages: URLs without their secrets.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("{}", walshore::redact::scrub(&format!($($arg)*)))
    };
}

#[derive(Parser)]
#[command(
    name = "walshore",
    version,
    about = "Replicate a PostgreSQL publication into partitioned Parquet on S3, continuously and exactly once.",
    after_help = "--config FILE takes a TOML file (see config.toml), or env:NAME for TOML held by the environment variable NAME."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "walshore=debug".
    #[arg(long, global = true, env = "WALSHORE_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum IcebergAction {
    /// Build a table's Iceberg table again from the whole change log, in one snapshot
    /// that replaces every file it had (readers see the old state until then). Beside
    /// a running walshore, whichever commits second meets a conflict: walshore tries
    /// again the next interval, this command exits 1 (run it again, or stop walshore).
    Rebuild {
        #[arg(long, short)]
        config: PathBuf,
        /// The table, as schema.table.
        #[arg(long)]
        table: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Replicate continuously until SIGINT/SIGTERM; then finish the open flush, commit
    /// it, confirm it to PostgreSQL and exit 0.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Replicate everything committed up to now, commit it, confirm it and exit 0.
    Sync {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Preflight: connectivity, wal_level, privileges, publication, replica identity,
    /// slot, object store. One line per check; exits 1 if any fails.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print JSON: committed LSN, the slot's confirmed_flush_lsn and retained WAL,
    /// rows and last commit time per table.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Copy one table again (new R rows after a T row, at a new snapshot point) while
    /// the other tables keep streaming. Leaves a request in the sink that a running
    /// walshore (or the next run or sync) carries out within snapshot.poll_interval.
    Resnapshot {
        #[arg(long, short)]
        config: PathBuf,
        /// The table, as schema.table.
        #[arg(long)]
        table: String,
        /// Wait until the new copy is committed, then print its snapshot point.
        #[arg(long)]
        wait: bool,
    },
    /// Prove that the lake equals the source: read every published table (or those
    /// named) in a snapshot taken at one point, replay the lake up to exactly that
    /// point, and compare row by row. Works while walshore replicates; takes no lock
    /// beyond a read. Exit 0 equal, 1 differs (or a table could not be compared), 2 usage.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (schema.table); repeat for more. Default: every published table.
        #[arg(long = "table", value_name = "SCHEMA.TABLE")]
        tables: Vec<String>,
        /// Print the values of rows found missing, extra or differing (off by default:
        /// the lake may hold personal data). Keys are always shown.
        #[arg(long)]
        show_values: bool,
        /// Report format on stdout: text, or json for schedulers.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// How long to wait for the lake to reach the verify point (a running walshore
        /// gets there within sink.flush_interval and source.status_interval).
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Keys shown per kind of difference and table.
        #[arg(long, default_value_t = 5)]
        samples: usize,
    },
    /// Exit 0 if the running walshore of this config answers its /healthz (or, with
    /// --ready, /readyz) with 200, else 1: a container health check that needs no shell
    /// or curl. Needs [metrics] listen.
    Health {
        #[arg(long, short)]
        config: PathBuf,
        /// Ask /readyz (replicating and committing) instead of /healthz (alive).
        #[arg(long)]
        ready: bool,
        /// How long to wait for the answer.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// The current-state Iceberg tables ([iceberg]).
    Iceberg {
        #[command(subcommand)]
        action: IcebergAction,
    },
    /// Print Athena SQL for the lake: a CREATE VIEW with the current state of every
    /// replicated table (over its Glue change-log table), and example queries for the
    /// demo's trading schema.
    AthenaSql {
        #[arg(long, short)]
        config: PathBuf,
        /// The Glue database (default: catalog.database).
        #[arg(long)]
        database: Option<String>,
    },
    /// Start a throwaway PostgreSQL, write a few thousand trading changes and replicate
    /// them into DIR/lake with the file sink.
    Demo {
        #[arg(long, default_value = "walshore-demo")]
        dir: PathBuf,
    },
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Every line without a URL's credentials or query (`redact`).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| walshore::redact::Scrubbed(std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        say!("walshore: {e}");
        if matches!(e, ConfigError::Read { .. }) {
            say!("walshore: give an existing file with --config; the repository's config.toml documents every key");
        }
        ExitCode::from(2)
    })
}

fn shutdown_on_signal() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let t = token.clone();
    // Registered before this returns (not in the task): a SIGTERM from here on is a
    // clean stop, never the default action's abrupt exit.
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return token;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        t.cancel();
    });
    token
}

fn main() -> ExitCode {
    tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime")
        .block_on(command())
}

/// glibc's malloc, left to its defaults, keeps what the Iceberg projector frees
/// resident: each thread that allocates gets an arena of its own (up to eight a core,
/// and tokio's blocking pool has many threads), and the size above which an allocation
/// is mapped on its own grows with every large free (up to 32 MiB), so a fold's
/// megabyte Arrow and Parquet buffers land in arenas and stay there, scattered.
/// Measured on the first sync of ten million keys (`cargo bench --bench iceberg --
/// --keys 10000000`): peak RSS 608–710 MiB by default, 302 MiB with two arenas and a
/// fixed 1 MiB threshold, in the same wall time. Set before any thread starts, each
/// unless the operator set it (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`, or the
/// same in `GLIBC_TUNABLES`).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let set = |var: &str, tunable: &str| std::env::var_os(var).is_some() || tunables.contains(tunable);
        // SAFETY: mallopt only sets malloc's parameters; no other thread runs yet.
        unsafe {
            if !set("MALLOC_ARENA_MAX", "malloc.arena_max") {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            if !set("MALLOC_MMAP_THRESHOLD_", "malloc.mmap_threshold") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
            }
        }
    }
}

async fn command() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    match cli.command {
        Command::Run { config } => replicate(&config, Mode::Run).await,
        Command::Sync { config } => replicate(&config, Mode::Sync).await,
        Command::Iceberg {
            action: IcebergAction::Rebuild { config, table },
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let mut projector = match walshore::iceberg::projector::Projector::new(&cfg) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    say!("walshore: the config has no [iceberg] section: there is no Iceberg table to rebuild");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    say!("walshore: {}", ErrorChain(&e));
                    return ExitCode::from(2);
                }
            };
            match projector.rebuild(&table).await {
                Ok(seq) => {
                    println!("rebuilt the Iceberg table of {table} from the change log up to commit record {seq}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say!("walshore: iceberg rebuild {table}: {}", ErrorChain(&e));
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let failures = walshore::preflight::check(&cfg).await;
            if failures == 0 {
                ExitCode::SUCCESS
            } else {
                say!("walshore: {failures} check(s) failed");
                ExitCode::from(1)
            }
        }
        Command::Status { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match walshore::status::status(&cfg).await {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).expect("json"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say!("walshore: status: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Resnapshot { config, table, wait } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match walshore::resnapshot::resnapshot(&cfg, &table, wait).await {
                Ok(Some(point)) => {
                    println!("{table} copied again at snapshot point {point}");
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    println!("resnapshot of {table} requested");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say!("walshore: resnapshot: {}", ErrorChain(&e));
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::AthenaSql { config, database } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(database) = database.or_else(|| cfg.glue.as_ref().map(|g| g.database.clone())) else {
                say!(
                    "walshore: athena-sql: no Glue database: set [catalog] database (kind = \"glue\") or pass --database"
                );
                return ExitCode::from(2);
            };
            let schemas = match walshore::sink::open_store(&cfg.sink) {
                Ok(store) => walshore::checkpoint::read_schemas(store.as_ref())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match schemas {
                Ok(s) if s.is_empty() => {
                    say!(
                        "walshore: athena-sql: the lake at {} has no tables yet; run walshore first",
                        cfg.sink.url
                    );
                    ExitCode::from(1)
                }
                Ok(s) => {
                    print!("{}", walshore::catalog::athena_sql(&database, &s, &cfg.partitions));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say!("walshore: athena-sql: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Verify {
            config,
            tables,
            show_values,
            format,
            timeout,
            samples,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let opts = walshore::verify::Options {
                tables,
                show_values,
                timeout,
                samples,
            };
            match walshore::verify::verify(&cfg, &opts).await {
                Ok(report) => {
                    match format {
                        ReportFormat::Text => print!("{}", report.text()),
                        ReportFormat::Json => {
                            println!(
                                "{}",
                                serde_json::to_string_pretty(&report).expect("a report serializes")
                            )
                        }
                    }
                    ExitCode::from(report.exit_code())
                }
                Err(e) => {
                    say!("walshore: verify: {}", ErrorChain(&e));
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Health { config, ready, timeout } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(addr) = cfg.metrics.listen else {
                say!(
                    "walshore: health: {} has no [metrics] listen; set it (for example listen = \"127.0.0.1:{}\") and restart walshore",
                    config.display(),
                    walshore::config::DEFAULT_METRICS_PORT
                );
                return ExitCode::from(2);
            };
            let path = if ready { "/readyz" } else { "/healthz" };
            match walshore::telemetry::server::probe(addr, path, timeout).await {
                Ok(body) => {
                    println!("{body}");
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    say!("walshore: health: {why}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo { dir } => match walshore::demo::demo(&dir).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say!("walshore: demo: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

/// How long a stopping walshore goes on delivering notices of what it committed.
const NOTIFY_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

async fn replicate(config: &std::path::Path, mode: Mode) -> ExitCode {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let shutdown = shutdown_on_signal();
    let telemetry = match walshore::telemetry::start(&cfg).await {
        Ok(t) => t,
        Err(e) => {
            say!("walshore: {e}");
            return ExitCode::from(2);
        }
    };
    let notifier = match walshore::notify::start(&cfg).await {
        Ok(n) => n,
        Err(e) => {
            say!("walshore: {e}");
            return ExitCode::from(2);
        }
    };
    // The Iceberg projector: beside the pipeline in `run`; after it in `sync`.
    let mut projector = match walshore::iceberg::projector::Projector::new(&cfg) {
        Ok(p) => p,
        Err(e) => {
            say!("walshore: {}", ErrorChain(&e));
            return ExitCode::from(2);
        }
    };
    let stop_projector = shutdown.child_token();
    let projecting = match (mode, projector.take()) {
        (Mode::Run, Some(p)) => Some(tokio::spawn(p.run(stop_projector.clone()))),
        (_, p) => {
            projector = p;
            None
        }
    };
    let result = pipeline::run(&cfg, mode, shutdown).await;
    let mut projection_failed = false;
    stop_projector.cancel();
    if let Some(task) = projecting {
        let _ = task.await;
    }
    // `sync` returns once the Iceberg tables hold everything it committed.
    if let (Ok(_), Some(p)) = (&result, projector.as_mut()) {
        match p.catch_up().await {
            Ok(seq) => tracing::info!(seq, "Iceberg tables hold the commit log up to this record"),
            Err(e) => {
                tracing::error!(error = %ErrorChain(&e), "Iceberg projection failed");
                say!(
                    "walshore: the change log is committed, but the Iceberg tables could not be brought up to it: {}; the next run or sync catches them up",
                    ErrorChain(&e)
                );
                projection_failed = true;
            }
        }
    }
    if let Some(n) = notifier {
        n.stop(NOTIFY_GRACE).await;
    }
    if let Some(t) = telemetry {
        t.stop().await;
    }
    match result {
        Ok(summary) => {
            tracing::info!(commits = summary.commits, files = summary.files, end_lsn = %summary.end_lsn, "stopped cleanly");
            if projection_failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            tracing::error!(error = %ErrorChain(&e), "stopped");
            say!("walshore: {}", ErrorChain(&e));
            if walshore::retry::io_source(&e).is_some_and(walshore::retry::is_disk_full) {
                say!(
                    "walshore: the disk is full: free space on the volume of sink.url (a file:// lake) or source.spill_dir, or move them to a larger one; nothing uncommitted was kept, and the next start continues from the last commit"
                );
            }
            ExitCode::from(1)
        }
    }
}
