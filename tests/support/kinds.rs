//! The type matrix: a table with one column of each common type, and rows of ordinary
//! and edge values (`tests/types.rs`, `tests/verify.rs`).

/// The `kinds` table and publication `pub` for it.
pub const SCHEMA: &str = r#"
CREATE EXTENSION hstore;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN price AS numeric(10,2);
CREATE DOMAIN dprice AS price;
CREATE TYPE pair AS (a int, b text);
CREATE TABLE kinds (
    id bigserial PRIMARY KEY, s smallint, i int, b bigint, n numeric(12,3), nu numeric, m money,
    r real, d double precision, c char(5), t text, by bytea, dt date, tm time, tz timetz,
    ts timestamp, tstz timestamptz, iv interval, u uuid, j json, jb jsonb, x xml, ip inet, cid cidr,
    mac macaddr, bt bit(4), vb varbit, tv tsvector, h hstore, rg int4range, mr int4multirange,
    e mood, dm posint, dmn dprice, cp pair, ai int[], at text[], a2 int[][], gen int GENERATED ALWAYS AS (i % 7) STORED
);
CREATE PUBLICATION pub FOR TABLE kinds;
"#;

/// Four rows: ordinary values, NULLs, extremes and oddities, more extremes.
pub const ROWS: &str = r#"
INSERT INTO kinds (s, i, b, n, nu, m, r, d, c, t, by, dt, tm, tz, ts, tstz, iv, u, j, jb, x, ip, cid, mac, bt, vb, tv, h, rg, mr, e, dm, dmn, cp, ai, at, a2) VALUES
 (1, 2, 3, 4.5, 6.75, 7.25, 1.5, 2.25, 'ab', 'plain', '\x0102', '2026-11-20', '09:30:00.123456', '09:30:00+02', '2026-11-20 09:30:00.000001',
  '2026-11-20 09:30:00.5+00', '1 day 02:03:04', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"k": [1, 2]}', '{"k": [1, 2]}', '<a>x</a>',
  '10.0.0.1/8', '10.0.0.0/8', '08:00:2b:01:02:03', B'1010', B'101', 'a fat cat', 'k=>v', '[1,5)', '{[1,2), [4,6)}', 'ok', 5, 12.5, '(1,x)',
  '{1,2,3}', '{a,b}', '{{1,NULL},{3,4}}'),
 (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (-32768, 2147483647, -9223372036854775808, -999999999.999, 'NaN', -92233720368547758.08, '-0', 'Infinity', '', E'日本語 🎉 \'q\' "dq" \\ \t',
  '\x00ff00', '0044-03-15 BC', '24:00:00', '00:00:00-12', '10000-01-01 00:00:00', '1969-12-31 23:59:59.999999+00', '-1 year -2 mons +3 days -04:05:06.7',
  '00000000-0000-0000-0000-000000000000', '[]', '{}', '', '::1', '::/0', 'ff:ff:ff:ff:ff:ff', B'0000', B'', '', '', 'empty', '{}', 'sad', 1, -99999999.99,
  '(,"")', '{NULL,-1,NULL}', '{"a,b",NULL,"","\"q\"","NULL"}', '{{{1}},{{2}}}'),
 (0, 0, 0, 0, 1e-20, 0, 'NaN', '-Infinity', 'x    ', repeat('0123456789abcdef', 65536), '\x', '4713-01-01 BC', '00:00:00', '23:59:59.999999+14',
  '4713-01-01 00:00:00 BC', '100000-12-31 23:59:59.999999+00', '0', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 'null', '"s"', '<r/>', '0.0.0.0',
  '0.0.0.0/32', '00:00:00:00:00:00', B'1111', B'1', 'a:1 b:2', 'a=>NULL', '(,)', '{}', 'happy', 2147483647, 0, '(0,)', '{}', '{}', '{}');
"#;
