-- The trading schema of the demo (`walshore demo`), of docker-compose.yml and of the
-- load in ops/trading.pgbench: trades, prices, FX rates and news.
CREATE TABLE trades (
    id          bigserial PRIMARY KEY,
    symbol      text NOT NULL,
    side        char(1) NOT NULL,
    quantity    integer NOT NULL,
    price       numeric(18,6) NOT NULL,
    trader      text NOT NULL,
    traded_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE prices (
    symbol      text NOT NULL,
    ts          timestamptz NOT NULL,
    bid         numeric(18,6),
    ask         numeric(18,6),
    PRIMARY KEY (symbol, ts)
);
CREATE TABLE fx_rates (
    pair        text PRIMARY KEY,
    rate        numeric(20,10) NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE news (
    id           bigserial PRIMARY KEY,
    headline     text NOT NULL,
    body         text,
    tags         text[],
    published_at timestamptz NOT NULL DEFAULT now()
);
