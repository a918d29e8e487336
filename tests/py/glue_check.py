"""What a Glue-catalog reader sees: the tables and partitions registered in a Glue
server (moto), and each table's current state replayed from exactly the files of its
registered partitions, read by DuckDB over S3 (httpfs, offline from PyPI).

usage: glue_check.py ENDPOINT DATABASE TABLE:KEY1,KEY2:COL1,COL2 ... [--views FILE]
prints JSON: {"tables": {name: {...}}, "state": {name: [[col values as text]]},
"views": {view: [[...]]}}. With --views, FILE holds `walshore athena-sql` output: its
CREATE VIEW statements run in DuckDB over change-log tables made of exactly the
registered partitions' files, and each view of the listed tables is selected.
"""

import base64
import json
import os
import sys

import boto3

from athena_reader import duckdb_over_s3, visible

endpoint, database = sys.argv[1], sys.argv[2]
args = sys.argv[3:]
views_file = None
glue_views = "--glue-views" in args
if glue_views:
    args.remove("--glue-views")
if "--views" in args:
    i = args.index("--views")
    views_file = args[i + 1]
    del args[i : i + 2]
specs = [a.split(":") for a in args]
region = os.environ.get("AWS_REGION", "us-east-1")
glue = boto3.client("glue", endpoint_url=endpoint, region_name=region)
s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region)

out = {"tables": {}, "state": {}, "views": {}, "glue_views": {}}
for t in glue.get_tables(DatabaseName=database)["TableList"]:
    if t.get("TableType") == "VIRTUAL_VIEW":
        text = t["ViewOriginalText"]
        prefix, suffix = "/* Presto View: ", " */"
        assert text.startswith(prefix) and text.endswith(suffix), text
        definition = json.loads(base64.b64decode(text[len(prefix) : -len(suffix)]))
        out["glue_views"][t["Name"]] = {
            "definition": definition,
            "parameters": t.get("Parameters", {}),
            "columns": [[c["Name"], c["Type"]] for c in t["StorageDescriptor"]["Columns"]],
        }
        continue
    parts = []
    for page in glue.get_paginator("get_partitions").paginate(DatabaseName=database, TableName=t["Name"]):
        parts.extend({"values": p["Values"], "location": p["StorageDescriptor"]["Location"]} for p in page["Partitions"])
    sd = t["StorageDescriptor"]
    out["tables"][t["Name"]] = {
        "columns": [[c["Name"], c["Type"]] for c in sd["Columns"]],
        "partition_keys": [[c["Name"], c["Type"]] for c in t.get("PartitionKeys", [])],
        "location": sd["Location"],
        "serde": sd.get("SerdeInfo", {}).get("SerializationLibrary"),
        "parameters": t.get("Parameters", {}),
        "partitions": parts,
    }

db = duckdb_over_s3(endpoint, region)
host = endpoint.split("://", 1)[1]


def partition_files(location):
    bucket, prefix = location[len("s3://"):].split("/", 1)
    return [
        f"s3://{bucket}/{o['Key']}"
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
        if visible(prefix, o["Key"])
    ]


def registered_files(name):
    files = []
    for p in out["tables"][name]["partitions"]:
        files.extend(partition_files(p["location"]))
    return files


# pyarrow, a second independent reader, reads every file of every registered partition.
import pyarrow.fs
import pyarrow.parquet

pa_s3 = pyarrow.fs.S3FileSystem(
    access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    endpoint_override=host, scheme="http", region=region,
)
out["pyarrow_rows"] = {}
for name in out["tables"]:
    out["pyarrow_rows"][name] = sum(
        pyarrow.parquet.ParquetFile(pa_s3.open_input_file(f[len("s3://"):])).read().num_rows
        for f in registered_files(name)
    )

# The UTC commit dates of the rows in each registered partition, by its location.
out["commit_dates"] = {}
for name in out["tables"]:
    out["commit_dates"][name] = {}
    for p in out["tables"][name]["partitions"]:
        files = partition_files(p["location"])
        dates = db.execute(
            f"SELECT DISTINCT strftime(make_timestamp(epoch_us(_commit_ts)), '%Y-%m-%d') FROM read_parquet({files!r}, union_by_name = true)"
        ).fetchall() if files else []
        out["commit_dates"][name][p["location"]] = sorted(d[0] for d in dates if d[0] is not None)

for name, keys, cols in specs:
    keys, cols = keys.split(","), cols.split(",")
    files = registered_files(name) if name in out["tables"] else []
    if not files:
        out["state"][name] = []
        continue
    select = ", ".join(f'CAST("{c}" AS VARCHAR)' for c in cols)
    unchanged = "_unchanged"
    rows = db.execute(
        f"SELECT _op, {unchanged}, {select} FROM read_parquet({files!r}, union_by_name = true) ORDER BY _lsn, _seq"
    ).fetchall()
    # The current-state rule: T empties, R/I/U upsert by key (unchanged-TOAST columns
    # keep the previous value), D removes the key.
    state = {}
    for op, unch, *vals in rows:
        row = dict(zip(cols, vals))
        key = tuple(row[k] for k in keys)
        if op == "T":
            state = {}
        elif op == "D":
            state.pop(key, None)
        else:
            prev = state.get(key, {})
            for c in unch or []:
                if c in row:
                    row[c] = prev.get(c)
            state[key] = row
    out["state"][name] = sorted([[r[c] for c in cols] for r in state.values()], key=lambda r: [x or "" for x in r])

if views_file or glue_views:
    db.execute(f'CREATE SCHEMA "{database}"')
    for name in out["tables"]:
        files = registered_files(name)
        if files:
            db.execute(f'CREATE VIEW "{database}"."{name}" AS SELECT * FROM read_parquet({files!r}, union_by_name = true)')
    if views_file:
        text = open(views_file).read()
        for stmt in text.split(";\n"):
            body = "\n".join(l for l in stmt.splitlines() if not l.startswith("--")).strip()
            if body.startswith("CREATE OR REPLACE VIEW"):
                db.execute(body)
    else:
        # The views as Glue holds them, in the form Athena reads.
        for view, v in out["glue_views"].items():
            db.execute(f'CREATE VIEW "{database}"."{view}" AS {v["definition"]["originalSql"]}')
    for name, keys, cols in specs:
        view = name[: -len("_changes")]
        cols = cols.split(",")
        select = ", ".join(f'CAST("{c}" AS VARCHAR)' for c in cols)
        rows = db.execute(f'SELECT {select} FROM "{database}"."{view}"').fetchall()
        out["views"][view] = [list(r) for r in rows]

print(json.dumps(out))
