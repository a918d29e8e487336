//! The slot as PostgreSQL sees it, sampled on the ordinary connection: how much WAL it
//! holds, how far its confirmed position trails the server, and how close it is to
//! being invalidated by `max_slot_wal_keep_size`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::names;
use crate::config::ConnParams;

/// Warn when the WAL that can still be written before the slot is invalidated falls
/// below this share of `max_slot_wal_keep_size`.
const SAFE_SHARE_WARN: f64 = 0.2;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub active: bool,
    /// `reserved`, `extended`, `unreserved`, `lost` (None before the slot reserved WAL).
    pub wal_status: Option<String>,
    /// `pg_current_wal_lsn() - restart_lsn`.
    pub retained_bytes: Option<i64>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub confirmed_lag_bytes: Option<i64>,
    /// NULL when `max_slot_wal_keep_size = -1` (no limit).
    pub safe_wal_size: Option<i64>,
    /// `max_slot_wal_keep_size` in bytes; None when unlimited.
    pub keep_size: Option<i64>,
}

/// One sample of `slot`; Ok(None) when it does not exist.
pub async fn sample(client: &tokio_postgres::Client, slot: &str) -> Result<Option<Sample>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT active, wal_status,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
                    safe_wal_size,
                    (SELECT CASE WHEN setting::bigint < 0 THEN NULL ELSE setting::bigint * 1024 * 1024 END
                       FROM pg_catalog.pg_settings WHERE name = 'max_slot_wal_keep_size')
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| Sample {
        active: r.get(0),
        wal_status: r.get(1),
        retained_bytes: r.get(2),
        confirmed_lag_bytes: r.get(3),
        safe_wal_size: r.get(4),
        keep_size: r.get(5),
    }))
}

impl Sample {
    /// What is wrong or about to be, in words with the fix; None when the slot is safe.
    pub fn risk(&self, slot: &str) -> Option<String> {
        match self.wal_status.as_deref() {
            Some("lost") => {
                return Some(format!(
                    "slot {slot:?} has lost WAL it needed (max_slot_wal_keep_size exceeded): the lake cannot continue it; drop the slot and start a new lake with an initial snapshot"
                ));
            }
            Some("unreserved") => {
                return Some(format!(
                    "slot {slot:?} holds more WAL than max_slot_wal_keep_size allows (wal_status unreserved): it is invalidated at the next checkpoint unless walshore catches up; look at why it is behind, or raise max_slot_wal_keep_size"
                ));
            }
            _ => {}
        }
        if let (Some(safe), Some(keep)) = (self.safe_wal_size, self.keep_size)
            && keep > 0
            && (safe as f64) < keep as f64 * SAFE_SHARE_WARN
        {
            return Some(format!(
                "slot {slot:?} is {} MiB of WAL away from being invalidated (safe_wal_size; max_slot_wal_keep_size is {} MiB): walshore is behind or stopped; catch up, or raise max_slot_wal_keep_size",
                safe.max(0) >> 20,
                keep >> 20
            ));
        }
        None
    }

    fn record(&self) {
        metrics::gauge!(names::SLOT_ACTIVE).set(f64::from(u8::from(self.active)));
        if let Some(b) = self.retained_bytes {
            metrics::gauge!(names::SLOT_RETAINED).set(b as f64);
        }
        if let Some(b) = self.confirmed_lag_bytes {
            metrics::gauge!(names::SLOT_CONFIRMED_LAG).set(b as f64);
        }
        if let Some(b) = self.safe_wal_size {
            metrics::gauge!(names::SLOT_SAFE_WAL).set(b as f64);
        }
        for status in ["reserved", "extended", "unreserved", "lost"] {
            let on = self.wal_status.as_deref() == Some(status);
            metrics::gauge!(names::SLOT_WAL_STATUS, "status" => status).set(f64::from(u8::from(on)));
        }
        metrics::gauge!(names::SLOT_SAMPLED).set(super::unix_now());
    }
}

/// Samples the slot every `interval` until `stop`, recording the gauges and warning
/// (once per change of the risk) when the slot nears invalidation. Never fails: an
/// unreachable server is counted and tried again.
pub async fn sampler(conn: ConnParams, slot: String, interval: Duration, stop: CancellationToken) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut warned: Option<String> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = tokio::time::timeout(interval, crate::source::sql::connect(&conn))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some(c) = &client else {
            metrics::counter!(names::SLOT_SAMPLE_ERRORS).increment(1);
            continue;
        };
        match tokio::time::timeout(interval, sample(c, &slot)).await {
            Ok(Ok(Some(s))) => {
                s.record();
                let risk = s.risk(&slot);
                if risk.is_some() && risk != warned {
                    tracing::warn!("{}", risk.as_deref().unwrap_or_default());
                }
                warned = risk;
            }
            Ok(Ok(None)) => {}
            Ok(Err(_)) | Err(_) => {
                metrics::counter!(names::SLOT_SAMPLE_ERRORS).increment(1);
                client = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn risk_names_lost_unreserved_and_a_slot_near_its_limit() {
        let safe = Sample {
            wal_status: Some("reserved".into()),
            safe_wal_size: Some(900 << 20),
            keep_size: Some(1024 << 20),
            ..Default::default()
        };
        assert_eq!(safe.risk("s"), None);
        let near = Sample {
            safe_wal_size: Some(100 << 20),
            ..safe.clone()
        };
        assert!(near.risk("s").unwrap().contains("100 MiB of WAL away"));
        let unlimited = Sample {
            safe_wal_size: None,
            keep_size: None,
            ..safe.clone()
        };
        assert_eq!(unlimited.risk("s"), None);
        let lost = Sample {
            wal_status: Some("lost".into()),
            ..safe.clone()
        };
        assert!(lost.risk("s").unwrap().contains("lost WAL"));
        let unreserved = Sample {
            wal_status: Some("unreserved".into()),
            ..safe
        };
        assert!(unreserved.risk("s").unwrap().contains("unreserved"));
    }
}
