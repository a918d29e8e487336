//! Apache Iceberg v2 current-state tables (issue 26; design in
//! `docs/design/iceberg.md`, the spec as readers enforce it in
//! `docs/design/iceberg-spec-notes.md`).
//!
//! Built so far: the bucket transform, the mapping of lake types to Iceberg's, Avro
//! manifests and manifest lists, table metadata, and a table by path that commits
//! snapshots of added rows, position deletes and truncates. DuckDB and pyiceberg read
//! what it writes (tests/iceberg.rs). Not yet: the projector that keeps a table equal
//! to the change log, Glue, schema evolution, compaction and expiry.

pub mod bucket;
pub mod fold;
pub mod manifest;
pub mod metadata;
pub mod projector;
pub mod schema;
pub mod table;
