//! `config.toml`: a raw serde struct (unknown keys refused), expanded `${ENV_VAR}`s, then
//! validated into [`Config`]. Validation is pure and every error names the field path.
//! Every key is documented in the repository's `config.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod conn;
pub use conn::{Auth, ConnParams, SslMode, percent_encode};

/// Upper bound on commit -> visible: 5 s keeps Athena "near-real-time" while a busy
/// table still gets files of useful size.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Row data buffered before a flush is forced: with encoding and upload overlapping,
/// about three times this is resident, well under the 256 MiB budget.
pub const DEFAULT_MAX_BUFFER_BYTES: u64 = 32 << 20;
/// Streamed in-progress transactions held in memory before spilling to disk.
pub const DEFAULT_STREAM_MEMORY_BYTES: u64 = 32 << 20;
/// Disk a spill may take before walshore stops with a clear error.
pub const DEFAULT_SPILL_MAX_BYTES: u64 = 64 << 30;
/// Athena reads row groups in parallel; ~128 Mi rows is far above what a flush holds, so
/// in practice one flush is one row group per file.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 1 << 20;
/// Copy connections: two keep a 2-core database busy without starving its other work.
pub const DEFAULT_SNAPSHOT_PARALLELISM: usize = 2;
/// Heap bytes per chunk of a table's copy (a ctid range): the unit a copy connection
/// takes at a time, so one large table is copied by all connections at once.
pub const DEFAULT_SNAPSHOT_CHUNK_BYTES: u64 = 32 << 20;
/// How often a running pipeline looks for tables to copy: tables added to the
/// publication and `walshore resnapshot` requests.
pub const DEFAULT_SNAPSHOT_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// How often the slot hears our committed position even when nothing changes:
/// well below PostgreSQL's default wal_sender_timeout (60 s).
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Silence from PostgreSQL after which the replication connection counts as lost:
/// walshore asks for a reply every status interval, so a live server always answers.
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Files above this size are uploaded in parts of this size.
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;
/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Longest time one object-store request may take (each try; the store retries).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Commit records are kept one by one this long, then only in checkpoints: a week
/// covers a reader that follows the log and was down over a long weekend.
pub const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("{field}: environment variable {var} is not set")]
    Env { field: String, var: String },
}

/// `source.auth`, `source.region` and `source.iam_token_lifetime`, checked against the URL.
fn source_auth(raw: &RawSource, conn: &ConnParams) -> Result<Auth, ConfigError> {
    match raw.auth.as_deref().unwrap_or("password") {
        "password" => {
            if raw.region.is_some() || raw.iam_token_lifetime.is_some() {
                return Err(invalid(
                    "source.region",
                    "source.region and source.iam_token_lifetime are for source.auth = \"iam\"; set it or remove them",
                ));
            }
            Ok(Auth::Password)
        }
        "iam" => {
            // A token is a password for any new login until it expires: only a server
            // whose certificate and name were checked may see it.
            if conn.sslmode != SslMode::VerifyFull {
                return Err(invalid(
                    "source.url",
                    "source.auth = \"iam\" sends a token that logs in as this user until it expires, so it \
                     goes only to a server whose certificate and host name are verified: add \
                     sslmode=verify-full&sslrootcert=/etc/walshore/rds-global-bundle.pem to source.url (the \
                     RDS CA bundle; the container image has it at that path)",
                ));
            }
            // PGPASSWORD may be set for other tools; a password written for walshore is a mistake.
            if conn.password.is_some() && conn.password != std::env::var("PGPASSWORD").ok() {
                return Err(invalid(
                    "source.auth",
                    "\"iam\" signs a token for each connection, so a password is not used: remove it from \
                     source.url and source.password",
                ));
            }
            let token_lifetime = duration(
                "source.iam_token_lifetime",
                raw.iam_token_lifetime.clone(),
                crate::source::iam::MAX_TOKEN_LIFETIME,
            )?;
            if token_lifetime > crate::source::iam::MAX_TOKEN_LIFETIME || token_lifetime.is_zero() {
                return Err(invalid(
                    "source.iam_token_lifetime",
                    "RDS accepts tokens of at most 15m; leave it out for 15m",
                ));
            }
            Ok(Auth::Iam {
                region: raw.region.clone(),
                token_lifetime,
            })
        }
        other => Err(invalid(
            "source.auth",
            format!("{other:?} is not one of \"password\" or \"iam\" (IAM database authentication on RDS or Aurora)"),
        )),
    }
}

/// An AWS-compatible endpoint: `http(s)://host[:port][/path]`. Credentials come from the
/// AWS chain and requests are signed, so user info or a query in it is a mistake, and
/// one the SDKs would log: refused, without repeating the value.
fn endpoint(field: &'static str, value: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(value).map_err(|err| invalid(field, format!("{err}; expected http(s)://host:port")))?;
    if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
        return Err(invalid(field, "expected http(s)://host:port"));
    }
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            field,
            "an endpoint takes no user, password or query (credentials come from the AWS chain); give only http(s)://host:port",
        ));
    }
    Ok(())
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: RawSource,
    sink: RawSink,
    #[serde(default)]
    snapshot: RawSnapshot,
    #[serde(default)]
    catalog: RawCatalog,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    notify: RawNotify,
    iceberg: Option<RawIceberg>,
    compaction: Option<RawCompaction>,
    /// `default` and `"schema.table"` keys: how files are partitioned.
    #[serde(default)]
    partitions: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: String,
    password: Option<String>,
    auth: Option<String>,
    region: Option<String>,
    iam_token_lifetime: Option<String>,
    publication: String,
    slot: String,
    spill_dir: Option<PathBuf>,
    stream_memory: Option<String>,
    spill_max_bytes: Option<String>,
    status_interval: Option<String>,
    receive_timeout: Option<String>,
    allow_cleartext_password: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    url: String,
    endpoint: Option<String>,
    region: Option<String>,
    flush_interval: Option<String>,
    max_buffer: Option<String>,
    compression: Option<String>,
    row_group_rows: Option<usize>,
    unrepresentable: Option<String>,
    request_timeout: Option<String>,
    part_size: Option<String>,
    log_retention: Option<String>,
    sse: Option<String>,
    kms_key_id: Option<String>,
    bucket_key: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSnapshot {
    mode: Option<String>,
    parallelism: Option<usize>,
    chunk_size: Option<String>,
    poll_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    kind: Option<String>,
    create_views: Option<bool>,
    partition_projection: Option<bool>,
    database: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub conn: ConnParams,
    pub publication: String,
    pub slot: String,
    pub spill_dir: PathBuf,
    pub stream_memory_bytes: usize,
    pub spill_max_bytes: u64,
    pub status_interval: Duration,
    pub receive_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Snappy,
    None,
}

#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub url: url::Url,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub flush_interval: Duration,
    pub max_buffer_bytes: usize,
    pub compression: Compression,
    pub row_group_rows: usize,
    pub unrepresentable: Unrepresentable,
    pub request_timeout: Duration,
    /// Files larger than this are uploaded in parts of this size (multipart).
    pub part_size: usize,
    /// Commit records older than this are pruned once folded into a checkpoint.
    pub log_retention: Duration,
    /// Server-side encryption asked for on every object walshore writes (S3 only).
    pub sse: Option<Sse>,
}

/// `sink.sse`: how S3 encrypts what walshore writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sse {
    /// `"AES256"`: S3-managed keys (SSE-S3).
    S3,
    /// `"aws:kms"`: a KMS key (SSE-KMS): `kms_key_id` (key id, ARN or alias; the
    /// account's `aws/s3` key when absent), with S3 bucket keys unless `bucket_key = false`.
    Kms { key_id: Option<String>, bucket_key: bool },
}

impl SinkConfig {
    /// `url` with a trailing slash: table folders (`{root}{schema}/{table}/`) are below it.
    pub fn root(&self) -> String {
        let mut root = self.url.to_string();
        if !root.ends_with('/') {
            root.push('/');
        }
        root
    }
}

/// How a table's files are partitioned (the path segments below the table's folder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionBy {
    /// `dt=YYYY-MM-DD` of the commit time in UTC (the default).
    CommitDate,
    /// `dt=YYYY-MM-DD/hour=HH` of the commit time in UTC.
    CommitHour,
    /// `{column}={value}`, the value in PostgreSQL's text form, Hive-escaped.
    Column(String),
}

/// `[partitions]`: a default and per-table choices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partitions {
    pub default: PartitionBy,
    /// By `schema.table`.
    pub tables: std::collections::BTreeMap<String, PartitionBy>,
}

impl Default for Partitions {
    fn default() -> Partitions {
        Partitions {
            default: PartitionBy::CommitDate,
            tables: Default::default(),
        }
    }
}

impl Partitions {
    pub fn of(&self, table: &str) -> &PartitionBy {
        self.tables.get(table).unwrap_or(&self.default)
    }
}

fn partition_by(key: &str, v: &str) -> Result<PartitionBy, ConfigError> {
    match v {
        "commit_date" => Ok(PartitionBy::CommitDate),
        "commit_hour" => Ok(PartitionBy::CommitHour),
        other => match other.strip_prefix("column:") {
            Some(c) if !c.is_empty() => Ok(PartitionBy::Column(c.to_owned())),
            _ => Err(invalid(
                "partitions",
                format!("{key} = {other:?} is not one of commit_date, commit_hour, column:NAME"),
            )),
        },
    }
}

/// What to do with a value PostgreSQL holds and the column's Parquet type cannot:
/// ±infinity in a date, timestamp or numeric(p,s) column, NaN in numeric(p,s).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unrepresentable {
    /// Stop with table, column, LSN and value.
    #[default]
    Error,
    /// Write null and name the column in the row's `_unrepresented`.
    Null,
    /// Write the nearest value the type holds (0001-01-01 / 9999-12-31 for dates and
    /// timestamps, ±99…9 for numeric(p,s); NaN becomes null) and name the column in
    /// `_unrepresented`.
    Clamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMode {
    Initial,
    Never,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    ready_within: Option<String>,
    stuck_after: Option<String>,
    slot_interval: Option<String>,
    emf: Option<bool>,
    emf_interval: Option<String>,
    emf_namespace: Option<String>,
}

/// The port `[metrics] listen` suggests: clear of Prometheus (9090), node_exporter
/// (9100) and postgres_exporter (9187).
pub const DEFAULT_METRICS_PORT: u16 = 9753;
/// Changes received and not committed for longer than this make `/readyz` fail.
pub const DEFAULT_READY_WITHIN: Duration = Duration::from_secs(120);
/// A stage inside one unit of work for longer than this makes `/healthz` fail: above
/// every bounded wait inside a commit (S3 retries, a busy Glue's 5 minutes).
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(600);
/// How often the slot is sampled for the slot gauges.
pub const DEFAULT_SLOT_INTERVAL: Duration = Duration::from_secs(30);
/// How often an EMF line is written.
pub const DEFAULT_EMF_INTERVAL: Duration = Duration::from_secs(60);

/// `[metrics]`: off unless `listen` or `emf` is set.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// `/metrics`, `/healthz`, `/readyz` on this address.
    pub listen: Option<std::net::SocketAddr>,
    pub ready_within: Duration,
    pub stuck_after: Duration,
    pub slot_interval: Duration,
    /// CloudWatch Embedded Metric Format lines on stdout.
    pub emf: bool,
    pub emf_interval: Duration,
    pub emf_namespace: String,
}

impl MetricsConfig {
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || self.emf
    }
}

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            listen: None,
            ready_within: DEFAULT_READY_WITHIN,
            stuck_after: DEFAULT_STUCK_AFTER,
            slot_interval: DEFAULT_SLOT_INTERVAL,
            emf: false,
            emf_interval: DEFAULT_EMF_INTERVAL,
            emf_namespace: "walshore".into(),
        }
    }
}

fn metrics_config(raw: RawMetrics) -> Result<MetricsConfig, ConfigError> {
    let listen = match raw.listen {
        None => None,
        Some(s) => {
            let s = s.trim();
            // A bare port is a port on loopback.
            let parsed = match s.parse::<u16>() {
                Ok(port) => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
                Err(_) => s.parse::<std::net::SocketAddr>(),
            };
            Some(parsed.map_err(|_| {
                invalid(
                    "metrics.listen",
                    format!(
                        "{s:?} is not an address such as \"127.0.0.1:{DEFAULT_METRICS_PORT}\" (or a port, on loopback)"
                    ),
                )
            })?)
        }
    };
    let namespace = raw.emf_namespace.unwrap_or_else(|| "walshore".into());
    if namespace.is_empty() || namespace.len() > 255 {
        return Err(invalid("metrics.emf_namespace", "must be 1 to 255 characters"));
    }
    Ok(MetricsConfig {
        listen,
        ready_within: duration("metrics.ready_within", raw.ready_within, DEFAULT_READY_WITHIN)?,
        stuck_after: duration("metrics.stuck_after", raw.stuck_after, DEFAULT_STUCK_AFTER)?,
        slot_interval: duration("metrics.slot_interval", raw.slot_interval, DEFAULT_SLOT_INTERVAL)?,
        emf: raw.emf.unwrap_or(false),
        emf_interval: duration("metrics.emf_interval", raw.emf_interval, DEFAULT_EMF_INTERVAL)?,
        emf_namespace: namespace,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIceberg {
    tables: Option<Vec<String>>,
    commit_interval: Option<String>,
    buckets: Option<u32>,
    max_fold: Option<String>,
    index_memory: Option<String>,
    snapshot_retention: Option<String>,
    max_snapshots: Option<usize>,
}

/// One Iceberg snapshot per table per this interval, at most.
pub const DEFAULT_ICEBERG_COMMIT_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_ICEBERG_BUCKETS: u32 = 16;
/// Change-log bytes folded into one snapshot at most (and rows, at 256 bytes each).
pub const DEFAULT_ICEBERG_MAX_FOLD: u64 = 64 << 20;
/// Memory the key indexes of all tables hold at most (24 bytes a live row).
pub const DEFAULT_ICEBERG_INDEX_MEMORY: u64 = 128 << 20;
/// Snapshots (and files only they reach) are kept this long.
pub const DEFAULT_ICEBERG_SNAPSHOT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Snapshots a table keeps at most, however young: each is some 900 bytes of the
/// metadata JSON that every commit rewrites and every reader parses.
pub const DEFAULT_ICEBERG_MAX_SNAPSHOTS: usize = 1000;

/// `[iceberg]`: current-state Apache Iceberg tables, kept by walshore beside the change
/// log (under `{sink.url}/_iceberg/{schema}/{table}/`).
#[derive(Clone, Debug)]
pub struct IcebergConfig {
    /// `schema.table` names, or `*` for every table.
    pub tables: Vec<String>,
    pub commit_interval: Duration,
    /// The partition spec: `bucket[buckets]` of the first key column.
    pub buckets: u32,
    /// Change-log bytes (Parquet, as stored) folded into one snapshot at most, and
    /// rows at 256 bytes each: a backlog or a rebuild becomes several snapshots.
    pub max_fold: u64,
    /// Memory the key indexes of all tables (where each live row is) hold at most,
    /// together, 24 bytes a row: buckets beyond it are looked up from their files when
    /// an interval touches them.
    pub index_memory: u64,
    /// Snapshots older than this expire (never the current one); files no retained
    /// snapshot reaches are deleted once this old.
    pub snapshot_retention: Duration,
    /// Snapshots beyond the newest this many expire too, however young.
    pub max_snapshots: usize,
}

impl IcebergConfig {
    pub fn covers(&self, table: &str) -> bool {
        self.tables.iter().any(|t| t == "*" || t == table)
    }
}

fn iceberg_config(raw: RawIceberg) -> Result<IcebergConfig, ConfigError> {
    let tables = raw.tables.unwrap_or_else(|| vec!["*".into()]);
    if tables.is_empty() {
        return Err(invalid(
            "iceberg.tables",
            "is empty: list \"schema.table\" names, or [\"*\"] for every table (or remove [iceberg])",
        ));
    }
    for t in &tables {
        if t != "*" && t.split('.').filter(|p| !p.is_empty()).count() != 2 {
            return Err(invalid(
                "iceberg.tables",
                format!("{t:?} is neither \"*\" nor a \"schema.table\" name"),
            ));
        }
    }
    let buckets = raw.buckets.unwrap_or(DEFAULT_ICEBERG_BUCKETS);
    if !(1..=1024).contains(&buckets) {
        return Err(invalid("iceberg.buckets", "must be between 1 and 1024"));
    }
    let max_snapshots = raw.max_snapshots.unwrap_or(DEFAULT_ICEBERG_MAX_SNAPSHOTS);
    if max_snapshots == 0 {
        return Err(invalid(
            "iceberg.max_snapshots",
            "must be at least 1 (the current snapshot is always kept)",
        ));
    }
    Ok(IcebergConfig {
        tables,
        commit_interval: duration(
            "iceberg.commit_interval",
            raw.commit_interval,
            DEFAULT_ICEBERG_COMMIT_INTERVAL,
        )?,
        buckets,
        max_fold: size("iceberg.max_fold", raw.max_fold, DEFAULT_ICEBERG_MAX_FOLD)?,
        index_memory: size("iceberg.index_memory", raw.index_memory, DEFAULT_ICEBERG_INDEX_MEMORY)?,
        snapshot_retention: duration(
            "iceberg.snapshot_retention",
            raw.snapshot_retention,
            DEFAULT_ICEBERG_SNAPSHOT_RETENTION,
        )?,
        max_snapshots,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCompaction {
    grace: Option<String>,
    target_file_size: Option<String>,
    delete_after: Option<String>,
    max_rewrite: Option<String>,
}

/// A partition is closed once nothing was committed to it for this long (and, for
/// `commit_date`/`commit_hour`, once the stream has passed its day or hour by as much).
pub const DEFAULT_COMPACTION_GRACE: Duration = Duration::from_secs(3600);
pub const DEFAULT_COMPACTION_TARGET_FILE_SIZE: u64 = 256_000_000;
/// Replaced files stay this long after the swap: longer than Athena's 30-minute default
/// query timeout.
pub const DEFAULT_COMPACTION_DELETE_AFTER: Duration = Duration::from_secs(3600);
/// Bytes rewritten per housekeeping pass at most.
pub const DEFAULT_COMPACTION_MAX_REWRITE: u64 = 1_000_000_000;

/// `[compaction]`: rewriting closed change-log partitions into fewer files.
#[derive(Clone, Debug)]
pub struct CompactionConfig {
    pub grace: Duration,
    pub target_file_size: u64,
    pub delete_after: Duration,
    pub max_rewrite: u64,
}

fn compaction_config(raw: RawCompaction) -> Result<CompactionConfig, ConfigError> {
    let target_file_size = size(
        "compaction.target_file_size",
        raw.target_file_size,
        DEFAULT_COMPACTION_TARGET_FILE_SIZE,
    )?;
    if target_file_size < 1 << 20 {
        return Err(invalid("compaction.target_file_size", "must be at least 1MiB"));
    }
    Ok(CompactionConfig {
        grace: duration("compaction.grace", raw.grace, DEFAULT_COMPACTION_GRACE)?,
        target_file_size,
        delete_after: duration(
            "compaction.delete_after",
            raw.delete_after,
            DEFAULT_COMPACTION_DELETE_AFTER,
        )?,
        max_rewrite: size(
            "compaction.max_rewrite",
            raw.max_rewrite,
            DEFAULT_COMPACTION_MAX_REWRITE,
        )?,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    webhook: Option<String>,
    webhook_secret: Option<String>,
    sns_topic_arn: Option<String>,
    sns_endpoint: Option<String>,
    queue: Option<usize>,
    timeout: Option<String>,
}

/// Notices buffered for a target that is behind before it reads them from the log.
pub const DEFAULT_NOTIFY_QUEUE: usize = 1024;
/// One request to a notification target.
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// `[notify]`: new-data notifications, off unless a target is set.
#[derive(Clone)]
pub struct NotifyConfig {
    /// POST each notice here (http or https).
    pub webhook: Option<url::Url>,
    /// HMAC-SHA256 key: each POST carries `X-Walshore-Signature: sha256=<hex>` of its body.
    pub webhook_secret: Option<String>,
    /// Publish each notice to this SNS topic (its region is the ARN's).
    pub sns_topic_arn: Option<String>,
    /// An SNS-compatible endpoint (VPC endpoints, tests).
    pub sns_endpoint: Option<String>,
    pub queue: usize,
    pub timeout: Duration,
}

impl NotifyConfig {
    pub fn enabled(&self) -> bool {
        self.webhook.is_some() || self.sns_topic_arn.is_some()
    }
}

impl Default for NotifyConfig {
    fn default() -> NotifyConfig {
        NotifyConfig {
            webhook: None,
            webhook_secret: None,
            sns_topic_arn: None,
            sns_endpoint: None,
            queue: DEFAULT_NOTIFY_QUEUE,
            timeout: DEFAULT_NOTIFY_TIMEOUT,
        }
    }
}

impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("webhook", &self.webhook.as_ref().map(crate::redact::describe_url))
            .field("webhook_secret", &self.webhook_secret.as_ref().map(|_| "…"))
            .field("sns_topic_arn", &self.sns_topic_arn)
            .field("sns_endpoint", &self.sns_endpoint)
            .field("queue", &self.queue)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The region of an SNS topic ARN: `arn:{partition}:sns:{region}:{account}:{name}`.
pub fn sns_region(arn: &str) -> Option<&str> {
    let parts: Vec<&str> = arn.split(':').collect();
    (parts.len() == 6 && parts[0] == "arn" && parts[2] == "sns" && !parts[3].is_empty() && !parts[5].is_empty())
        .then(|| parts[3])
}

fn notify_config(raw: RawNotify) -> Result<NotifyConfig, ConfigError> {
    let webhook = match raw.webhook {
        None => None,
        Some(s) => {
            let u = url::Url::parse(s.trim()).map_err(|e| invalid("notify.webhook", format!("not a URL: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(invalid(
                    "notify.webhook",
                    format!("must be an http:// or https:// URL, not {}://", u.scheme()),
                ));
            }
            Some(u)
        }
    };
    if raw.webhook_secret.is_some() && webhook.is_none() {
        return Err(invalid(
            "notify.webhook_secret",
            "signs webhook requests: set notify.webhook too",
        ));
    }
    if raw.webhook_secret.as_ref().is_some_and(|s| s.is_empty()) {
        return Err(invalid("notify.webhook_secret", "must not be empty"));
    }
    if let Some(arn) = &raw.sns_topic_arn
        && sns_region(arn).is_none()
    {
        return Err(invalid(
            "notify.sns_topic_arn",
            format!("{arn:?} is not a topic ARN such as \"arn:aws:sns:eu-west-1:123456789012:new-data\""),
        ));
    }
    if raw.sns_endpoint.is_some() && raw.sns_topic_arn.is_none() {
        return Err(invalid("notify.sns_endpoint", "set notify.sns_topic_arn too"));
    }
    if let Some(e) = &raw.sns_endpoint {
        endpoint("notify.sns_endpoint", e)?;
    }
    let queue = raw.queue.unwrap_or(DEFAULT_NOTIFY_QUEUE);
    if !(1..=1 << 20).contains(&queue) {
        return Err(invalid("notify.queue", "must be between 1 and 1048576 notices"));
    }
    Ok(NotifyConfig {
        webhook,
        webhook_secret: raw.webhook_secret,
        sns_topic_arn: raw.sns_topic_arn,
        sns_endpoint: raw.sns_endpoint,
        queue,
        timeout: duration("notify.timeout", raw.timeout, DEFAULT_NOTIFY_TIMEOUT)?,
    })
}

#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceConfig,
    pub sink: SinkConfig,
    pub snapshot: SnapshotMode,
    /// Connections copying at once (each takes the next chunk of any table).
    pub snapshot_parallelism: usize,
    /// Heap bytes per chunk (ctid range) of a table's copy.
    pub snapshot_chunk_bytes: u64,
    /// How often to look for tables added to the publication and resnapshot requests.
    pub snapshot_poll_interval: Duration,
    pub partitions: Partitions,
    /// `catalog.kind = "glue"`.
    pub glue: Option<GlueConfig>,
    pub metrics: MetricsConfig,
    pub notify: NotifyConfig,
    /// `[iceberg]`, when present.
    pub iceberg: Option<IcebergConfig>,
    /// `[compaction]`, when present.
    pub compaction: Option<CompactionConfig>,
}

/// `[catalog]` with `kind = "glue"`.
#[derive(Clone, Debug)]
pub struct GlueConfig {
    pub database: String,
    /// A Glue-compatible endpoint (tests: moto).
    pub endpoint: Option<String>,
    /// Default: `sink.region`, then the standard AWS chain.
    pub region: Option<String>,
    /// Keep a current-state view per table in Glue (Athena's view format).
    pub create_views: bool,
    /// Athena partition projection instead of registering partitions.
    pub partition_projection: bool,
}

/// `64MiB`, `1 GB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let mult: u64 = match s[split..].trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" | "kB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn size(field: &'static str, v: Option<String>, default: u64) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => match parse_size(&s) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(invalid(field, format!("{s:?} is not a size such as \"64MiB\""))),
        },
    }
}

fn duration(field: &'static str, v: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => match humantime::parse_duration(&s) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(invalid(
                field,
                format!("{s:?} is not a duration such as \"5s\" or \"500ms\""),
            )),
        },
    }
}

fn identifier(field: &'static str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty() || v.len() > 63 {
        return Err(invalid(field, "must be 1 to 63 characters"));
    }
    Ok(())
}

/// Fields holding a libpq URL: a `${NAME}` inside one is a component of the URL (a user,
/// a password, a database, a host), so its value is percent-encoded and cannot change how
/// the URL parses. A field that is one `${NAME}` and nothing else takes the whole URL.
const URL_FIELDS: &[&str] = &["source.url"];

/// Replaces `${NAME}` in every string value with the environment variable's value.
fn expand_env(value: &mut toml::Value, path: &str) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) => {
            let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            let encode = URL_FIELDS.contains(&path) && !whole;
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                let Some(end) = rest[start..].find('}') else { break };
                let var = &rest[start + 2..start + end];
                let val = std::env::var(var).map_err(|_| ConfigError::Env {
                    field: path.to_owned(),
                    var: var.to_owned(),
                })?;
                out.push_str(&rest[..start]);
                if encode {
                    out.push_str(&percent_encode(&val));
                } else {
                    out.push_str(&val);
                }
                rest = &rest[start + end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                expand_env(v, &p)?;
            }
        }
        toml::Value::Array(a) => {
            for v in a {
                expand_env(v, path)?;
            }
        }
        _ => {}
    }
    Ok(())
}

impl Config {
    /// Reads the config file at `path`, or with `env:NAME` the TOML held by environment
    /// variable NAME (a container with no file to mount: ops/cdk passes it so).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let text = match path.to_str().and_then(|p| p.strip_prefix("env:")) {
            Some(var) => std::env::var(var)
                .map_err(|_| read_err(std::io::Error::other(format!("environment variable {var} is not set"))))?,
            None => std::fs::read_to_string(path).map_err(read_err)?,
        };
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: PathBuf::new(),
            message,
        };
        let mut value: toml::Value = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        expand_env(&mut value, "")?;
        let raw: RawConfig = value
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        Config::try_from(raw)
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        let mut conn = ConnParams::parse(&raw.source.url).map_err(|m| invalid("source.url", m))?;
        if let Some(password) = &raw.source.password {
            conn.password = Some(password.clone());
        }
        conn.auth = source_auth(&raw.source, &conn)?;
        if conn.auth != Auth::Password {
            conn.password = None;
        }
        conn.allow_cleartext = raw.source.allow_cleartext_password.unwrap_or(false);
        identifier("source.publication", &raw.source.publication)?;
        identifier("source.slot", &raw.source.slot)?;
        if !raw
            .source
            .slot
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        {
            return Err(invalid(
                "source.slot",
                "may hold only lower-case letters, digits and underscores (PostgreSQL's rule for slot names)",
            ));
        }
        let source = SourceConfig {
            conn,
            publication: raw.source.publication,
            slot: raw.source.slot,
            spill_dir: raw
                .source
                .spill_dir
                .unwrap_or_else(|| std::env::temp_dir().join("walshore-spill")),
            stream_memory_bytes: size(
                "source.stream_memory",
                raw.source.stream_memory,
                DEFAULT_STREAM_MEMORY_BYTES,
            )? as usize,
            spill_max_bytes: size(
                "source.spill_max_bytes",
                raw.source.spill_max_bytes,
                DEFAULT_SPILL_MAX_BYTES,
            )?,
            status_interval: duration(
                "source.status_interval",
                raw.source.status_interval,
                DEFAULT_STATUS_INTERVAL,
            )?,
            receive_timeout: duration(
                "source.receive_timeout",
                raw.source.receive_timeout,
                DEFAULT_RECEIVE_TIMEOUT,
            )?,
        };
        if source.receive_timeout <= source.status_interval {
            return Err(invalid(
                "source.receive_timeout",
                "must be longer than source.status_interval (walshore asks PostgreSQL for a reply at each status interval)",
            ));
        }

        let url = url::Url::parse(&raw.sink.url)
            .map_err(|e| invalid("sink.url", format!("{e}; expected file:///path or s3://bucket/prefix")))?;
        match url.scheme() {
            "file" => {
                if raw.sink.endpoint.is_some() {
                    return Err(invalid("sink.endpoint", "only applies to s3:// sinks"));
                }
            }
            "s3" => {
                if url.host_str().unwrap_or("").is_empty() {
                    return Err(invalid(
                        "sink.url",
                        "s3:// URL has no bucket; expected s3://bucket/prefix",
                    ));
                }
            }
            other => {
                return Err(invalid(
                    "sink.url",
                    format!("scheme {other:?} is not supported; use file:// or s3://"),
                ));
            }
        }
        if let Some(e) = &raw.sink.endpoint {
            endpoint("sink.endpoint", e)?;
        }
        let compression = match raw.sink.compression.as_deref().unwrap_or("zstd") {
            "zstd" => Compression::Zstd,
            "snappy" => Compression::Snappy,
            "none" => Compression::None,
            other => {
                return Err(invalid(
                    "sink.compression",
                    format!("{other:?} is not one of zstd, snappy, none"),
                ));
            }
        };
        let unrepresentable = match raw.sink.unrepresentable.as_deref().unwrap_or("error") {
            "error" => Unrepresentable::Error,
            "null" => Unrepresentable::Null,
            "clamp" => Unrepresentable::Clamp,
            other => {
                return Err(invalid(
                    "sink.unrepresentable",
                    format!("{other:?} is not one of error, null, clamp"),
                ));
            }
        };
        let sse = match raw.sink.sse.as_deref() {
            None => None,
            Some("AES256") => Some(Sse::S3),
            Some("aws:kms") => Some(Sse::Kms {
                key_id: raw.sink.kms_key_id.clone(),
                bucket_key: raw.sink.bucket_key.unwrap_or(true),
            }),
            Some(other) => {
                return Err(invalid(
                    "sink.sse",
                    format!("{other:?} is not one of \"aws:kms\", \"AES256\""),
                ));
            }
        };
        if raw.sink.kms_key_id.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("sink.kms_key_id", "must not be empty"));
        }
        if !matches!(sse, Some(Sse::Kms { .. })) {
            if raw.sink.kms_key_id.is_some() {
                return Err(invalid("sink.kms_key_id", "needs sink.sse = \"aws:kms\""));
            }
            if raw.sink.bucket_key.is_some() {
                return Err(invalid("sink.bucket_key", "needs sink.sse = \"aws:kms\""));
            }
        }
        if sse.is_some() && url.scheme() == "file" {
            return Err(invalid(
                "sink.sse",
                "is for s3:// lakes; a file:// lake is encrypted by its disk",
            ));
        }
        let row_group_rows = raw.sink.row_group_rows.unwrap_or(DEFAULT_ROW_GROUP_ROWS);
        if row_group_rows == 0 {
            return Err(invalid("sink.row_group_rows", "must be at least 1"));
        }
        let sink = SinkConfig {
            url,
            endpoint: raw.sink.endpoint,
            region: raw.sink.region,
            flush_interval: duration("sink.flush_interval", raw.sink.flush_interval, DEFAULT_FLUSH_INTERVAL)?,
            max_buffer_bytes: size("sink.max_buffer", raw.sink.max_buffer, DEFAULT_MAX_BUFFER_BYTES)? as usize,
            compression,
            row_group_rows,
            unrepresentable,
            request_timeout: duration(
                "sink.request_timeout",
                raw.sink.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            )?,
            part_size: size("sink.part_size", raw.sink.part_size, DEFAULT_PART_SIZE)? as usize,
            log_retention: duration("sink.log_retention", raw.sink.log_retention, DEFAULT_LOG_RETENTION)?,
            sse,
        };
        if sink.part_size < MIN_PART_SIZE as usize {
            return Err(invalid(
                "sink.part_size",
                "must be at least 5MiB (S3's smallest multipart part)",
            ));
        }

        let snapshot = match raw.snapshot.mode.as_deref().unwrap_or("initial") {
            "initial" => SnapshotMode::Initial,
            "never" => SnapshotMode::Never,
            other => {
                return Err(invalid(
                    "snapshot.mode",
                    format!("{other:?} is not one of initial, never"),
                ));
            }
        };
        let mut glue = None;
        match raw.catalog.kind.as_deref().unwrap_or("none") {
            "none" => {
                if raw.catalog.database.is_some()
                    || raw.catalog.endpoint.is_some()
                    || raw.catalog.region.is_some()
                    || raw.catalog.create_views.is_some()
                    || raw.catalog.partition_projection.is_some()
                {
                    return Err(invalid(
                        "catalog",
                        "database, endpoint, region, create_views and partition_projection apply only with kind = \"glue\"",
                    ));
                }
            }
            "glue" => {
                let database = raw
                    .catalog
                    .database
                    .clone()
                    .ok_or_else(|| invalid("catalog.database", "required with kind = \"glue\""))?;
                if database.is_empty()
                    || !database
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    return Err(invalid(
                        "catalog.database",
                        format!(
                            "{database:?}: Glue (and Athena) database names are lower-case letters, digits and underscores"
                        ),
                    ));
                }
                if let Some(e) = &raw.catalog.endpoint {
                    endpoint("catalog.endpoint", e)?;
                }
                glue = Some(GlueConfig {
                    database,
                    endpoint: raw.catalog.endpoint.clone(),
                    region: raw.catalog.region.clone().or_else(|| sink.region.clone()),
                    create_views: raw.catalog.create_views.unwrap_or(false),
                    partition_projection: raw.catalog.partition_projection.unwrap_or(false),
                });
            }
            other => return Err(invalid("catalog.kind", format!("{other:?} is not one of none, glue"))),
        }
        let snapshot_parallelism = raw.snapshot.parallelism.unwrap_or(DEFAULT_SNAPSHOT_PARALLELISM);
        if !(1..=64).contains(&snapshot_parallelism) {
            return Err(invalid("snapshot.parallelism", "must be between 1 and 64"));
        }
        let snapshot_chunk_bytes = size(
            "snapshot.chunk_size",
            raw.snapshot.chunk_size,
            DEFAULT_SNAPSHOT_CHUNK_BYTES,
        )?;
        if snapshot_chunk_bytes < 8192 {
            return Err(invalid("snapshot.chunk_size", "must be at least one page (8kB)"));
        }
        let snapshot_poll_interval = duration(
            "snapshot.poll_interval",
            raw.snapshot.poll_interval,
            DEFAULT_SNAPSHOT_POLL_INTERVAL,
        )?;
        let compaction = raw.compaction.map(compaction_config).transpose()?;
        if compaction.is_some() && glue.as_ref().is_some_and(|g: &GlueConfig| g.partition_projection) {
            return Err(invalid(
                "compaction",
                "cannot be used with catalog.partition_projection: Athena would read a partition's folder as the projection's template names it, and a compacted partition's files are in a folder of their own; remove [compaction] or partition_projection",
            ));
        }
        let mut partitions = Partitions::default();
        for (key, v) in &raw.partitions {
            let by = partition_by(key, v)?;
            if key == "default" {
                if matches!(by, PartitionBy::Column(_)) {
                    return Err(invalid("partitions.default", "must be commit_date or commit_hour"));
                }
                partitions.default = by;
            } else if key.split_once('.').is_some_and(|(s, t)| !s.is_empty() && !t.is_empty()) {
                partitions.tables.insert(key.clone(), by);
            } else {
                return Err(invalid(
                    "partitions",
                    format!("{key:?}: keys are \"default\" or a table as \"schema.table\""),
                ));
            }
        }
        Ok(Config {
            source,
            sink,
            snapshot,
            snapshot_parallelism,
            snapshot_chunk_bytes,
            snapshot_poll_interval,
            partitions,
            glue,
            metrics: metrics_config(raw.metrics)?,
            notify: notify_config(raw.notify)?,
            iceberg: raw.iceberg.map(iceberg_config).transpose()?,
            compaction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [source]
        url = "postgres://rep:secret@db.example:6543/trading?sslmode=require"
        publication = "walshore"
        slot = "walshore"
        [sink]
        url = "s3://lake/cdc"
    "#;

    /// The documented config parses, and its values are the defaults.
    #[test]
    fn the_documented_config_is_valid_and_shows_the_defaults() {
        let text = include_str!("../../config.toml").replace("${PGPASSWORD}", "secret");
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.source.receive_timeout, DEFAULT_RECEIVE_TIMEOUT);
        assert_eq!(c.source.status_interval, DEFAULT_STATUS_INTERVAL);
        assert_eq!(c.sink.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(c.sink.part_size as u64, DEFAULT_PART_SIZE);
        assert_eq!(c.sink.flush_interval, DEFAULT_FLUSH_INTERVAL);
        assert_eq!(c.sink.max_buffer_bytes as u64, DEFAULT_MAX_BUFFER_BYTES);
        assert_eq!(c.sink.log_retention, DEFAULT_LOG_RETENTION);
        assert_eq!(c.metrics.ready_within, DEFAULT_READY_WITHIN);
        assert_eq!(c.metrics.stuck_after, DEFAULT_STUCK_AFTER);
        assert_eq!(c.metrics.slot_interval, DEFAULT_SLOT_INTERVAL);
        assert_eq!(c.metrics.emf_interval, DEFAULT_EMF_INTERVAL);
        assert!(!c.metrics.enabled(), "metrics are off unless asked for");
        assert_eq!(c.notify.queue, DEFAULT_NOTIFY_QUEUE);
        assert_eq!(c.notify.timeout, DEFAULT_NOTIFY_TIMEOUT);
        assert!(!c.notify.enabled(), "notifications are off unless a target is set");
    }

    /// A commented-out section of the repository's `config.toml`, from `# [name]` to the
    /// next commented-out section (or the end), parsed after [`MIN`]: its keys, as
    /// documented (comment lines must not hold ` = `).
    fn documented(name: &str) -> Config {
        let text = include_str!("../../config.toml");
        let start = text
            .find(&format!("# [{name}]"))
            .unwrap_or_else(|| panic!("config.toml documents [{name}]"));
        let section = &text[start..];
        let end = section[1..].find("\n# [").map_or(section.len(), |i| i + 1);
        let uncommented: String = section[..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        Config::parse(&format!("{MIN}\n{uncommented}")).unwrap()
    }

    /// The documented `[iceberg]` section, uncommented, parses to the defaults; bad
    /// values are named.
    #[test]
    fn the_documented_iceberg_section_shows_the_defaults() {
        let c = documented("iceberg");
        let i = c.iceberg.expect("[iceberg] present");
        assert_eq!(i.tables, vec!["*".to_owned()]);
        assert_eq!(i.commit_interval, DEFAULT_ICEBERG_COMMIT_INTERVAL);
        assert_eq!(i.buckets, DEFAULT_ICEBERG_BUCKETS);
        assert_eq!(i.max_fold, DEFAULT_ICEBERG_MAX_FOLD);
        assert_eq!(i.index_memory, DEFAULT_ICEBERG_INDEX_MEMORY);
        assert_eq!(i.snapshot_retention, DEFAULT_ICEBERG_SNAPSHOT_RETENTION);
        assert_eq!(i.max_snapshots, DEFAULT_ICEBERG_MAX_SNAPSHOTS);
        assert!(Config::parse(MIN).unwrap().iceberg.is_none(), "off unless present");
        let err = |s: &str| {
            Config::parse(&format!("{MIN}\n[iceberg]\n{s}"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("buckets = 0").contains("iceberg.buckets"));
        assert!(err("max_snapshots = 0").contains("iceberg.max_snapshots"));
        assert!(err("tables = [\"trades\"]").contains("schema.table"));
        assert!(err("tables = []").contains("iceberg.tables"));
    }

    /// The documented `[compaction]` section, uncommented, parses to the defaults; bad
    /// values are named, and partition projection is refused.
    #[test]
    fn the_documented_compaction_section_shows_the_defaults() {
        let c = documented("compaction");
        let k = c.compaction.expect("[compaction] present");
        assert_eq!(k.grace, DEFAULT_COMPACTION_GRACE);
        assert_eq!(k.delete_after, DEFAULT_COMPACTION_DELETE_AFTER);
        assert_eq!(k.target_file_size, DEFAULT_COMPACTION_TARGET_FILE_SIZE);
        assert_eq!(k.max_rewrite, DEFAULT_COMPACTION_MAX_REWRITE);
        assert!(Config::parse(MIN).unwrap().compaction.is_none(), "off unless present");
        let err = |s: &str| {
            Config::parse(&format!("{MIN}\n[compaction]\n{s}"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("target_file_size = \"1kB\"").contains("compaction.target_file_size"));
        assert!(err("grace = \"soon\"").contains("compaction.grace"));
        let glue = |extra: &str| {
            Config::parse(&format!(
                "{MIN}\n[catalog]\nkind = \"glue\"\ndatabase = \"cdc\"\n{extra}\n[compaction]\n"
            ))
        };
        assert!(glue("").unwrap().compaction.is_some());
        let e = glue("partition_projection = true").unwrap_err();
        assert!(e.to_string().contains("partition_projection"), "{e}");
    }

    #[test]
    fn metrics_listen_takes_an_address_or_a_loopback_port() {
        let with = |m: &str| Config::parse(&format!("{MIN}\n[metrics]\n{m}"));
        let c = with("listen = \"9753\"").unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9753".parse().unwrap()));
        assert!(c.metrics.enabled());
        let c = with("listen = \"0.0.0.0:9100\"").unwrap();
        assert_eq!(c.metrics.listen, Some("0.0.0.0:9100".parse().unwrap()));
        assert!(with("emf = true").unwrap().metrics.enabled());
        let e = with("listen = \"localhost\"").unwrap_err();
        assert!(e.to_string().starts_with("metrics.listen:"), "{e}");
        let e = with("ready_within = \"soon\"").unwrap_err();
        assert!(e.to_string().starts_with("metrics.ready_within:"), "{e}");
    }

    #[test]
    fn a_config_may_come_from_an_environment_variable() {
        unsafe { std::env::set_var("WALSHORE_TEST_CONFIG_TOML", MIN) };
        let c = Config::load(Path::new("env:WALSHORE_TEST_CONFIG_TOML")).unwrap();
        assert_eq!(c.source.slot, "walshore");
        let e = Config::load(Path::new("env:WALSHORE_TEST_CONFIG_UNSET")).unwrap_err();
        assert!(e.to_string().contains("WALSHORE_TEST_CONFIG_UNSET is not set"), "{e}");
    }

    #[test]
    fn iam_auth_needs_tls_and_no_password() {
        let with = |url: &str, extra: &str| {
            Config::parse(&MIN.replace(
                "url = \"postgres://rep:secret@db.example:6543/trading?sslmode=require\"",
                &format!("url = \"{url}\"\n{extra}"),
            ))
        };
        let c = with(
            "postgres://rep@db.example:5432/trading?sslmode=verify-full",
            "auth = \"iam\"\nregion = \"eu-west-1\"",
        )
        .unwrap();
        assert_eq!(
            c.source.conn.auth,
            Auth::Iam {
                region: Some("eu-west-1".into()),
                token_lifetime: Duration::from_secs(900)
            }
        );
        assert_eq!(c.source.conn.password, None);
        let err = |url: &str, extra: &str| with(url, extra).unwrap_err().to_string();
        // Only to a verified server: not in clear, and not to whoever answers with TLS.
        for mode in ["prefer", "require", "verify-ca", "require&sslrootcert=/ca.pem"] {
            let e = err(
                &format!("postgres://rep@db.example/trading?sslmode={mode}"),
                "auth = \"iam\"",
            );
            assert!(
                e.starts_with("source.url:") && e.contains("sslmode=verify-full"),
                "{mode}: {e}"
            );
        }
        let e = err(
            "postgres://rep:pw@db.example/trading?sslmode=verify-full",
            "auth = \"iam\"",
        );
        assert!(e.starts_with("source.auth:") && e.contains("remove it"), "{e}");
        let e = err(
            "postgres://rep@db.example/trading?sslmode=verify-full",
            "auth = \"iam\"\niam_token_lifetime = \"16m\"",
        );
        assert!(e.starts_with("source.iam_token_lifetime:"), "{e}");
        let e = err("postgres://rep@db.example/trading", "region = \"eu-west-1\"");
        assert!(e.starts_with("source.region:"), "{e}");
        let e = err("postgres://rep@db.example/trading", "auth = \"kerberos\"");
        assert!(e.starts_with("source.auth:"), "{e}");
        assert_eq!(
            with("postgres://rep@db.example/trading", "").unwrap().source.conn.auth,
            Auth::Password
        );
    }

    #[test]
    fn encryption_is_for_s3_and_kms_options_need_kms() {
        let on_s3 = |extra: &str| Config::parse(&MIN.replace("[sink]\n", &format!("[sink]\n{extra}\n")));
        assert!(on_s3("").unwrap().sink.sse.is_none());
        let c = on_s3("sse = \"aws:kms\"\nkms_key_id = \"alias/lake\"").unwrap();
        assert_eq!(
            c.sink.sse,
            Some(Sse::Kms {
                key_id: Some("alias/lake".into()),
                bucket_key: true
            })
        );
        let c = on_s3("sse = \"aws:kms\"\nbucket_key = false").unwrap();
        assert_eq!(
            c.sink.sse,
            Some(Sse::Kms {
                key_id: None,
                bucket_key: false
            })
        );
        assert_eq!(on_s3("sse = \"AES256\"").unwrap().sink.sse, Some(Sse::S3));
        for (bad, field) in [
            ("sse = \"aws:kms:dsse\"", "sink.sse:"),
            ("kms_key_id = \"k\"", "sink.kms_key_id:"),
            ("sse = \"AES256\"\nkms_key_id = \"k\"", "sink.kms_key_id:"),
            ("sse = \"AES256\"\nbucket_key = true", "sink.bucket_key:"),
            ("sse = \"aws:kms\"\nkms_key_id = \"\"", "sink.kms_key_id:"),
        ] {
            let e = on_s3(bad).unwrap_err().to_string();
            assert!(e.starts_with(field), "{bad}: {e}");
        }
        let on_file = MIN
            .replace("s3://lake/cdc", "file:///var/lake")
            .replace("[sink]\n", "[sink]\nsse = \"aws:kms\"\n");
        let e = Config::parse(&on_file).unwrap_err().to_string();
        assert!(e.starts_with("sink.sse:"), "a file:// lake: {e}");
    }

    #[test]
    fn notify_targets_are_checked() {
        let with = |m: &str| Config::parse(&format!("{MIN}\n[notify]\n{m}"));
        let c = with("webhook = \"https://h.example/in?token=x\"\nwebhook_secret = \"k\"").unwrap();
        assert!(c.notify.enabled());
        assert!(!format!("{:?}", c.notify).contains("token"), "{:?}", c.notify);
        let c = with("sns_topic_arn = \"arn:aws:sns:eu-west-1:123456789012:new-data.fifo\"").unwrap();
        assert_eq!(
            sns_region(c.notify.sns_topic_arn.as_deref().unwrap()),
            Some("eu-west-1")
        );
        for (bad, field) in [
            ("webhook = \"ftp://h/x\"", "notify.webhook:"),
            ("webhook = \"not a url\"", "notify.webhook:"),
            ("webhook_secret = \"k\"", "notify.webhook_secret:"),
            ("sns_topic_arn = \"arn:aws:sqs:eu-west-1:1:q\"", "notify.sns_topic_arn:"),
            ("sns_topic_arn = \"new-data\"", "notify.sns_topic_arn:"),
            ("sns_endpoint = \"http://127.0.0.1:5000\"", "notify.sns_endpoint:"),
            ("webhook = \"http://h/\"\nqueue = 0", "notify.queue:"),
            ("webhook = \"http://h/\"\ntimeout = \"later\"", "notify.timeout:"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.starts_with(field), "{bad}: {e}");
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.source.conn.port, 6543);
        assert_eq!(c.source.conn.sslmode, SslMode::Require);
        assert_eq!(c.sink.flush_interval, DEFAULT_FLUSH_INTERVAL);
        assert_eq!(c.snapshot, SnapshotMode::Initial);
        assert!(!format!("{:?}", c.source.conn).contains("secret"));
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            Config::parse(&MIN.replace("s3://lake/cdc\"", "s3://lake/cdc\"\nflush_interval = \"soon\"")).unwrap_err();
        assert!(e.to_string().starts_with("sink.flush_interval:"), "{e}");
        let e = Config::parse(&MIN.replace("[sink]", "[sink]\nbogus = 1")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::parse(&MIN.replace("slot = \"walshore\"", "slot = \"Bad-Slot\"")).unwrap_err();
        assert!(e.to_string().starts_with("source.slot:"), "{e}");
        let e = Config::parse(&MIN.replace("slot = \"walshore\"", "slot = \"walshore\"\nreceive_timeout = \"5s\""))
            .unwrap_err();
        assert!(e.to_string().starts_with("source.receive_timeout:"), "{e}");
        let e = Config::parse(&MIN.replace("s3://lake/cdc\"", "s3://lake/cdc\"\npart_size = \"1MiB\"")).unwrap_err();
        assert!(e.to_string().starts_with("sink.part_size:"), "{e}");
        let glue = |extra: &str| Config::parse(&format!("{MIN}\n[catalog]\nkind = \"glue\"\n{extra}"));
        let e = glue("").unwrap_err();
        assert!(e.to_string().starts_with("catalog.database:"), "{e}");
        let e = glue("database = \"Trading-CDC\"").unwrap_err();
        assert!(e.to_string().starts_with("catalog.database:"), "{e}");
        let c = glue("database = \"trading_cdc\"\nregion = \"eu-west-1\"").unwrap();
        let g = c.glue.unwrap();
        assert_eq!(
            (g.database.as_str(), g.region.as_deref()),
            ("trading_cdc", Some("eu-west-1"))
        );
    }

    #[test]
    fn env_vars_are_expanded_and_missing_ones_named() {
        unsafe { std::env::set_var("WALSHORE_TEST_PUB", "pub_from_env") };
        let c = Config::parse(&MIN.replace("publication = \"walshore\"", "publication = \"${WALSHORE_TEST_PUB}\""))
            .unwrap();
        assert_eq!(c.source.publication, "pub_from_env");
        let e = Config::parse(&MIN.replace("publication = \"walshore\"", "publication = \"${WALSHORE_TEST_NOPE}\""))
            .unwrap_err();
        assert!(e.to_string().contains("WALSHORE_TEST_NOPE"), "{e}");
    }

    /// A password with characters that mean something in a URL, expanded inside
    /// `source.url`, is the password and nothing else; a variable holding the whole URL
    /// is taken as a URL; `source.password` overrides the URL's.
    #[test]
    fn expanded_values_inside_the_url_cannot_change_how_it_parses() {
        let tricky = "p/w?d@x:y#z%41 é";
        unsafe { std::env::set_var("WALSHORE_TEST_PW", tricky) };
        let text = MIN.replace(
            "postgres://rep:secret@db.example:6543/trading?sslmode=require",
            "postgres://rep:${WALSHORE_TEST_PW}@db.example:6543/trading?sslmode=require",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.source.conn.password.as_deref(), Some(tricky));
        assert_eq!(
            (
                c.source.conn.host.as_str(),
                c.source.conn.port,
                c.source.conn.dbname.as_str()
            ),
            ("db.example", 6543, "trading")
        );
        assert_eq!(c.source.conn.sslmode, SslMode::Require);
        assert!(!format!("{:?}", c.source.conn).contains("p/w"));

        unsafe {
            std::env::set_var(
                "WALSHORE_TEST_DB_URL",
                "postgres://u:p%2Fw@db.example:7000/trading?sslmode=disable",
            )
        };
        let text = MIN.replace(
            "postgres://rep:secret@db.example:6543/trading?sslmode=require",
            "${WALSHORE_TEST_DB_URL}",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.source.conn.password.as_deref(), Some("p/w"));
        assert_eq!(c.source.conn.port, 7000);

        let text = MIN.replace(
            "slot = \"walshore\"",
            "slot = \"walshore\"\npassword = \"${WALSHORE_TEST_PW}\"",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.source.conn.password.as_deref(), Some(tricky));
    }

    #[test]
    fn sizes_have_units() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1 GB"), Some(1_000_000_000));
        assert_eq!(parse_size("12 parsecs"), None);
    }
}
