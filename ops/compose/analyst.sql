-- What an analyst asks of the compose lake, with DuckDB straight from S3 (moto):
--   duckdb < ops/compose/analyst.sql
-- Each table's files hold its changes; the current state is each key's last change by
-- (_lsn, _seq), unless that change is a delete. (This load never truncates; the views of
-- `walshore athena-sql` also apply truncates and unchanged TOAST values.)
INSTALL httpfs;
LOAD httpfs;
CREATE SECRET lake (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1',
                    ENDPOINT 'localhost:5000', USE_SSL false, URL_STYLE 'path');

-- Latest price per symbol.
SELECT symbol, arg_max(bid, ts) AS bid, arg_max(ask, ts) AS ask, max(ts) AS quoted_at
FROM (
    SELECT * FROM read_parquet('s3://lake/trading/public/prices/*/*.parquet')
    QUALIFY row_number() OVER (PARTITION BY symbol, ts ORDER BY _lsn DESC, _seq DESC) = 1
)
WHERE _op <> 'D'
GROUP BY symbol
ORDER BY symbol;

-- Position per trader.
SELECT trader, sum(CASE side WHEN 'B' THEN quantity ELSE -quantity END) AS position, count(*) AS trades
FROM (
    SELECT * FROM read_parquet('s3://lake/trading/public/trades/*/*.parquet')
    QUALIFY row_number() OVER (PARTITION BY id ORDER BY _lsn DESC, _seq DESC) = 1
)
WHERE _op <> 'D'
GROUP BY trader
ORDER BY trader;
