"""Reads every Parquet file under a lake directory with pyarrow (an independent reader)
and prints, as JSON, the Arrow type of each column of each table and the file count.

Usage: python3 tests/py/read_lake.py LAKE_DIR
"""
import json
import os
import sys

import pyarrow.parquet as pq


def main(root):
    tables = {}
    if not os.path.isdir(root):
        json.dump({}, sys.stdout)
        return
    for dirpath, _, names in os.walk(root):
        if "/_walshore" in dirpath:
            continue
        for name in names:
            if not name.endswith(".parquet"):
                continue
            rel = os.path.relpath(dirpath, root).split(os.sep)
            table = f"{rel[0]}.{rel[1]}"
            # One file alone (no partition inference from the folder names).
            t = pq.ParquetFile(os.path.join(dirpath, name)).read()  # raises on a bad file
            entry = tables.setdefault(table, {"files": 0, "rows": 0, "types": {}})
            entry["files"] += 1
            entry["rows"] += t.num_rows
            for field in t.schema:
                entry["types"].setdefault(field.name, str(field.type))
    json.dump(tables, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
