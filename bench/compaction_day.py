"""The readers of `bench/compaction_day.rs`: DuckDB over the partitions registered in a
Glue server (moto), reading exactly the files a Glue reader (Athena) reads, over S3
(httpfs, offline from PyPI).

usage:
  compaction_day.py watch ENDPOINT BUCKET PREFIX DATABASE STOP_FILE OUT
      Until STOP_FILE exists, reads closed partitions again and again (those whose
      period ended at least two minutes of server time before the commit log's head:
      all their rows are committed) and appends what each read saw to OUT, a JSON
      line each: rows, distinct (_lsn, _seq), a sum of their hashes, or the error.
  compaction_day.py final ENDPOINT BUCKET PREFIX DATABASE
      Every registered partition, read once: the same, with its files and bytes.
  compaction_day.py fold ENDPOINT BUCKET ROOT COMPACTED KEY RUNS
      The median time of a DuckDB fold (the current state: the last change of each
      KEY) over the Parquet files directly below ROOT and over those below COMPACTED
      (prefixes in BUCKET), over S3 and from a local copy of each.
"""

import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import boto3

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "py"))
from athena_reader import duckdb_over_s3, visible  # noqa: E402

REGION = os.environ.get("AWS_REGION", "us-east-1")
# A read of a partition with more files than this waits for its compaction: through
# the S3 test server it would take minutes, and hold up the reads that matter.
MOST_FILES = 3000
# A partition is read once the head's commit time is this far past its end.
MARGIN_US = 120 * 1_000_000


def clients(endpoint):
    return (
        boto3.client("glue", endpoint_url=endpoint, region_name=REGION),
        boto3.client("s3", endpoint_url=endpoint, region_name=REGION),
    )


def duck(endpoint):
    return duckdb_over_s3(endpoint, REGION)


def partitions(glue, database):
    out = []
    for table in ("trades_changes", "prices_changes"):
        for page in glue.get_paginator("get_partitions").paginate(DatabaseName=database, TableName=table):
            for p in page["Partitions"]:
                out.append((table, "/".join(p["Values"]), p["Values"], p["StorageDescriptor"]["Location"]))
    return out


def period_end_us(values):
    day = datetime.datetime.strptime(values[0], "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
    end = day + (datetime.timedelta(hours=int(values[1]) + 1) if len(values) > 1 else datetime.timedelta(days=1))
    return int(end.timestamp() * 1_000_000)


def listing(s3, location):
    """The files Athena reads below `location`: Parquet files none of whose path
    segments below it begins with `_` or `.` (Hive's hidden files)."""
    bucket, prefix = location[len("s3://") :].split("/", 1)
    prefix = prefix.rstrip("/") + "/"
    files = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            if visible(prefix, o["Key"]):
                files.append((f"s3://{bucket}/{o['Key']}", o["Size"]))
    return files


def read(db, files):
    if not files:
        return {"rows": 0, "distinct": 0, "hash": "0"}
    names = "[" + ", ".join(f"'{f}'" for f, _ in files) + "]"
    rows, distinct, h = db.execute(
        f"SELECT count(*), count(DISTINCT (_lsn, _seq)), coalesce(sum(hash(_lsn, _seq)), 0)::VARCHAR FROM read_parquet({names}, union_by_name = true)"
    ).fetchone()
    return {"rows": rows, "distinct": distinct, "hash": h}


def head_commit_ts(s3, bucket, prefix):
    hint = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/_walshore/head.json")["Body"].read())
    rec = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/_walshore/commits/{hint['seq']:020}.json")["Body"].read())
    return rec.get("commit_ts") or 0


def watch(endpoint, bucket, prefix, database, stop_file, out):
    glue, s3 = clients(endpoint)
    db = duck(endpoint)
    turn = 0
    with open(out, "a") as f:
        while not os.path.exists(stop_file):
            try:
                head_ts = head_commit_ts(s3, bucket, prefix)
                parts = partitions(glue, database)
            except Exception as e:  # the server busy, a head being written: next time
                time.sleep(1)
                continue
            closed = [p for p in parts if period_end_us(p[2]) + MARGIN_US <= head_ts]
            # In flux: not compacted yet, or ended in the last four hours of server
            # time (compacted lately, its replaced files not yet deleted). Plus one
            # older partition in turn.
            flux = [p for p in closed if "/_c" not in p[3] or period_end_us(p[2]) > head_ts - 4 * 3600 * 1_000_000]
            rest = [p for p in closed if p not in flux]
            chosen = flux + ([rest[turn % len(rest)]] if rest else [])
            turn += 1
            for table, partition, _, location in chosen:
                started = time.time()
                obs = {"t": started, "table": table, "partition": partition, "location": location, "head_ts": head_ts}
                try:
                    files = listing(s3, location)
                    obs["files"] = len(files)
                    if len(files) > MOST_FILES:
                        obs["skipped"] = True
                    else:
                        obs.update(read(db, files))
                except Exception as e:
                    obs["error"] = str(e)[:500]
                obs["seconds"] = time.time() - started
                f.write(json.dumps(obs) + "\n")
                f.flush()
                if os.path.exists(stop_file):
                    break
            time.sleep(0.5)


def final(endpoint, bucket, prefix, database):
    glue, s3 = clients(endpoint)
    db = duck(endpoint)
    out = {}
    for table, partition, _, location in partitions(glue, database):
        files = listing(s3, location)
        obs = {"location": location, "files": len(files), "sizes": [b for _, b in files]}
        obs.update(read(db, files))
        out[f"{table} {partition}"] = obs
    print(json.dumps(out))


def fold(endpoint, bucket, root, compacted, key, runs):
    _, s3 = clients(endpoint)
    db = duck(endpoint)

    def direct(prefix):
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", Delimiter="/"):
            keys.extend(o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".parquet"))
        return keys

    def timed(names):
        sql = (
            f"SELECT count(*) FROM (SELECT _op FROM read_parquet({names}, union_by_name = true) "
            f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY _lsn DESC, _seq DESC) = 1) WHERE _op <> 'D'"
        )
        times, answer = [], None
        for _ in range(runs):
            t = time.perf_counter()
            answer = db.execute(sql).fetchone()[0]
            times.append(time.perf_counter() - t)
        return statistics.median(times), answer

    report = {}
    with tempfile.TemporaryDirectory() as local:
        for name, prefix in (("uncompacted", root), ("compacted", compacted)):
            keys = direct(prefix)
            s3_names = "[" + ", ".join(f"'s3://{bucket}/{k}'" for k in keys) + "]"
            over_s3, rows = timed(s3_names)
            folder = os.path.join(local, name)
            os.makedirs(folder)
            for i, k in enumerate(keys):
                s3.download_file(bucket, k, os.path.join(folder, f"{i:06}.parquet"))
            on_disk, rows_local = timed(f"'{folder}/*.parquet'")
            report[name] = {"files": len(keys), "s3": over_s3, "local": on_disk, "rows": rows, "rows_local": rows_local}
    print(json.dumps(report))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "watch":
        watch(*args)
    elif mode == "final":
        final(*args)
    elif mode == "fold":
        fold(*args[:5], int(args[5]))
    else:
        sys.exit(f"unknown mode {mode}")
