"""What the Glue readers of the tests and benches share: DuckDB reading S3 (the test
server) through httpfs, offline from PyPI, and which keys below a partition's location
Athena reads."""

import os

import duckdb
import duckdb_extension_httpfs


def duckdb_over_s3(endpoint, region):
    """A DuckDB connection that reads `s3://` from `endpoint` with the environment's
    credentials."""
    ext = os.path.join(os.path.dirname(duckdb_extension_httpfs.__file__), "extensions", "v1.5.5", "httpfs.duckdb_extension")
    db = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    db.execute(f"LOAD '{ext}'")
    host = endpoint.split("://", 1)[1]
    db.execute(
        f"CREATE SECRET (TYPE s3, KEY_ID '{os.environ['AWS_ACCESS_KEY_ID']}', SECRET '{os.environ['AWS_SECRET_ACCESS_KEY']}', "
        f"REGION '{region}', ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"
    )
    return db


def visible(prefix, key):
    """Whether Athena reads `key` below a location `prefix`: a Parquet file none of whose
    path segments below the location begins with `_` or `.` (Hive's hidden files: a
    compaction's `_c…` folder before Glue points at it)."""
    rel = key[len(prefix) :].lstrip("/")
    return key.endswith(".parquet") and not any(seg.startswith(("_", ".")) for seg in rel.split("/"))
