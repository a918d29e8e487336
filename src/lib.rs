//! walshore replicates a PostgreSQL publication into partitioned Parquet on an object
//! store, continuously and exactly once.
//!
//! ```text
//!  PostgreSQL WAL ──► source ──► decode ──► batch ──► sink ──► checkpoint
//!  (slot, pgoutput)  (replication (pgoutput   (per-table  (Parquet    (commit log,
//!                     protocol)    messages)   Arrow)      objects)    fencing)
//!                         ▲                                              │
//!                         └──────── confirm only the committed LSN ◄─────┘
//! ```
//!
//! Table copies run beside the stream ([`snapshot`]): a new lake copies every published
//! table under the slot's exported snapshot, later tables and re-snapshots under a
//! temporary slot's, and each table's changes are written from its snapshot point on.
//! One task per stage with bounded channels between them, so a slow sink slows the
//! source instead of growing memory. Exactly once, in brief: data files are named by the
//! row positions they hold, so a replay rewrites identical objects; a file becomes part
//! of the lake only when a commit record naming it is created with a conditional PUT;
//! PostgreSQL hears only LSNs whose records are durable; on start-up, whatever a crash
//! left uncommitted is deleted and streamed again. The full argument is in
//! [`checkpoint`].

pub mod batch;
pub mod catalog;
pub mod change;
pub mod checkpoint;
pub mod cluster;
pub mod compaction;
pub mod config;
pub mod decode;
pub mod demo;
pub mod fault;
pub mod iceberg;
pub mod lake;
pub mod lsn;
pub mod notify;
pub mod pipeline;
pub mod preflight;
pub mod redact;
pub mod resnapshot;
pub mod retry;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod verify;
