"""Reads an Iceberg table by path with an independent reader and prints its rows as JSON
(a list of rows, each a list of values as text, sorted), as an analyst's tool sees it.

  python3 tests/py/read_iceberg.py duckdb TABLE_DIR COLUMN...
      DuckDB's iceberg extension, `iceberg_scan(TABLE_DIR)` (version-hint.text); the
      iceberg and avro extensions are loaded by path from their PyPI packages.
  python3 tests/py/read_iceberg.py pyiceberg TABLE_DIR COLUMN...
      pyiceberg's StaticTable from the metadata file the hint names, scanned to Arrow.
  python3 tests/py/read_iceberg.py glue ENDPOINT DATABASE.TABLE COLUMN...
      pyiceberg's GlueCatalog (Glue and S3 at ENDPOINT, the test server; credentials
      and region from the environment), the table loaded by name and scanned.

Values as text: NULL for null, decimals as written, timestamps in UTC ISO form.
"""
import json
import os
import sys


def text(v):
    if v is None:
        return "NULL"
    if isinstance(v, list):
        return "[" + ", ".join(text(x) for x in v) + "]"
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def read_duckdb(table, columns):
    import duckdb
    import duckdb_ext

    db = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    db.execute("SET TimeZone = 'UTC'")
    duckdb_ext.load(db, "avro", "iceberg")
    cols = ", ".join(f'"{c}"' for c in columns)
    return db.execute(f"SELECT {cols} FROM iceberg_scan('{table}')").fetchall()


def read_pyiceberg(table, columns):
    from pyiceberg.table import StaticTable

    hint = open(os.path.join(table, "metadata", "version-hint.text")).read()
    t = StaticTable.from_metadata(os.path.join(table, "metadata", f"v{hint}.metadata.json"))
    arrow = t.scan(selected_fields=tuple(columns)).to_arrow()
    return [tuple(row[c] for c in columns) for row in arrow.to_pylist()]


def read_glue(endpoint, name, columns):
    from pyiceberg.catalog import load_catalog

    region = os.environ.get("AWS_REGION", "us-east-1")
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    catalog = load_catalog(
        "glue",
        **{
            "type": "glue",
            "glue.endpoint": endpoint,
            "glue.region": region,
            "glue.access-key-id": key,
            "glue.secret-access-key": secret,
            "s3.endpoint": endpoint,
            "s3.region": region,
            "s3.access-key-id": key,
            "s3.secret-access-key": secret,
        },
    )
    arrow = catalog.load_table(name).scan(selected_fields=tuple(columns)).to_arrow()
    return [tuple(row[c] for c in columns) for row in arrow.to_pylist()]


def main():
    reader = sys.argv[1]
    if reader == "glue":
        rows = read_glue(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        table, columns = sys.argv[2], sys.argv[3:]
        rows = {"duckdb": read_duckdb, "pyiceberg": read_pyiceberg}[reader](table, columns)
    print(json.dumps(sorted([text(v) for v in row] for row in rows)))


main()
