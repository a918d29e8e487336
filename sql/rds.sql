-- walshore on Amazon RDS for PostgreSQL and Aurora PostgreSQL: what the DBA runs.
-- Run as the master user (a member of rds_superuser) in the database to replicate.
-- Replace the table list. tests/ops.rs runs this file on a test cluster, with stand-ins
-- for the roles RDS provides, so it stays valid SQL that does what it says.

-- 1. The DB parameter group (console, CLI or ops/cdk; these are not SQL):
--      rds.logical_replication = 1        -- sets wal_level = logical; needs a reboot
--      max_replication_slots    >= 5      -- walshore needs one; leave room for others
--      max_wal_senders          >= 5
--      max_slot_wal_keep_size   = 100000  -- MB. Bounds the WAL a stalled slot may hold
--                                         -- (PostgreSQL 13+). Past it the slot is
--                                         -- invalidated rather than the disk filled:
--                                         -- walshore then stops with "replication slot
--                                         -- disappeared" and the lake needs a new copy
--                                         -- (snapshot.mode = "initial", a new slot).
--                                         -- Size it to hours of your WAL rate, well
--                                         -- below the free storage, and alarm before it
--                                         -- (OldestLogicalReplicationSlotLag, ops/cdk).
--    Aurora: rds.logical_replication lives in the DB *cluster* parameter group.
--    Check after the reboot:
SHOW wal_level;                 -- logical

-- 2. A role for walshore that can replicate and read the published tables, no more.
--    RDS does not let anyone grant the REPLICATION attribute; rds_replication is the
--    role that carries it.
CREATE ROLE walshore LOGIN;
GRANT rds_replication TO walshore;
GRANT USAGE ON SCHEMA public TO walshore;
GRANT SELECT ON public.trades, public.prices, public.fx_rates, public.news TO walshore;
-- walshore reads the catalog (pg_publication_rel, pg_replication_slots,
-- pg_stat_activity), which every role may read; it creates nothing in the database but
-- its replication slot.

-- 3. How walshore logs in: either IAM database authentication (no password anywhere;
--    source.auth = "iam", the instance needs "IAM database authentication" enabled)...
GRANT rds_iam TO walshore;
--    ...or a password kept in Secrets Manager and injected as PGPASSWORD (ops/cdk):
-- ALTER ROLE walshore PASSWORD '...';
--    (A role in rds_iam can only log in with IAM tokens: choose one.)

-- 4. The publication. The master user owns the tables, so it creates it.
CREATE PUBLICATION walshore FOR TABLE public.trades, public.prices, public.fx_rates, public.news;
--    Tables without a primary key need REPLICA IDENTITY FULL before they are published:
-- ALTER TABLE public.news REPLICA IDENTITY FULL;

-- 5. Watching the slot: the WAL it holds, and whether walshore is attached.
SELECT slot_name, active, wal_status,
       pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) AS retained_wal
FROM pg_replication_slots WHERE slot_name = 'walshore';

-- 6. Decommissioning: stop walshore for good, then drop its slot, or the database keeps
--    every WAL segment from then on until its storage fills. (walshore creates the slot
--    again on its next start.)
-- SELECT pg_drop_replication_slot('walshore');
-- DROP PUBLICATION walshore;
-- DROP OWNED BY walshore; DROP ROLE walshore;
