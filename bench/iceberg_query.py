"""Times current-state queries in DuckDB over a walshore lake: the fold over the change
log (each key's last change by (_lsn, _seq) after the last truncate, deletes dropped)
against the Iceberg table walshore keeps. Prints JSON: per query its median seconds, every run's, and its result.

  python3 bench/iceberg_query.py LAKE SCHEMA.TABLE KEY KEY_VALUE COL1,COL2,... RUNS
"""
import json
import os
import statistics
import sys
import time

import duckdb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "py"))
import duckdb_ext  # noqa: E402


lake, table, key, value, columns, runs = sys.argv[1:6] + [int(sys.argv[6])]
cols = ", ".join(f"{c}::VARCHAR" for c in columns.split(","))
schema, name = table.split(".")
# By name: files written before a column was added lack it.
files = f"read_parquet('{lake}/{schema}/{name}/*/*.parquet', union_by_name = true, hive_partitioning = false)"
# A truncate ends every row before it.
log = (
    f"(SELECT * FROM {files} WHERE (_lsn, _seq) > (SELECT coalesce(max((_lsn, _seq)), (-1, -1)) "
    f"FROM {files} WHERE _op = 'T'))"
)
ice = f"iceberg_scan('{lake}/_iceberg/{schema}/{name}')"
queries = {
    "fold count": f"SELECT count(*) FROM (SELECT _op FROM {log} "
    f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY _lsn DESC, _seq DESC) = 1) WHERE _op <> 'D'",
    "iceberg count": f"SELECT count(*) FROM {ice}",
    "fold point": f"SELECT {cols} FROM (SELECT * FROM {log} WHERE {key} = '{value}' "
    f"QUALIFY row_number() OVER (ORDER BY _lsn DESC, _seq DESC) = 1) WHERE _op <> 'D'",
    "iceberg point": f"SELECT {cols} FROM {ice} WHERE {key} = '{value}'",
}
db = duckdb.connect(config={"allow_unsigned_extensions": "true"})
db.execute("SET TimeZone = 'UTC'")
duckdb_ext.load(db, "avro", "iceberg")
out = {}
for label, sql in queries.items():
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = db.execute(sql).fetchall()
        times.append(time.perf_counter() - started)
    out[label] = {
        "median": statistics.median(times),
        "runs": times,
        "result": [[str(v) for v in row] for row in result],
    }
print(json.dumps(out))
