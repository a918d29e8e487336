//! The AWS Glue catalog: one external Parquet table per replicated table (the change
//! log, `{name}_changes`), its columns from the lake schema, its partitions registered
//! before the commit record that first references them.
//!
//! Contract:
//! - [`Catalog::register`] runs before the commit record that publishes `files`, so a
//!   committed partition is always registered. A crash in between leaves a registered
//!   partition whose data is not committed yet (it is streamed again); never the
//!   reverse.
//! - Every call is idempotent: an existing database, table or partition is success; a
//!   table's columns are only ever added or widened, never dropped (analysts may still
//!   query them in older partitions).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use arrow::datatypes::DataType;
use aws_sdk_glue::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_glue::types::{Column, DatabaseInput, PartitionInput, SerDeInfo, StorageDescriptor, TableInput};

use crate::batch::schema::LakeSchema;
use crate::batch::value::Kind;
use crate::config::{GlueConfig, PartitionBy, Partitions, SinkConfig, Unrepresentable};
use crate::retry::Retry;
use crate::sink::WrittenObject;

pub mod views;

/// The folder (a key prefix) of the compacted files the manifest names for each of
/// `table`'s `partitions` that has any.
async fn compacted_folders(
    store: &dyn object_store::ObjectStore,
    table: &str,
    partitions: &[String],
) -> Result<Vec<(String, String)>, CatalogError> {
    let err = |e: crate::checkpoint::CheckpointError| CatalogError {
        operation: "reading the commit log",
        target: table.to_owned(),
        message: e.to_string(),
        hint: "",
        retry: e.retry(),
        busy: false,
    };
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let Some(head) = crate::checkpoint::read_head(store).await.map_err(err)? else {
        return Ok(Vec::new());
    };
    crate::checkpoint::walk_manifest(store, &head, 1, |l| {
        if !l.replaced
            && l.file.table == table
            && partitions.contains(&l.file.partition)
            && crate::compaction::is_compacted(&l.file.key)
            && let Some((folder, _)) = l.file.key.rsplit_once('/')
        {
            out.insert(l.file.partition.clone(), folder.to_owned());
        }
        Ok(())
    })
    .await
    .map_err(err)?;
    Ok(out.into_iter().collect())
}

/// Partitions remembered as registered (see `Catalog::remember`): a day's hourly
/// partitions of 300 tables twice over, about 2 MiB.
const REMEMBERED_PARTITIONS: usize = 16_384;
const INPUT_FORMAT: &str = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat";
const OUTPUT_FORMAT: &str = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat";
const SERDE: &str = "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe";
/// Glue takes at most 100 partitions per BatchCreatePartition.
const PARTITION_BATCH: usize = 100;

#[derive(Debug, thiserror::Error)]
#[error("Glue {operation} {target}: {message}{hint}")]
pub struct CatalogError {
    pub operation: &'static str,
    pub target: String,
    pub message: String,
    hint: &'static str,
    retry: Retry,
    /// Throttling or a concurrent modification: repeated in place (see `Catalog::patiently`).
    busy: bool,
}

impl CatalogError {
    pub fn retry(&self) -> Retry {
        self.retry
    }
}

/// What [`Catalog::patiently`] repeats.
#[derive(Clone, Copy)]
enum Job<'a> {
    Register(&'a [WrittenObject], &'a HashMap<String, LakeSchema>),
    Reconcile(
        &'a BTreeMap<String, Vec<String>>,
        &'a HashMap<String, LakeSchema>,
        &'a dyn object_store::ObjectStore,
    ),
}

/// The Glue client's TCP (and TLS) connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Catalog::register`] repeats a call that Glue throttles (or refuses for a
/// concurrent modification) before handing the error to the pipeline, which reconnects
/// and tries again anyway.
const BUSY_BUDGET: Duration = Duration::from_secs(300);

fn glue_err<E: ProvideErrorMetadata + std::error::Error + 'static>(
    operation: &'static str,
    target: &str,
    e: SdkError<E>,
) -> CatalogError {
    let (message, code) = match &e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            // A code the SDK could not read (an error body in another format): the
            // HTTP status decides.
            let code = s.err().code().map(str::to_owned).unwrap_or_else(|| status.to_string());
            (
                format!(
                    "HTTP {status} {}: {}",
                    s.err().code().unwrap_or(""),
                    s.err().message().unwrap_or("no message")
                ),
                Some(code),
            )
        }
        other => (crate::retry::ErrorChain(other).to_string(), None),
    };
    let retry = crate::retry::of_aws(code.as_deref());
    let busy = crate::retry::is_aws_busy(code.as_deref());
    let hint = if crate::retry::is_aws_auth(code.as_deref()) {
        "; check walshore's AWS credentials, and allow glue:GetDatabase, glue:CreateDatabase, glue:GetTable, glue:CreateTable, glue:UpdateTable, glue:GetPartitions and glue:BatchCreatePartition (and glue:DeleteTable with [iceberg], glue:UpdatePartition with [compaction]) on the catalog, the database and its tables for its identity"
    } else {
        ""
    };
    CatalogError {
        operation,
        target: target.to_owned(),
        message,
        hint,
        retry,
        busy,
    }
}

/// The Glue name of `schema.table`'s change-log table: [`view_name`] + `_changes`.
pub fn table_name(qualified: &str) -> String {
    format!("{}_changes", view_name(qualified))
}

/// The name of `schema.table`'s current-state view: lower case, `[a-z0-9_]`, the
/// schema left out for `public`.
pub fn view_name(qualified: &str) -> String {
    let (schema, table) = qualified.split_once('.').unwrap_or(("public", qualified));
    let base = if schema == "public" {
        table.to_owned()
    } else {
        format!("{schema}_{table}")
    };
    base.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The Hive type Glue records (and Athena reads) for an Arrow type.
pub fn hive_type(t: &DataType) -> String {
    match t {
        DataType::Boolean => "boolean".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "int".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "float".into(),
        DataType::Float64 => "double".into(),
        DataType::Decimal128(p, s) => format!("decimal({p},{s})"),
        DataType::Binary | DataType::LargeBinary => "binary".into(),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(_, _) => "timestamp".into(),
        DataType::List(f) | DataType::LargeList(f) => format!("array<{}>", hive_type(f.data_type())),
        _ => "string".into(),
    }
}

/// A table's columns as Glue records them: the metadata columns, then the table's own
/// (dropped ones too: older files hold them), except a partition column, which Glue
/// holds as a partition key (a name may not be both).
pub fn columns(schema: &LakeSchema, unrepresentable: Unrepresentable, by: &PartitionBy) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![
        ("_op".into(), "string".into()),
        ("_lsn".into(), "bigint".into()),
        ("_seq".into(), "bigint".into()),
        ("_xid".into(), "bigint".into()),
        ("_commit_ts".into(), "timestamp".into()),
        ("_unchanged".into(), "array<string>".into()),
    ];
    if unrepresentable != Unrepresentable::Error {
        out.push((crate::batch::UNREPRESENTED_COLUMN.into(), "array<string>".into()));
    }
    let keys = partition_keys(by);
    for c in schema.columns.iter().filter(|c| !keys.contains(&c.name)) {
        let t = Kind::for_type(c.pg_type_oid, c.pg_type_modifier).data_type();
        out.push((c.name.clone(), hive_type(&t)));
    }
    out
}

/// The partition keys of a table's partition spec (all strings, as in the path).
/// The partition folders in the lake of each of `tables` (`schema.table`), one level
/// per key of its partition spec: what [`Catalog::reconcile`] and `status` compare
/// with Glue.
pub async fn lake_partitions(
    store: &dyn object_store::ObjectStore,
    tables: &[String],
    partitions: &Partitions,
) -> Result<BTreeMap<String, Vec<String>>, crate::sink::SinkError> {
    let mut lake = BTreeMap::new();
    for table in tables {
        let (schema_name, bare) = table.split_once('.').unwrap_or(("public", table));
        let keys = partition_keys(partitions.of(table));
        let parts = crate::sink::partitions_in_lake(store, schema_name, bare, &keys).await?;
        lake.insert(table.clone(), parts);
    }
    Ok(lake)
}

pub fn partition_keys(by: &PartitionBy) -> Vec<String> {
    match by {
        PartitionBy::CommitDate => vec!["dt".into()],
        PartitionBy::CommitHour => vec!["dt".into(), "hour".into()],
        PartitionBy::Column(c) => vec![c.clone()],
    }
}

/// A partition path (`dt=2026-11-22/hour=05`, `symbol=A%2FB`) as Glue values, unescaped.
pub fn partition_values(partition: &str) -> Vec<String> {
    partition
        .split('/')
        .map(|seg| {
            let v = seg.split_once('=').map(|(_, v)| v).unwrap_or(seg);
            unescape(v)
        })
        .collect()
}

fn unescape(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The parameters of every change-log table.
fn input_parameters(qualified: &str) -> HashMap<String, String> {
    HashMap::from([
        ("classification".to_owned(), "parquet".to_owned()),
        ("EXTERNAL".to_owned(), "TRUE".to_owned()),
        ("walshore_version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ("walshore_source_table".to_owned(), qualified.to_owned()),
    ])
}

/// Refuses a Glue table or view that walshore did not make for `qualified`: one of
/// another source table (two PostgreSQL names that map to one Glue name) or one made by
/// someone else. walshore never overwrites a table it does not own.
fn owned(t: &aws_sdk_glue::types::Table, name: &str, qualified: &str) -> Result<(), CatalogError> {
    let owner = t.parameters().and_then(|p| p.get("walshore_source_table"));
    if owner.map(String::as_str) == Some(qualified) {
        return Ok(());
    }
    let message = match owner {
        Some(other) => {
            format!("it holds {other}, and {qualified} maps to the same Glue name (lower case, other characters as _)")
        }
        None => "it exists and was not made by walshore (no walshore_source_table parameter)".to_owned(),
    };
    Err(CatalogError {
        operation: "GetTable",
        target: name.to_owned(),
        message,
        hint: "; rename one of the PostgreSQL tables, take it out of the publication, or set another catalog.database (walshore does not overwrite a table it does not own)",
        retry: Retry::Definite,
        busy: false,
    })
}

/// The Hive type Glue shows for an Iceberg type (engines read the metadata's own).
fn iceberg_hive_type(t: &crate::iceberg::schema::Type) -> String {
    use crate::iceberg::schema::Type;
    match t {
        Type::List(l) => format!("array<{}>", iceberg_hive_type(&l.element)),
        Type::Primitive(p) => match p.as_str() {
            "long" => "bigint".into(),
            "timestamptz" => "timestamp".into(),
            "uuid" | "time" => "string".into(),
            other => other.to_owned(),
        },
    }
}

fn column(name: &str, ty: &str) -> Column {
    Column::builder().name(name).r#type(ty).build().expect("name is set")
}

/// What `walshore athena-sql` prints: a current-state view for every table of the
/// lake (from its recorded schema), then, for the demo's trading schema, example
/// queries.
pub fn athena_sql(database: &str, schemas: &HashMap<String, LakeSchema>, partitions: &Partitions) -> String {
    let mut tables: Vec<&String> = schemas.keys().collect();
    tables.sort();
    let mut out = String::new();
    for t in &tables {
        out.push_str(&format!(
            "-- {t}: current state (latest row per key, truncates and deletes applied, unchanged TOAST values carried forward)\n{};\n\n",
            views::current_state(database, t, &schemas[*t], partitions.of(t))
        ));
    }
    let demo = ["public.trades", "public.prices"];
    if demo.iter().all(|t| schemas.contains_key(*t)) {
        out.push_str(&include_str!("../../sql/athena/examples.sql").replace("trading_cdc", database));
    }
    out
}

pub struct Catalog {
    client: aws_sdk_glue::Client,
    database: String,
    /// `{sink.url}` with a trailing slash: table locations are below it.
    root: String,
    unrepresentable: Unrepresentable,
    partitions: Partitions,
    /// Columns this process last gave each table.
    tables: HashMap<String, Vec<(String, String)>>,
    /// Partitions this process registered (or found registered), at most
    /// [`REMEMBERED_PARTITIONS`]: forgetting one costs a call that finds it there.
    registered: HashSet<(String, String)>,
    database_ready: bool,
    /// `catalog.create_views`.
    create_views: bool,
    /// `catalog.partition_projection`.
    projection: bool,
    /// `[iceberg]`: the tables it covers are an Iceberg table under the analyst's
    /// name, instead of a current-state view.
    iceberg: Option<crate::config::IcebergConfig>,
}

impl Catalog {
    /// A client from the standard AWS chain (credentials, region), with `endpoint`
    /// and `region` from the config when given.
    pub async fn open(cfg: &GlueConfig, sink: &SinkConfig, partitions: &Partitions) -> Catalog {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &cfg.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let shared = loader.load().await;
        // Each attempt is bounded like an S3 request (`sink.request_timeout`), so a
        // Glue that stops answering is an error to retry, not a pipeline that hangs.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(sink.request_timeout))
            .operation_attempt_timeout(sink.request_timeout)
            .build();
        let mut b = aws_sdk_glue::config::Builder::from(&shared).timeout_config(timeouts);
        if let Some(ep) = &cfg.endpoint {
            b = b.endpoint_url(ep);
        }
        let root = sink.root();
        Catalog {
            client: aws_sdk_glue::Client::from_conf(b.build()),
            database: cfg.database.clone(),
            root,
            unrepresentable: sink.unrepresentable,
            partitions: partitions.clone(),
            tables: HashMap::new(),
            registered: HashSet::new(),
            database_ready: false,
            create_views: cfg.create_views,
            projection: cfg.partition_projection,
            iceberg: None,
        }
    }

    /// The same catalog, leaving the analyst's name of the tables `iceberg` covers to
    /// their Iceberg table ([`Catalog::point_iceberg`]): no current-state view there.
    pub fn with_iceberg(mut self, iceberg: Option<crate::config::IcebergConfig>) -> Catalog {
        self.iceberg = iceberg;
        self
    }

    /// Registers (or moves forward) the Glue table of `qualified`'s Iceberg table,
    /// under the analyst's name ([`view_name`]): `table_type = ICEBERG` and
    /// `metadata_location`, as Athena and Glue's Iceberg readers expect. An update
    /// passes the `VersionId` it read (Glue's optimistic lock) and skips Glue's archived
    /// version (one a minute would reach Glue's limit of versions in 70 days). A
    /// current-state view walshore made there before is replaced; anything else that
    /// is not walshore's is an error.
    pub async fn point_iceberg(
        &mut self,
        qualified: &str,
        location: &str,
        metadata_location: &str,
        schema: &crate::iceberg::schema::Schema,
    ) -> Result<(), CatalogError> {
        self.ensure_database().await?;
        let name = view_name(qualified);
        let columns: Vec<Column> = schema
            .fields
            .iter()
            .map(|f| {
                Column::builder()
                    .name(&f.name)
                    .r#type(iceberg_hive_type(&f.ty))
                    .parameters("iceberg.field.id", f.id.to_string())
                    .parameters("iceberg.field.optional", (!f.required).to_string())
                    .parameters("iceberg.field.current", "true")
                    .build()
                    .expect("name is set")
            })
            .collect();
        let input = |previous: Option<&str>| {
            let mut b = TableInput::builder()
                .name(&name)
                .description(format!(
                    "Current state of PostgreSQL table {qualified}: an Apache Iceberg table kept by walshore"
                ))
                .table_type("EXTERNAL_TABLE")
                .parameters("table_type", "ICEBERG")
                .parameters("metadata_location", metadata_location)
                .parameters("walshore_version", env!("CARGO_PKG_VERSION"))
                .parameters("walshore_source_table", qualified)
                .storage_descriptor(
                    StorageDescriptor::builder()
                        .location(location)
                        .set_columns(Some(columns.clone()))
                        .build(),
                );
            if let Some(p) = previous {
                b = b.parameters("previous_metadata_location", p);
            }
            b.build().expect("name is set")
        };
        let existing = self.get_table(&name).await?;
        let Some(t) = existing else {
            return match self
                .client
                .create_table()
                .database_name(&self.database)
                .table_input(input(None))
                .send()
                .await
            {
                Ok(_) => {
                    tracing::info!(table = %name, database = %self.database, "registered the Iceberg table in Glue");
                    Ok(())
                }
                Err(e) => Err(glue_err("CreateTable", &name, e)),
            };
        };
        owned(&t, &name, qualified)?;
        let params = t.parameters();
        let current = params.and_then(|p| p.get("metadata_location")).map(String::as_str);
        let iceberg = params
            .and_then(|p| p.get("table_type"))
            .is_some_and(|v| v.eq_ignore_ascii_case("iceberg"));
        if iceberg && current == Some(metadata_location) {
            return Ok(());
        }
        if !iceberg {
            // Our current-state view from before `[iceberg]`: the table takes its name.
            self.client
                .delete_table()
                .database_name(&self.database)
                .name(&name)
                .send()
                .await
                .map_err(|e| glue_err("DeleteTable", &name, e))?;
            self.client
                .create_table()
                .database_name(&self.database)
                .table_input(input(None))
                .send()
                .await
                .map_err(|e| glue_err("CreateTable", &name, e))?;
            tracing::info!(table = %name, database = %self.database, "the Iceberg table replaced the current-state view in Glue");
            return Ok(());
        }
        let mut update = self
            .client
            .update_table()
            .database_name(&self.database)
            .table_input(input(current))
            .skip_archive(true);
        if let Some(v) = t.version_id() {
            update = update.version_id(v);
        }
        update
            .send()
            .await
            .map(|_| ())
            .map_err(|e| glue_err("UpdateTable", &name, e))
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// For `check`: whether the database exists (`Ok(false)`: walshore creates it),
    /// or why Glue cannot be used.
    pub async fn probe(&self) -> Result<bool, CatalogError> {
        match self.client.get_database().name(&self.database).send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_entity_not_found_exception()) => Ok(false),
            Err(e) => Err(glue_err("GetDatabase", &self.database, e)),
        }
    }

    /// Creates the database if it is missing.
    pub async fn ensure_database(&mut self) -> Result<(), CatalogError> {
        if self.database_ready {
            return Ok(());
        }
        match self.client.get_database().name(&self.database).send().await {
            Ok(_) => {}
            Err(e) if e.as_service_error().is_some_and(|s| s.is_entity_not_found_exception()) => {
                let input = DatabaseInput::builder()
                    .name(&self.database)
                    .description("PostgreSQL tables replicated by walshore")
                    .build()
                    .expect("name is set");
                match self.client.create_database().database_input(input).send().await {
                    Ok(_) => tracing::info!(database = %self.database, "created the Glue database"),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_already_exists_exception()) => {}
                    Err(e) => return Err(glue_err("CreateDatabase", &self.database, e)),
                }
            }
            Err(e) => return Err(glue_err("GetDatabase", &self.database, e)),
        }
        self.database_ready = true;
        Ok(())
    }

    fn table_input(&self, qualified: &str, cols: &[(String, String)]) -> TableInput {
        let (schema, table) = qualified.split_once('.').unwrap_or(("public", qualified));
        let location = format!("{}{}/{}/", self.root, schema, table);
        let keys = partition_keys(self.partitions.of(qualified));
        TableInput::builder()
            .name(table_name(qualified))
            .description(format!("Every change of PostgreSQL table {qualified}, by walshore"))
            .table_type("EXTERNAL_TABLE")
            .storage_descriptor(
                StorageDescriptor::builder()
                    .set_columns(Some(cols.iter().map(|(n, t)| column(n, t)).collect()))
                    .location(location)
                    .input_format(INPUT_FORMAT)
                    .output_format(OUTPUT_FORMAT)
                    .serde_info(SerDeInfo::builder().serialization_library(SERDE).build())
                    .build(),
            )
            .set_partition_keys(Some(keys.iter().map(|k| column(k, "string")).collect()))
            .set_parameters(Some(self.projection_parameters(qualified, &keys).into_iter().fold(
                input_parameters(qualified),
                |mut m, (k, v)| {
                    m.insert(k, v);
                    m
                },
            )))
            .build()
            .expect("name is set")
    }

    /// Athena partition projection: how Athena computes a table's partitions itself
    /// (no registration): dates from 2026-01-01 (no walshore lake is older) to now,
    /// hours 00–23, and a partition column's values injected from the query's filter.
    fn projection_parameters(&self, qualified: &str, keys: &[String]) -> Vec<(String, String)> {
        if !self.projection {
            return Vec::new();
        }
        let (schema, table) = qualified.split_once('.').unwrap_or(("public", qualified));
        let mut p = vec![("projection.enabled".to_owned(), "true".to_owned())];
        let mut template = format!("{}{}/{}", self.root, schema, table);
        for k in keys {
            template.push_str(&format!("/{k}=${{{k}}}"));
            let kind = match (self.partitions.of(qualified), k.as_str()) {
                (PartitionBy::Column(_), _) => vec![("type", "injected")],
                (_, "hour") => vec![("type", "integer"), ("range", "0,23"), ("digits", "2")],
                _ => vec![
                    ("type", "date"),
                    ("format", "yyyy-MM-dd"),
                    ("range", "2026-01-01,NOW"),
                    ("interval", "1"),
                    ("interval.unit", "DAYS"),
                ],
            };
            for (name, value) in kind {
                p.push((format!("projection.{k}.{name}"), value.to_owned()));
            }
        }
        p.push(("storage.location.template".to_owned(), format!("{template}/")));
        p
    }

    /// Creates or replaces the current-state view of `qualified` in Glue, in the form
    /// Athena stores its own views (a Presto view: the query and its columns, base64
    /// JSON in `ViewOriginalText`).
    async fn upsert_view(&self, qualified: &str, schema: &LakeSchema) -> Result<(), CatalogError> {
        use base64::Engine;
        let name = view_name(qualified);
        let sql = views::select(&self.database, qualified, schema, self.partitions.of(qualified));
        let columns = views::view_columns(schema);
        let definition = serde_json::json!({
            "originalSql": sql,
            "catalog": "awsdatacatalog",
            "schema": self.database,
            "columns": columns.iter().map(|(n, t)| serde_json::json!({"name": n, "type": t})).collect::<Vec<_>>(),
            "owner": "walshore",
            "runAsInvoker": false,
        });
        let text = format!(
            "/* Presto View: {} */",
            base64::engine::general_purpose::STANDARD.encode(definition.to_string())
        );
        let hive: Vec<Column> = schema
            .columns
            .iter()
            .filter(|c| !c.dropped)
            .map(|c| {
                column(
                    &c.name,
                    &hive_type(&Kind::for_type(c.pg_type_oid, c.pg_type_modifier).data_type()),
                )
            })
            .collect();
        let input = TableInput::builder()
            .name(&name)
            .description(format!("Current state of PostgreSQL table {qualified}, by walshore"))
            .table_type("VIRTUAL_VIEW")
            .view_original_text(text)
            .view_expanded_text("/* Presto View */")
            .parameters("presto_view", "true")
            .parameters("comment", "Presto View")
            .parameters("walshore_version", env!("CARGO_PKG_VERSION"))
            .parameters("walshore_source_table", qualified)
            .storage_descriptor(
                StorageDescriptor::builder()
                    .set_columns(Some(hive))
                    .serde_info(SerDeInfo::builder().build())
                    .build(),
            )
            .build()
            .expect("name is set");
        match self
            .client
            .create_table()
            .database_name(&self.database)
            .table_input(input.clone())
            .send()
            .await
        {
            Ok(_) => tracing::info!(view = %name, database = %self.database, "created the current-state view"),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_already_exists_exception()) => {
                if let Some(t) = self.get_table(&name).await? {
                    owned(&t, &name, qualified)?;
                }
                self.update_table(&name, input).await?;
                tracing::info!(view = %name, database = %self.database, "replaced the current-state view");
            }
            Err(e) => return Err(glue_err("CreateTable", &name, e)),
        }
        Ok(())
    }

    /// Replaces the definition of the Glue table (or view) `name`.
    async fn update_table(&self, name: &str, input: TableInput) -> Result<(), CatalogError> {
        self.client
            .update_table()
            .database_name(&self.database)
            .table_input(input)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| glue_err("UpdateTable", name, e))
    }

    /// The Glue table (or view) `name` of the database, `None` when there is none.
    async fn get_table(&self, name: &str) -> Result<Option<aws_sdk_glue::types::Table>, CatalogError> {
        match self
            .client
            .get_table()
            .database_name(&self.database)
            .name(name)
            .send()
            .await
        {
            Ok(out) => Ok(out.table),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_entity_not_found_exception()) => Ok(None),
            Err(e) => Err(glue_err("GetTable", name, e)),
        }
    }

    /// Creates the table of `qualified`, or adds and widens its columns.
    pub async fn ensure_table(&mut self, qualified: &str, schema: &LakeSchema) -> Result<(), CatalogError> {
        self.ensure_database().await?;
        let wanted = columns(schema, self.unrepresentable, self.partitions.of(qualified));
        if self.tables.get(qualified) == Some(&wanted) {
            return Ok(());
        }
        let name = table_name(qualified);
        match self.get_table(&name).await? {
            None => {
                let input = self.table_input(qualified, &wanted);
                match self
                    .client
                    .create_table()
                    .database_name(&self.database)
                    .table_input(input)
                    .send()
                    .await
                {
                    Ok(_) => tracing::info!(table = %name, database = %self.database, "created the Glue table"),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_already_exists_exception()) => {
                        // Another call created it meanwhile: look again next time.
                        return Err(CatalogError {
                            operation: "CreateTable",
                            target: name,
                            message: "created concurrently".into(),
                            hint: "",
                            retry: Retry::Transient,
                            busy: true,
                        });
                    }
                    Err(e) => return Err(glue_err("CreateTable", &name, e)),
                }
            }
            Some(t) => {
                owned(&t, &name, qualified)?;
                // Keep every column Glue has (older partitions may hold it); take our
                // type for the ones we know (a widening), add the new ones.
                let have: Vec<(String, String)> = t
                    .storage_descriptor()
                    .map(|sd| {
                        sd.columns()
                            .iter()
                            .map(|c| (c.name().to_owned(), c.r#type().unwrap_or("string").to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut merged = have.clone();
                for (n, ty) in &wanted {
                    match merged.iter_mut().find(|(m, _)| m == n) {
                        Some(c) => c.1 = ty.clone(),
                        None => merged.push((n.clone(), ty.clone())),
                    }
                }
                // `partition_projection` switched since the table was made: its
                // parameters follow (and with registration back, the start-up
                // reconciliation registers the partitions).
                let projected = t
                    .parameters()
                    .and_then(|p| p.get("projection.enabled"))
                    .is_some_and(|v| v == "true");
                if merged != have || projected != self.projection {
                    self.update_table(&name, self.table_input(qualified, &merged)).await?;
                    tracing::info!(table = %name, database = %self.database, columns = merged.len(), projection = self.projection, "updated the Glue table");
                }
            }
        }
        // A table with an Iceberg table has it under the view's name; a table the
        // projector skips (a key Iceberg cannot identify rows by) keeps its view.
        let iceberg = self.iceberg.as_ref().is_some_and(|i| i.covers(qualified))
            && crate::iceberg::schema::Identity::of(schema) != crate::iceberg::schema::Identity::Unsupported;
        if self.create_views && !iceberg {
            self.upsert_view(qualified, schema).await?;
        }
        self.tables.insert(qualified.to_owned(), wanted);
        Ok(())
    }

    /// Registers every table and partition `files` live in, before their commit.
    /// Throttling and concurrent modifications are waited out in place (see
    /// [`Catalog::patiently`]): the replication connection stays up.
    pub async fn register(
        &mut self,
        files: &[WrittenObject],
        schemas: &HashMap<String, LakeSchema>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), CatalogError> {
        self.patiently(Job::Register(files, schemas), stop).await.map(|_| ())
    }

    /// At start-up, after recovery has deleted every uncommitted file: each lake table
    /// in Glue with its current columns, and each partition folder of the lake
    /// (`lake`: by `schema.table`, from [`crate::sink::partitions_in_lake`]) that Glue
    /// lacks registered. This makes good what no commit would: a lake that gains
    /// `[catalog]` later, a Glue table or partition deleted by hand, a database
    /// recreated. A partition that compaction rewrote is registered at its newest
    /// compacted folder (`_c{tag}`, found in `store`). Returns the number of partitions
    /// registered.
    pub async fn reconcile(
        &mut self,
        lake: &BTreeMap<String, Vec<String>>,
        schemas: &HashMap<String, LakeSchema>,
        stop: &tokio_util::sync::CancellationToken,
        store: &dyn object_store::ObjectStore,
    ) -> Result<usize, CatalogError> {
        self.patiently(Job::Reconcile(lake, schemas, store), stop).await
    }

    /// Runs `job`, repeating it while Glue throttles or reports a concurrent
    /// modification, with the pipeline's backoff, for up to [`BUSY_BUDGET`]. Every
    /// step is idempotent, so a repeat picks up where the last stopped. `stop` ends the
    /// wait with the last error.
    async fn patiently(
        &mut self,
        job: Job<'_>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<usize, CatalogError> {
        let started = Instant::now();
        let mut delays = crate::retry::backoff(None);
        loop {
            let result = match job {
                Job::Register(files, schemas) => self.register_once(files, schemas).await.map(|()| 0),
                Job::Reconcile(lake, schemas, store) => self.reconcile_once(lake, schemas, store).await,
            };
            match result {
                Err(e) if e.busy && started.elapsed() < BUSY_BUDGET && !stop.is_cancelled() => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(60));
                    tracing::warn!(
                        error = %e,
                        retry_in = ?delay,
                        "Glue is busy (throttling or a concurrent change); repeating the call"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return Err(e),
                    }
                }
                other => return other,
            }
        }
    }

    async fn reconcile_once(
        &mut self,
        lake: &BTreeMap<String, Vec<String>>,
        schemas: &HashMap<String, LakeSchema>,
        store: &dyn object_store::ObjectStore,
    ) -> Result<usize, CatalogError> {
        let mut created = 0;
        for (table, parts) in lake {
            let schema = schemas.get(table).cloned().unwrap_or_default();
            self.ensure_table(table, &schema).await?;
            if self.projection {
                continue;
            }
            let name = table_name(table);
            let have = self.partitions_of(&name).await?;
            let mut missing = Vec::new();
            for p in parts {
                if have.contains(&partition_values(p)) {
                    self.remember(table, p);
                } else {
                    missing.push(p.as_str());
                }
            }
            if !missing.is_empty() {
                self.create_partitions(table, &missing).await?;
                tracing::info!(table = %name, partitions = missing.len(), "registered partitions of the lake that Glue did not have");
                created += missing.len();
                // A compacted partition reads the folder of the compacted files the
                // manifest names (compaction waits for this reconciliation).
                let (schema_name, bare) = table.split_once('.').unwrap_or(("public", table));
                let mut compacted = Vec::new();
                for p in &missing {
                    let dir = crate::sink::key_path(&format!("{schema_name}/{bare}/{p}"));
                    let listed = store.list_with_delimiter(Some(&dir)).await.map_err(|e| CatalogError {
                        operation: "LIST",
                        target: dir.to_string(),
                        message: e.to_string(),
                        hint: "",
                        retry: crate::retry::of_store(&e),
                        busy: false,
                    })?;
                    if listed
                        .common_prefixes
                        .iter()
                        .any(|f| f.filename().is_some_and(crate::compaction::is_compacted_folder))
                    {
                        compacted.push(p.to_string());
                    }
                }
                if !compacted.is_empty() {
                    for (p, folder) in compacted_folders(store, table, &compacted).await? {
                        self.point_partition(table, &p, &folder).await?;
                    }
                }
            }
        }
        Ok(created)
    }

    /// The values of every partition Glue has registered for the Glue table `name`.
    async fn partitions_of(&self, name: &str) -> Result<HashSet<Vec<String>>, CatalogError> {
        let mut have = HashSet::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .get_partitions()
                .database_name(&self.database)
                .table_name(name)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| glue_err("GetPartitions", name, e))?;
            have.extend(out.partitions().iter().map(|p| p.values().to_vec()));
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                return Ok(have);
            }
        }
    }

    /// For `status`: how Glue stands against the lake's partition folders of
    /// `schema.table` (`lake`, from [`crate::sink::partitions_in_lake`]).
    pub async fn describe(&self, qualified: &str, lake: &[String]) -> Result<serde_json::Value, CatalogError> {
        let name = table_name(qualified);
        let exists = self.get_table(&name).await?.is_some();
        if !exists || self.projection {
            return Ok(serde_json::json!({
                "glue_table": name,
                "exists": exists,
                "lake_partitions": lake.len(),
                "partition_projection": self.projection,
            }));
        }
        let have = self.partitions_of(&name).await?;
        let missing = lake.iter().filter(|p| !have.contains(&partition_values(p))).count();
        Ok(serde_json::json!({
            "glue_table": name,
            "exists": true,
            "lake_partitions": lake.len(),
            "registered_partitions": have.len(),
            "missing_partitions": missing,
        }))
    }

    async fn register_once(
        &mut self,
        files: &[WrittenObject],
        schemas: &HashMap<String, LakeSchema>,
    ) -> Result<(), CatalogError> {
        let mut new: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut tables: Vec<&str> = files.iter().map(|f| f.table.as_str()).collect();
        tables.sort_unstable();
        tables.dedup();
        // Columns first (a schema change may come within a known partition).
        for table in tables {
            let schema = schemas.get(table).cloned().unwrap_or_default();
            self.ensure_table(table, &schema).await?;
        }
        for f in files {
            if !self.registered.contains(&(f.table.clone(), f.partition.clone())) {
                let parts = new.entry(f.table.as_str()).or_default();
                if !parts.contains(&f.partition.as_str()) {
                    parts.push(f.partition.as_str());
                }
            }
        }
        if self.projection {
            // Athena computes the partitions from the table's projection parameters.
            return Ok(());
        }
        for (table, parts) in new {
            self.create_partitions(table, &parts).await?;
        }
        Ok(())
    }

    /// Notes a partition as registered. The set starts over at its bound: commits go
    /// to the newest partitions, which are noted again at their next commit, while a
    /// lake's whole history (hourly partitions of hundreds of tables over years) would
    /// otherwise stay in memory.
    fn remember(&mut self, table: &str, partition: &str) {
        if self.registered.len() >= REMEMBERED_PARTITIONS {
            self.registered.clear();
        }
        self.registered.insert((table.to_owned(), partition.to_owned()));
    }

    /// Points `table`'s `partition` at `folder` (a key prefix below the sink's root: a
    /// compaction's `{partition}/_c{tag}`), registering the partition first if Glue
    /// lacks it: Athena then reads the compacted files and not the files they replaced.
    /// Idempotent.
    pub async fn point_partition(&mut self, table: &str, partition: &str, folder: &str) -> Result<(), CatalogError> {
        self.create_partitions(table, &[partition]).await?;
        let name = table_name(table);
        let input = PartitionInput::builder()
            .set_values(Some(partition_values(partition)))
            .storage_descriptor(
                StorageDescriptor::builder()
                    .location(format!("{}{folder}/", self.root))
                    .input_format(INPUT_FORMAT)
                    .output_format(OUTPUT_FORMAT)
                    .serde_info(SerDeInfo::builder().serialization_library(SERDE).build())
                    .build(),
            )
            .build();
        self.client
            .update_partition()
            .database_name(&self.database)
            .table_name(&name)
            .set_partition_value_list(Some(partition_values(partition)))
            .partition_input(input)
            .send()
            .await
            .map_err(|e| glue_err("UpdatePartition", &name, e))?;
        tracing::info!(table = %name, partition, location = %folder, "pointed the Glue partition at its compacted files");
        Ok(())
    }

    /// The location Glue has for `table`'s `partition`, if registered.
    pub async fn partition_location(&self, table: &str, partition: &str) -> Result<Option<String>, CatalogError> {
        let name = table_name(table);
        match self
            .client
            .get_partition()
            .database_name(&self.database)
            .table_name(&name)
            .set_partition_values(Some(partition_values(partition)))
            .send()
            .await
        {
            Ok(out) => Ok(out
                .partition()
                .and_then(|p| p.storage_descriptor())
                .and_then(|d| d.location())
                .map(str::to_owned)),
            Err(e) => {
                let e = glue_err("GetPartition", &name, e);
                if e.message.contains("EntityNotFoundException") {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// `BatchCreatePartition` for `parts` of `table` (100 per call); one that exists
    /// already counts as created.
    async fn create_partitions(&mut self, table: &str, parts: &[&str]) -> Result<(), CatalogError> {
        let name = table_name(table);
        let (schema_name, bare) = table.split_once('.').unwrap_or(("public", table));
        for chunk in parts.chunks(PARTITION_BATCH) {
            let inputs: Vec<PartitionInput> = chunk
                .iter()
                .map(|p| {
                    PartitionInput::builder()
                        .set_values(Some(partition_values(p)))
                        .storage_descriptor(
                            StorageDescriptor::builder()
                                .location(format!("{}{}/{}/{}/", self.root, schema_name, bare, p))
                                .input_format(INPUT_FORMAT)
                                .output_format(OUTPUT_FORMAT)
                                .serde_info(SerDeInfo::builder().serialization_library(SERDE).build())
                                .build(),
                        )
                        .build()
                })
                .collect();
            let out = self
                .client
                .batch_create_partition()
                .database_name(&self.database)
                .table_name(&name)
                .set_partition_input_list(Some(inputs))
                .send()
                .await
                .map_err(|e| glue_err("BatchCreatePartition", &name, e))?;
            for e in out.errors() {
                let code = e.error_detail().and_then(|d| d.error_code()).unwrap_or("");
                if code != "AlreadyExistsException" {
                    let message = e.error_detail().and_then(|d| d.error_message()).unwrap_or("");
                    return Err(CatalogError {
                        operation: "BatchCreatePartition",
                        target: format!("{name} {:?}", e.partition_values()),
                        message: format!("{code}: {message}"),
                        hint: "",
                        retry: crate::retry::of_aws(Some(code)),
                        busy: crate::retry::is_aws_busy(Some(code)),
                    });
                }
            }
            for p in chunk {
                self.remember(table, p);
            }
            metrics::counter!(crate::telemetry::names::GLUE_PARTITIONS).increment(chunk.len() as u64);
            tracing::debug!(table = %name, partitions = chunk.len(), "registered partitions");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Years of partitions noted one by one: the set stays within its bound.
    #[tokio::test]
    async fn the_partitions_remembered_stay_bounded() {
        let cfg = crate::config::Config::parse(
            "[source]\nurl = \"postgres://u@h/d\"\npublication = \"p\"\nslot = \"s\"\n\
             [sink]\nurl = \"s3://lake/x\"\nregion = \"us-east-1\"\n\
             [catalog]\nkind = \"glue\"\ndatabase = \"d\"\nendpoint = \"http://127.0.0.1:9\"\n",
        )
        .unwrap();
        let mut c = Catalog::open(cfg.glue.as_ref().unwrap(), &cfg.sink, &cfg.partitions).await;
        for hour in 0..5 * 365 * 24 {
            for table in 0..30 {
                c.remember(&format!("public.t{table}"), &format!("dt=x/hour={hour}"));
                assert!(c.registered.len() <= REMEMBERED_PARTITIONS);
            }
        }
        assert!(
            c.registered
                .contains(&("public.t29".into(), format!("dt=x/hour={}", 5 * 365 * 24 - 1)))
        );
    }

    #[test]
    fn names_types_and_partition_values() {
        assert_eq!(table_name("public.trades"), "trades_changes");
        assert_eq!(table_name("Market.FX-Rates"), "market_fx_rates_changes");
        assert_eq!(hive_type(&DataType::Decimal128(12, 2)), "decimal(12,2)");
        assert_eq!(
            hive_type(&DataType::List(std::sync::Arc::new(arrow::datatypes::Field::new(
                "item",
                DataType::Int32,
                true
            )))),
            "array<int>"
        );
        assert_eq!(
            hive_type(&DataType::Timestamp(
                arrow::datatypes::TimeUnit::Microsecond,
                Some("UTC".into())
            )),
            "timestamp"
        );
        assert_eq!(partition_values("dt=2026-11-22/hour=05"), vec!["2026-11-22", "05"]);
        assert_eq!(partition_values("symbol=A%2FB%3D%25"), vec!["A/B=%"]);
        assert_eq!(partition_values("symbol=%E2%82%AC"), vec!["€"]);
    }
}
