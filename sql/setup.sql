-- What a DBA runs once, as a superuser (or rds_superuser), in the database to replicate.
-- Replace the table list and the password.

-- 1. The server: wal_level = logical (postgresql.conf, restart needed).
--    Amazon RDS / Aurora: set rds.logical_replication = 1 in the DB parameter group
--    and reboot. Check with: SHOW wal_level;

-- 2. A role for walshore: it logs in, may replicate, and may read the published tables.
CREATE ROLE replicator LOGIN REPLICATION PASSWORD 'change-me';
-- On RDS/Aurora the REPLICATION attribute cannot be granted; use instead:
-- GRANT rds_replication TO replicator;
GRANT USAGE ON SCHEMA public TO replicator;
GRANT SELECT ON public.trades, public.prices, public.fx_rates, public.news TO replicator;

-- 3. The publication: what is replicated.
CREATE PUBLICATION walshore FOR TABLE public.trades, public.prices, public.fx_rates, public.news;

-- 4. Tables without a primary key need REPLICA IDENTITY FULL, or PostgreSQL rejects
--    their UPDATEs and DELETEs once published. FULL also lets walshore fill unchanged
--    TOASTed values from the old row:
-- ALTER TABLE public.news REPLICA IDENTITY FULL;

-- 5. pg_hba.conf must allow the role both ordinary and replication connections, e.g.
--    host  trading      replicator  10.0.0.0/8  scram-sha-256
--    host  replication  replicator  10.0.0.0/8  scram-sha-256
--    (RDS/Aurora: nothing to do.)

-- Then: walshore check --config config.toml
