"""DuckDB extensions from their PyPI packages, loaded by path (DuckDB cannot download
them here): `load(db, "avro", "iceberg")`."""
import importlib
import os


def ext_path(name):
    """The .duckdb_extension file inside the duckdb-extension-NAME package."""
    module = importlib.import_module(f"duckdb_extension_{name}")
    base = os.path.dirname(module.__file__)
    for root, _dirs, files in os.walk(base):
        for f in files:
            if f.endswith(".duckdb_extension"):
                return os.path.join(root, f)
    raise SystemExit(f"no .duckdb_extension file in {base}")


def load(db, *names):
    for name in names:
        db.execute(f"LOAD '{ext_path(name)}'")
