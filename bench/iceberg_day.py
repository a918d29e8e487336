"""The oracle of the day-long Iceberg benchmark (`bench/iceberg_day.rs`): while walshore
runs, checks every watermark of a table's Iceberg table against the change log folded
to the same commit record, with readers that share no code with walshore.

  python3 bench/iceberg_day.py LAKE SCHEMA.TABLE KEY STOP_FILE [--freshness-only]

It follows the lake as it grows. Each pass reads the new commit records
(`_walshore/commits/*.json`) and the Iceberg table's current metadata. A watermark
(`walshore.seq` of a snapshot's summary) is checked once a later one exists, at the last
snapshot that carries it (after that interval's compaction):

- the fold: a DuckDB table of the current state, moved forward by the change-log files
  of the records up to the watermark, in `(_lsn, _seq)` order: a `T` empties it, a `D`
  removes the key, any other change replaces the row, and a column named in
  `_unchanged` keeps the value it had (DESIGN.md, "Output layout and columns");
- the Iceberg table: DuckDB's `iceberg_scan` of that snapshot (`snapshot_from_id`);
- compared by row count and a sum of row hashes over the source columns, `_lsn` and
  `_commit_ts`; when they differ, row by row (EXCEPT ALL both ways), with samples.

Every 25th checked watermark, and the last, pyiceberg scans the same snapshot and must
hash alike. The run ends once STOP_FILE holds the last watermark and it is checked; the
report (JSON on stdout) holds the counts, the differences and the freshness of every
commit record: from its `written_at` to the first snapshot whose watermark covers it.
With `--freshness-only` (`bench/iceberg.rs`, a writer as fast as it goes) it checks
nothing and measures that.
"""
import json
import os
import statistics
import sys
import time

import duckdb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "py"))
import duckdb_ext  # noqa: E402

lake, table, key, stop_file = sys.argv[1:5]
freshness_only = "--freshness-only" in sys.argv[5:]
schema, name = table.split(".")
ice_dir = os.path.join(lake, "_iceberg", schema, name)
commits_dir = os.path.join(lake, "_walshore", "commits")

db = duckdb.connect(config={"allow_unsigned_extensions": "true"})
db.execute("SET TimeZone = 'UTC'")
duckdb_ext.load(db, "avro", "iceberg")


def q(name):
    return '"' + name.replace('"', '""') + '"'


records = {}  # seq -> (written_at µs, [change-log file paths of the table])
snapshots = {}  # snapshot id -> (timestamp ms, watermark seq)
state_cols = None  # the fold's source columns, in order
applied = 0  # the fold holds the records up to this seq
report = {
    "checked": 0,
    "differing": [],
    "expired_unchecked": 0,
    "pyiceberg_checked": 0,
    "pyiceberg_differing": [],
    "rows_last": None,
    "check_seconds": [],
}


def read_records():
    if not os.path.isdir(commits_dir):
        return
    for entry in sorted(os.listdir(commits_dir)):
        if not entry.endswith(".json"):
            continue
        seq = int(entry[:-5])
        if seq in records:
            continue
        try:
            with open(os.path.join(commits_dir, entry)) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue  # being written: the next pass reads it
        files = [os.path.join(lake, o["key"]) for o in r.get("files", []) if o["table"] == table]
        records[seq] = (r["written_at"], files)


def read_metadata():
    """The current metadata file, with every snapshot it lists remembered."""
    try:
        hint = open(os.path.join(ice_dir, "metadata", "version-hint.text")).read().strip()
        path = os.path.join(ice_dir, "metadata", f"v{hint}.metadata.json")
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None, set()
    live = set()
    for s in meta.get("snapshots", []):
        sid = s["snapshot-id"]
        if "walshore.seq" not in s["summary"]:
            continue  # a part of a first build: no watermark yet
        live.add(sid)
        if sid not in snapshots:
            snapshots[sid] = (s["timestamp-ms"], int(s["summary"]["walshore.seq"]))
    return path, live


def advance(to):
    """Moves the fold forward to the records up to `to`."""
    global applied, state_cols
    for seq in range(applied + 1, to + 1):
        if seq not in records:
            raise SystemExit(f"commit record {seq} was not read (pruned before the checker saw it?)")
    files = [f for seq in range(applied + 1, to + 1) for f in records[seq][1]]
    applied = to
    if not files:
        return
    db.execute(f"CREATE OR REPLACE TEMP TABLE b AS SELECT * FROM read_parquet({files!r}, union_by_name = true, hive_partitioning = false)")
    described = db.execute("DESCRIBE b").fetchall()
    source = [(c, t) for c, t, *_ in described if not c.startswith("_")]
    if state_cols is None:
        cols = ", ".join(f"{q(c)} {t}" for c, t in source)
        db.execute(f"CREATE TABLE state ({cols}, _lsn BIGINT, _commit_ts TIMESTAMPTZ)")
        state_cols = [c for c, _ in source]
    for c, t in source:
        if c not in state_cols:
            db.execute(f"ALTER TABLE state ADD COLUMN {q(c)} {t}")
            state_cols.append(c)
    cut = db.execute("SELECT _lsn, _seq FROM b WHERE _op = 'T' ORDER BY _lsn DESC, _seq DESC LIMIT 1").fetchone()
    if cut:
        db.execute("DELETE FROM state")
        db.execute(f"DELETE FROM b WHERE _lsn < {cut[0]} OR (_lsn = {cut[0]} AND _seq <= {cut[1]})")
    in_batch = {c for c, _ in source}
    k = q(key)
    window = f"OVER (PARTITION BY {k} ORDER BY _lsn, _seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"
    picks = []
    for c in state_cols:
        if c == key:
            continue
        if c not in in_batch:
            picks.append(f"NULL AS {q(c)}")
            continue
        unchanged = f"list_contains(coalesce(_unchanged, []::VARCHAR[]), '{c}')"
        # A struct, so that a null value is told from "no earlier change in this batch".
        sent = f"CASE WHEN NOT {unchanged} THEN struct_pack(v := {q(c)}) END"
        picks.append(
            f"CASE WHEN {unchanged} THEN last_value({sent} IGNORE NULLS) {window} "
            f"ELSE struct_pack(v := {q(c)}) END AS {q(c)}"
        )
    db.execute(
        f"CREATE OR REPLACE TEMP TABLE l AS SELECT {k}, _op, _lsn, _commit_ts, {', '.join(picks)} FROM b "
        f"QUALIFY row_number() OVER (PARTITION BY {k} ORDER BY _lsn DESC, _seq DESC) = 1"
    )
    values = ", ".join(
        f"CASE WHEN l.{q(c)} IS NULL THEN s.{q(c)} ELSE struct_extract(l.{q(c)}, 'v') END AS {q(c)}" for c in state_cols if c != key
    )
    db.execute(
        f"CREATE OR REPLACE TEMP TABLE n AS SELECT l.{k}, {values}, l._lsn, l._commit_ts "
        f"FROM l LEFT JOIN state s ON s.{k} = l.{k} WHERE l._op <> 'D'"
    )
    db.execute(f"DELETE FROM state WHERE {k} IN (SELECT {k} FROM l)")
    db.execute("INSERT INTO state BY NAME SELECT * FROM n")


def projection(relation, columns):
    """Every compared column as text (null where the relation lacks it)."""
    have = {r[0] for r in db.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}
    return ", ".join(f"{q(c)}::VARCHAR" if c in have else "NULL::VARCHAR" for c in columns)


def digest(relation, columns):
    cols = projection(relation, columns)
    return db.execute(f"SELECT count(*), coalesce(sum(hash({cols})::HUGEINT), 0) FROM {relation}").fetchone()


def compare(meta_path, sid, seq):
    ice = f"iceberg_scan('{meta_path}', snapshot_from_id = {sid})"
    ice_cols = [r[0] for r in db.execute(f"DESCRIBE SELECT * FROM {ice}").fetchall()]
    columns = [c for c in state_cols] + [c for c in ice_cols if c not in state_cols and not c.startswith("_")]
    columns += ["_lsn", "_commit_ts"]
    want = digest("state", columns)
    got = digest(ice, columns)
    report["rows_last"] = want[0]
    if want != got:
        extra = db.execute(
            f"SELECT {projection(ice, columns)} FROM {ice} EXCEPT ALL SELECT {projection('state', columns)} FROM state"
        ).fetchall()
        missing = db.execute(
            f"SELECT {projection('state', columns)} FROM state EXCEPT ALL SELECT {projection(ice, columns)} FROM {ice}"
        ).fetchall()
        report["differing"].append(
            {
                "seq": seq,
                "snapshot": sid,
                "rows": [want[0], got[0]],
                "extra": len(extra),
                "missing": len(missing),
                "samples": [[str(v)[:80] for v in r] for r in (extra[:3] + missing[:3])],
            }
        )
    return columns, want


def compare_pyiceberg(meta_path, sid, seq, columns, want):
    from pyiceberg.table import StaticTable

    t = StaticTable.from_metadata(meta_path)
    db.register("pyiceberg_rows", t.scan(snapshot_id=sid).to_arrow())
    got = digest("pyiceberg_rows", columns)
    db.unregister("pyiceberg_rows")
    report["pyiceberg_checked"] += 1
    if got != want:
        report["pyiceberg_differing"].append({"seq": seq, "snapshot": sid, "rows": [want[0], got[0]]})


checked = set()
final = None
while True:
    if final is None and os.path.exists(stop_file):
        text = open(stop_file).read().strip()
        final = int(text) if text else None
    read_records()
    meta_path, live = read_metadata()
    if meta_path is None:
        time.sleep(0.5)  # a metadata file replaced under the read: the next pass
        continue
    by_seq = {}
    for sid, (ts, seq) in snapshots.items():
        if sid in live and (seq not in by_seq or ts >= by_seq[seq][1]):
            by_seq[seq] = (sid, ts)
    newest = max((seq for _, seq in snapshots.values()), default=0)
    due = sorted(s for s in by_seq if s not in checked and (s < newest or s == final))
    # Watermarks whose snapshots all expired before they could be checked.
    gone = {seq for _, seq in snapshots.values()} - set(by_seq) - checked
    for seq in [] if freshness_only else sorted(gone):
        if seq <= applied:
            continue
        report["expired_unchecked"] += 1
        checked.add(seq)
    for seq in [] if freshness_only else due:
        if seq < applied:
            report["expired_unchecked"] += 1  # passed by the fold: not checked
            checked.add(seq)
            continue
        if any(s not in records for s in range(applied + 1, seq + 1)):
            break  # a record not read yet: the next pass
        started = time.perf_counter()
        advance(seq)
        sid = by_seq[seq][0]
        try:
            columns, want = compare(meta_path, sid, seq)
        except duckdb.Error as e:
            # Expired between the read and the scan, if the table no longer lists it;
            # a snapshot still listed whose files cannot be read is a finding.
            _, now_live = read_metadata()
            if sid in now_live or not now_live:
                report["differing"].append({"seq": seq, "snapshot": sid, "error": str(e)[:300]})
            else:
                report["expired_unchecked"] += 1
            checked.add(seq)
            continue
        report["checked"] += 1
        checked.add(seq)
        if report["checked"] % 25 == 1 or seq == final:
            compare_pyiceberg(meta_path, sid, seq, columns, want)
        report["check_seconds"].append(time.perf_counter() - started)
    if final is not None and (final in checked or (freshness_only and final <= newest)):
        break
    time.sleep(0.5)

# Freshness: a record's first covering snapshot, from the first watermark on.
order = sorted(snapshots.values(), key=lambda v: v[1])
first_seq = order[0][1] if order else 0
lags = []
for seq, (written_at, files) in records.items():
    if seq <= first_seq or not files or (final is not None and seq > final):
        continue
    visible = min((ts for ts, s in order if s >= seq), default=None)
    if visible is not None:
        lags.append(visible / 1000 - written_at / 1e6)
lags.sort()


def pct(p):
    return lags[min(len(lags) - 1, int(p * len(lags)))] if lags else None


report["freshness"] = {
    "records": len(lags),
    "p50": pct(0.5),
    "p99": pct(0.99),
    "max": lags[-1] if lags else None,
}
report["watermarks"] = len({seq for _, seq in snapshots.values()})
report["snapshots_seen"] = len(snapshots)
secs = report.pop("check_seconds")
report["check_median_seconds"] = statistics.median(secs) if secs else None
print(json.dumps(report))
