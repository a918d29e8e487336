-- Example Athena queries for the demo's trading schema (`walshore demo`; the current-
-- state views come from `walshore athena-sql --config FILE`). Replace trading_cdc with
-- your catalog.database.

-- VWAP per symbol per minute, from every trade in the change log (inserts and
-- snapshot rows; a trade later corrected contributes its latest version only through
-- the view, so this query reads the view).
SELECT symbol,
       date_trunc('minute', traded_at) AS minute,
       sum(price * quantity) / sum(quantity) AS vwap,
       sum(quantity) AS volume
FROM trading_cdc.trades
GROUP BY symbol, date_trunc('minute', traded_at)
ORDER BY symbol, minute;

-- Latest price per symbol.
SELECT symbol, ts, bid, ask
FROM (
    SELECT symbol, ts, bid, ask,
           row_number() OVER (PARTITION BY symbol ORDER BY ts DESC) AS rn
    FROM trading_cdc.prices
)
WHERE rn = 1
ORDER BY symbol;

-- Position per trader and symbol (buys minus sells).
SELECT trader, symbol,
       sum(CASE side WHEN 'B' THEN quantity ELSE -quantity END) AS position
FROM trading_cdc.trades
GROUP BY trader, symbol
ORDER BY trader, symbol;

-- Freshness: how far behind PostgreSQL each table's lake is, from the change log.
SELECT max(_commit_ts) AS newest_commit, current_timestamp - max(_commit_ts) AS behind
FROM trading_cdc.trades_changes
WHERE dt >= cast(current_date - interval '1' day AS varchar);
