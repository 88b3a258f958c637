"""CPU of opening a Store and counting a table: extension signatures checked once per process vs at every open.

DuckDB checks an extension's signature by hashing the whole file at each ``LOAD`` (ducklake's is
36 MB). :mod:`storage.duck` has DuckDB check each installed file once per process and keeps its
identity; this script times both ways in one process: the baseline forgets the record before each
open, so every open pays DuckDB's check again (what every open cost before).

    python benchmarks/bench_store_open.py [--root DIR] [--opens 20]

Prints CPU milliseconds per open (process time: DuckDB's threads included) and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from storage import Store, duck


def per_open(root: str, opens: int, forget: bool) -> float:
    started = time.process_time()
    for _ in range(opens):
        if forget:
            duck._CHECKED.clear()
        Store(root).count("generations")
    return (time.process_time() - started) / opens * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="a store (default: a new one in a temporary folder)")
    parser.add_argument("--opens", type=int, default=20)
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="bench-store-open-")
    Store(root).append("generations", [{"example_id": "e0", "status": "ok"}], run_id="bench")
    for _ in range(2):  # alternated, so drift of the machine falls on both
        every = per_open(root, args.opens, forget=True)
        once = per_open(root, args.opens, forget=False)
        print(f"Store open + count, SQLite catalog: checked at every open {every:.0f} ms CPU, "
              f"checked once per process {once:.0f} ms CPU ({every / once:.1f}x)")


if __name__ == "__main__":
    main()
