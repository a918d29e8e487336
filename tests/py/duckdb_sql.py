"""Runs a DuckDB SQL file as a user would (`duckdb < FILE`) and prints, as JSON, the rows
of each statement that returns some, values as text.

  python3 tests/py/duckdb_sql.py FILE [FROM TO]...
      FROM/TO pairs are replaced in the file's text first (the test servers' addresses).

Offline: `INSTALL httpfs` and `INSTALL iceberg` (downloads) are skipped, `LOAD httpfs`
loads the extension from the duckdb-extension-httpfs package on PyPI, and `LOAD iceberg`
the avro and iceberg extensions from theirs.
"""
import json
import os
import sys

import duckdb
import duckdb_extension_httpfs

path, pairs = sys.argv[1], sys.argv[2:]
text = open(path).read()
for old, new in zip(pairs[::2], pairs[1::2]):
    text = text.replace(old, new)
ext = os.path.join(os.path.dirname(duckdb_extension_httpfs.__file__), "extensions", "v1.5.5", "httpfs.duckdb_extension")

db = duckdb.connect(config={"allow_unsigned_extensions": "true"})
db.execute("SET TimeZone = 'UTC'")
results = []
for stmt in text.split(";\n"):
    body = "\n".join(l for l in stmt.splitlines() if not l.strip().startswith("--")).strip()
    if not body:
        continue
    if body.upper() in ("INSTALL HTTPFS", "INSTALL ICEBERG"):
        continue
    if body.upper() == "LOAD ICEBERG":
        import duckdb_ext

        duckdb_ext.load(db, "avro", "iceberg")
        continue
    if body.upper() == "LOAD HTTPFS":
        db.execute(f"LOAD '{ext}'")
        continue
    if body.upper().startswith(("SELECT", "WITH")):
        # As text, rendered by DuckDB itself (timestamps in UTC).
        rows = db.execute(f"SELECT COLUMNS(*)::VARCHAR FROM ({body})").fetchall()
        results.append([list(row) for row in rows])
    else:
        db.execute(body)
print(json.dumps(results))
