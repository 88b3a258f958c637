"""Where a store keeps its parts: the catalog file of a local store, the folder of table data, and
the name the DuckLake is attached as."""

CATALOG_FILE = "catalog.sqlite"  # a local store's SQLite catalog, under its root
DATA_DIR = "tables"  # the lake's Parquet data files, under the root
LAKE = "fastface_lake"  # the name the lake is attached as on every connection
