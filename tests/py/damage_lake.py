#!/usr/bin/env python3
"""Damages a file-sink lake the ways a real one gets damaged, for tests/verify.rs.

  damage_lake.py edit FILE COLUMN ROW VALUE KEY   one value changed in place (VALUE is JSON);
                                                  prints the row's KEY column value
  damage_lake.py drop-copy LAKE TABLE POINT       the lake an old build left when TABLE came
                                                  back to the publication: its copy at POINT
                                                  (the T row at POINT-1, the R rows at POINT)
                                                  never written nor committed
"""
import glob
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def lsn(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def edit(path, column, row, value, key):
    table = pq.read_table(path)
    i = table.schema.get_field_index(column)
    values = table.column(column).to_pylist()
    values[row] = value
    field = table.schema.field(i)
    table = table.set_column(i, field, pa.array(values, type=field.type))
    pq.write_table(table, path)
    print(json.dumps({"key": table.column(key).to_pylist()[row]}))


def drop_copy(lake, table, point):
    removed = []
    for record in sorted(glob.glob(os.path.join(lake, "_walshore", "commits", "*.json"))):
        with open(record) as f:
            r = json.load(f)
        keep = [
            f for f in r["files"]
            if not (f["table"] == table and lsn(f["first"]["lsn"]) in (point - 1, point))
        ]
        removed += [f["key"] for f in r["files"] if f not in keep]
        if len(keep) != len(r["files"]):
            r["files"] = keep
            with open(record, "w") as f:
                json.dump(r, f)
    for key in removed:
        os.remove(os.path.join(lake, key))
    print(json.dumps({"removed": removed}))


if __name__ == "__main__":
    if sys.argv[1] == "edit":
        edit(sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]), sys.argv[6])
    elif sys.argv[1] == "drop-copy":
        drop_copy(sys.argv[2], sys.argv[3], lsn(sys.argv[4]))
    else:
        sys.exit(__doc__)
