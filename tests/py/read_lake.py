"""Reads every Parquet file under a lake directory with pyarrow (an independent reader).

  python3 tests/py/read_lake.py LAKE_DIR
      prints, as JSON, each table's file and row counts and the Arrow type of each column
  python3 tests/py/read_lake.py LAKE_DIR schema.table
      prints that table's rows, values rendered as text the way the Rust tests render
      them (dates as days and timestamps as µs since 1970, binary as \\x hex, lists as
      {a,NULL,b}), for a replay against PostgreSQL
"""
import json
import math
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def files(root):
    if not os.path.isdir(root):
        return
    for dirpath, _, names in os.walk(root):
        if "/_walshore" in dirpath:
            continue
        for name in sorted(names):
            if name.endswith(".parquet"):
                rel = os.path.relpath(dirpath, root).split(os.sep)
                yield f"{rel[0]}.{rel[1]}", os.path.join(dirpath, name)


def render(v, t):
    if v is None:
        return None
    if pa.types.is_list(t):
        items = [render(e, t.value_type) for e in v]
        return "{" + ",".join("NULL" if e is None else e for e in items) + "}"
    if pa.types.is_boolean(t):
        return "true" if v else "false"
    if pa.types.is_floating(t):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "-0" if math.copysign(1, v) < 0 else "0"
        return repr(v)
    if pa.types.is_binary(t):
        return "\\x" + v.hex()
    return str(v)


def plain(column):
    """Dates as days and timestamps as µs: Python's date cannot hold BC years."""
    t = column.type
    if pa.types.is_date32(t):
        return column.cast(pa.int32())
    if pa.types.is_timestamp(t):
        return column.cast(pa.int64())
    return column


def rows(root, wanted):
    out, columns = [], []
    for table, path in files(root):
        if table != wanted:
            continue
        t = pq.ParquetFile(path).read()
        for name in t.column_names:
            if not name.startswith("_") and name not in columns:
                columns.append(name)
        data = {name: plain(t.column(name)).to_pylist() for name in t.column_names}
        types = {f.name: plain(t.column(f.name)).type for f in t.schema}
        for i in range(t.num_rows):
            out.append({
                "op": data["_op"][i],
                "lsn": data["_lsn"][i],
                "seq": data["_seq"][i],
                "unchanged": data["_unchanged"][i] or [],
                "values": {n: render(data[n][i], types[n]) for n in t.column_names if not n.startswith("_")},
            })
    return {"columns": columns, "rows": out}


def summary(root):
    tables = {}
    for table, path in files(root):
        t = pq.ParquetFile(path).read()  # one file alone: raises on a bad file
        entry = tables.setdefault(table, {"files": 0, "rows": 0, "types": {}})
        entry["files"] += 1
        entry["rows"] += t.num_rows
        for field in t.schema:
            entry["types"].setdefault(field.name, str(field.type))
    return tables


if __name__ == "__main__":
    root = sys.argv[1]
    json.dump(rows(root, sys.argv[2]) if len(sys.argv) > 2 else summary(root), sys.stdout, sort_keys=True)
