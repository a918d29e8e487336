//! Slot management and the CopyBoth replication stream.
//! <https://www.postgresql.org/docs/current/protocol-replication.html>

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::conn::Conn;
use super::{PgError, SourceError};
use crate::change::PG_EPOCH_OFFSET_MICROS;
use crate::config::SourceConfig;
use crate::lsn::Lsn;

/// What the stream delivered.
pub enum XLog {
    /// A pgoutput message starting at `wal_start`.
    Data { wal_start: Lsn, data: Bytes },
    /// The server has sent everything up to `wal_end`.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// The slot as PostgreSQL reports it.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush: Lsn,
    pub created: bool,
    /// The snapshot exported at creation (`EXPORT_SNAPSHOT`): valid only while this
    /// replication connection stays idle.
    pub snapshot: Option<String>,
}

/// IDENTIFY_SYSTEM's answer.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    /// The server's WAL flush position when asked.
    pub xlogpos: Lsn,
}

pub struct Replication {
    conn: Conn,
    pub server_version: u32,
    pub backend_pid: i32,
    confirmed: Lsn,
    /// Standby status updates sent.
    updates: u64,
}

/// What the stream cost on walshore's side of the wire so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct WireStats {
    /// Socket reads of the stream, and the bytes they returned.
    pub reads: u64,
    pub bytes: u64,
    /// Standby status updates (feedback) sent.
    pub status_updates: u64,
}

/// Quotes an identifier the way `quote_ident` does.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn identify(conn: &mut Conn) -> Result<SystemInfo, SourceError> {
    let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
    let row = rows
        .first()
        .ok_or_else(|| SourceError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
    let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    Ok(SystemInfo {
        system_id: field(0),
        timeline: field(1).parse().unwrap_or(0),
        xlogpos: field(2)
            .parse()
            .map_err(|_| SourceError::Protocol(format!("IDENTIFY_SYSTEM xlogpos {:?}", field(2))))?,
    })
}

fn one_value(rows: &[Vec<Option<String>>]) -> Option<&str> {
    rows.first().and_then(|r| r.first()).and_then(|v| v.as_deref())
}

impl Replication {
    fn new(conn: Conn, confirmed: Lsn) -> Replication {
        Replication {
            server_version: conn.server_version,
            backend_pid: conn.backend_pid,
            conn,
            confirmed,
            updates: 0,
        }
    }

    /// Connects, checks `wal_level` and the publication, and creates the slot if it is
    /// missing (idempotent: a concurrent creation is taken as success). With
    /// `export_snapshot` the slot is (re)created with an exported snapshot for the
    /// initial copy, and the connection must stay idle until the copy has imported it.
    pub async fn open(
        cfg: &SourceConfig,
        export_snapshot: bool,
    ) -> Result<(Replication, SlotState, SystemInfo), SourceError> {
        let mut conn = Conn::connect(&cfg.conn).await?;
        let wal_level = conn.simple_query("SHOW wal_level").await?;
        if one_value(&wal_level) != Some("logical") {
            return Err(SourceError::Setup(format!(
                "wal_level is {:?} on {}, logical replication needs \"logical\": set wal_level = logical \
                 (on Amazon RDS/Aurora: rds.logical_replication = 1 in the parameter group) and restart PostgreSQL",
                one_value(&wal_level).unwrap_or("unknown"),
                cfg.conn.redacted()
            )));
        }
        let publication = conn
            .simple_query(&format!(
                "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = {}",
                quote_literal(&cfg.publication)
            ))
            .await?;
        if publication.is_empty() {
            return Err(SourceError::Setup(format!(
                "publication {:?} does not exist in database {:?}: create it, e.g. CREATE PUBLICATION {} FOR TABLE ...; (see sql/setup.sql), or fix source.publication",
                cfg.publication,
                cfg.conn.dbname,
                quote_ident(&cfg.publication)
            )));
        }
        // Before the slot: a command after CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT
        // would end the exported snapshot.
        let mut system = identify(&mut conn).await?;
        // IDENTIFY_SYSTEM reports the flush position; asynchronously committed
        // transactions may sit beyond it. `sync` promises everything committed, so its
        // target is the insert position (the walsender streams it once flushed).
        let insert = conn
            .simple_query("SELECT pg_catalog.pg_current_wal_insert_lsn()")
            .await?;
        if let Some(lsn) = one_value(&insert).and_then(|s| s.parse().ok()) {
            system.xlogpos = system.xlogpos.max(lsn);
        }
        let slot = Self::ensure_slot(&mut conn, cfg, export_snapshot).await?;
        Ok((Replication::new(conn, slot.confirmed_flush), slot, system))
    }

    /// A consistent point for a copy made while the stream runs: a temporary slot,
    /// created with an exported snapshot on a connection of its own. Transactions that
    /// commit before the returned LSN are in the snapshot, the others are not. The
    /// snapshot lives while the returned connection stays idle; closing it drops the
    /// slot (PostgreSQL drops a temporary slot with its session, a crash included).
    pub async fn export_temporary(cfg: &SourceConfig) -> Result<(Replication, String, Lsn), SourceError> {
        let mut conn = Conn::connect(&cfg.conn).await?;
        let slot: String = cfg.slot.chars().take(40).collect();
        let name = format!("{slot}_copy_{:08x}", rand::random::<u32>());
        let rows = match conn
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(&name)
            ))
            .await
        {
            Ok(rows) => rows,
            Err(SourceError::Server(e)) if e.code == "53400" => {
                return Err(SourceError::Setup(format!(
                    "copying a table while streaming needs one more replication slot and WAL sender for a moment: {e}; raise max_replication_slots and max_wal_senders by one"
                )));
            }
            Err(e) => return Err(e),
        };
        let field = |i: usize| rows.first().and_then(|r| r.get(i)).cloned().flatten();
        let lsn = field(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| SourceError::Protocol("CREATE_REPLICATION_SLOT returned no consistent point".into()))?;
        let snapshot =
            field(2).ok_or_else(|| SourceError::Protocol("CREATE_REPLICATION_SLOT exported no snapshot".into()))?;
        Ok((Replication::new(conn, lsn), snapshot, lsn))
    }

    /// Connects in replication mode and runs IDENTIFY_SYSTEM, nothing else (preflight).
    pub async fn probe(cfg: &SourceConfig) -> Result<(SystemInfo, u32), SourceError> {
        let mut conn = Conn::connect(&cfg.conn).await?;
        let system = identify(&mut conn).await?;
        let version = conn.server_version;
        conn.terminate().await;
        Ok((system, version))
    }

    async fn ensure_slot(conn: &mut Conn, cfg: &SourceConfig, export_snapshot: bool) -> Result<SlotState, SourceError> {
        let query = format!(
            "SELECT plugin, database, confirmed_flush_lsn, active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            quote_literal(&cfg.slot)
        );
        let mut rows = conn.simple_query(&query).await?;
        // A walsender whose client just died (a restart after a crash) releases the slot
        // when it notices the closed socket: give it a moment before calling it taken.
        for _ in 0..10 {
            if rows.first().is_none_or(|r| r[3].is_none()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            rows = conn.simple_query(&query).await?;
        }
        if let Some(row) = rows.first() {
            let plugin = row[0].as_deref().unwrap_or("");
            let database = row[1].as_deref().unwrap_or("");
            if plugin != "pgoutput" || database != cfg.conn.dbname {
                return Err(SourceError::Setup(format!(
                    "replication slot {:?} exists but is for plugin {plugin:?} in database {database:?}, not pgoutput in {:?}; choose another source.slot or drop it with SELECT pg_drop_replication_slot('{}')",
                    cfg.slot, cfg.conn.dbname, cfg.slot
                )));
            }
            if let Some(pid) = row[3].as_deref() {
                return Err(SourceError::SlotInUse {
                    slot: cfg.slot.clone(),
                    holder: slot_holder(conn, pid).await,
                });
            }
            if !export_snapshot {
                let confirmed = row[2].as_deref().and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO);
                return Ok(SlotState {
                    confirmed_flush: confirmed,
                    created: false,
                    snapshot: None,
                });
            }
            // The lake does not continue this slot's stream yet: its first copies and
            // the slot must share one consistent point, so start both afresh.
            tracing::info!(slot = %cfg.slot, "recreating the slot for a new initial snapshot");
            match conn
                .simple_query(&format!("DROP_REPLICATION_SLOT {}", quote_ident(&cfg.slot)))
                .await
            {
                Ok(_) => {}
                // Dropped meanwhile by another starting instance: create it below.
                Err(SourceError::Server(e)) if e.code == "42704" => {}
                Err(SourceError::Server(e)) if e.code == "55006" => {
                    return Err(SourceError::SlotInUse {
                        slot: cfg.slot.clone(),
                        holder: e.message,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let create = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}",
            quote_ident(&cfg.slot),
            if export_snapshot {
                "EXPORT_SNAPSHOT"
            } else {
                "NOEXPORT_SNAPSHOT"
            }
        );
        match conn.simple_query(&create).await {
            Ok(rows) => {
                let consistent = rows
                    .first()
                    .and_then(|r| r.get(1))
                    .and_then(|v| v.as_deref())
                    .and_then(|s| s.parse().ok());
                let snapshot = rows.first().and_then(|r| r.get(2)).cloned().flatten();
                tracing::info!(slot = %cfg.slot, consistent_point = ?consistent.map(|l: Lsn| l.to_string()), "created replication slot");
                Ok(SlotState {
                    confirmed_flush: consistent.unwrap_or(Lsn::ZERO),
                    created: true,
                    snapshot: snapshot.filter(|_| export_snapshot),
                })
            }
            // Someone created it between our look and our create: same outcome.
            Err(SourceError::Server(PgError { code, .. })) if code == "42710" && !export_snapshot => {
                Box::pin(Self::ensure_slot(conn, cfg, false)).await
            }
            // A new lake needs the slot's own snapshot: another instance starting on
            // the same configuration created it first.
            Err(SourceError::Server(PgError { code, .. })) if code == "42710" => Err(SourceError::SlotInUse {
                slot: cfg.slot.clone(),
                holder: "another process created it while this instance was starting: another walshore is starting on the same configuration".into(),
            }),
            Err(SourceError::Server(e)) if e.code == "42501" => Err(SourceError::Setup(format!(
                "user {:?} may not create replication slots: {e}; GRANT it the REPLICATION attribute (ALTER ROLE {} REPLICATION; on RDS: GRANT rds_replication TO {})",
                cfg.conn.user,
                quote_ident(&cfg.conn.user),
                quote_ident(&cfg.conn.user)
            ))),
            Err(e) => Err(e),
        }
    }

    /// A plain SQL query on the replication connection (before `start`).
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        self.conn.simple_query(sql).await
    }

    /// Starts streaming from `start` (the committed position).
    pub async fn start(&mut self, cfg: &SourceConfig, start: Lsn) -> Result<(), SourceError> {
        let publication = quote_literal(&quote_ident(&cfg.publication));
        let options = if self.server_version >= 140000 {
            format!("proto_version '2', publication_names {publication}, streaming 'on'")
        } else {
            format!("proto_version '1', publication_names {publication}")
        };
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({options})",
            quote_ident(&cfg.slot)
        );
        match self.conn.start_copy_both(&sql).await {
            Ok(()) => self.conn.read_in_gulps(),
            Err(SourceError::Server(e)) if e.code == "55006" => Err(SourceError::SlotInUse {
                slot: cfg.slot.clone(),
                holder: e.message,
            }),
            Err(SourceError::Server(e)) if e.code == "55000" => Err(SourceError::Setup(format!(
                "replication slot {:?} cannot be used: {e}; PostgreSQL removed WAL the lake still needs (max_slot_wal_keep_size exceeded?), so the lake cannot be continued from it: drop the slot and start a new lake with an initial snapshot",
                cfg.slot
            ))),
            Err(SourceError::Server(e)) if e.code == "42704" => Err(SourceError::SlotGone {
                slot: cfg.slot.clone(),
                detail: e.to_string(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The next message from the server. Cancel-safe.
    pub async fn next(&mut self) -> Result<XLog, SourceError> {
        loop {
            let f = self.conn.read_frame().await?;
            if let Some(x) = Self::parse_frame(f.tag, f.body)? {
                return Ok(x);
            }
        }
    }

    /// A message already received, without waiting.
    pub fn try_next(&mut self) -> Result<Option<XLog>, SourceError> {
        while let Some(f) = self.conn.try_frame()? {
            if let Some(x) = Self::parse_frame(f.tag, f.body)? {
                return Ok(Some(x));
            }
        }
        Ok(None)
    }

    fn parse_frame(tag: u8, mut body: Bytes) -> Result<Option<XLog>, SourceError> {
        match tag {
            b'd' => {}
            b'E' => return Err(SourceError::Server(PgError::parse(&body))),
            // CopyDone, or (a walsender ending the stream at server shutdown) the
            // command's completion: the stream is over, reconnect.
            b'c' | b'C' | b'Z' => {
                return Err(SourceError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server ended the replication stream",
                )));
            }
            b'N' | b'S' => return Ok(None),
            other => {
                return Err(SourceError::Protocol(format!(
                    "unexpected message {:?} in replication stream",
                    other as char
                )));
            }
        }
        match body.first() {
            Some(b'w') if body.len() >= 25 => {
                body.advance(1);
                let wal_start = Lsn(body.get_u64());
                let _wal_end = body.get_u64();
                let _send_time = body.get_i64();
                Ok(Some(XLog::Data { wal_start, data: body }))
            }
            Some(b'k') if body.len() >= 18 => {
                body.advance(1);
                let wal_end = Lsn(body.get_u64());
                let _ts = body.get_i64();
                Ok(Some(XLog::Keepalive {
                    wal_end,
                    reply_requested: body.get_u8() == 1,
                }))
            }
            _ => Err(SourceError::Protocol("malformed CopyData in replication stream".into())),
        }
    }

    /// Standby status update carrying `lsn` as written, flushed and applied. Never moves
    /// the confirmed position backward.
    pub async fn confirm(&mut self, lsn: Lsn, request_reply: bool) -> Result<(), SourceError> {
        self.confirmed = self.confirmed.max(lsn);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let mut b = BytesMut::with_capacity(34);
        b.put_u8(b'r');
        for _ in 0..3 {
            b.put_u64(self.confirmed.0);
        }
        b.put_i64(now - PG_EPOCH_OFFSET_MICROS);
        b.put_u8(u8::from(request_reply));
        self.updates += 1;
        self.conn.send_copy_data(&b).await
    }

    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    pub fn wire_stats(&self) -> WireStats {
        let (reads, bytes) = self.conn.stream_reads();
        WireStats {
            reads,
            bytes,
            status_updates: self.updates,
        }
    }

    pub async fn close(self) {
        self.conn.terminate().await;
    }
}

/// Who holds a slot: the walsender's client as `pg_stat_replication` shows it.
async fn slot_holder(conn: &mut Conn, pid: &str) -> String {
    let query = format!(
        "SELECT application_name, coalesce(host(client_addr), 'local socket'), client_port, backend_start FROM pg_catalog.pg_stat_replication WHERE pid = {}",
        quote_literal(pid)
    );
    match conn.simple_query(&query).await {
        Ok(rows) if !rows.is_empty() => {
            let r = &rows[0];
            let v = |i: usize| r[i].as_deref().unwrap_or("?").to_owned();
            format!(
                "PostgreSQL walsender pid {pid} for application {:?} at {}:{}, connected since {}",
                v(0),
                v(1),
                v(2),
                v(3)
            )
        }
        _ => format!("PostgreSQL backend pid {pid}"),
    }
}
