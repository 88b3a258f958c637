"""``fastface compact`` and ``fastface migrate-store`` (registered by :func:`flows.cli.register_commands`)."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

ROOT_HELP = "store root: a folder or s3://bucket/prefix (catalog: $FASTFACE_CATALOG, see docs/storage.md)"


def add_compact_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help=ROOT_HELP)
    parser.add_argument("--expire-days", type=float, default=7.0,
                        help="expire snapshots older than this many days (time travel ends there; default %(default)s)")
    parser.add_argument("--cleanup-hours", type=float, default=1.0,
                        help="delete unused data files older than this many hours (default %(default)s)")


def run_compact(args: argparse.Namespace) -> int:
    from storage.store import Store

    if args.expire_days < 0 or args.cleanup_hours < 0:
        raise ValueError("--expire-days and --cleanup-hours must be >= 0")
    with Store(args.root) as store:
        done = store.compact(expire_older_than=timedelta(days=args.expire_days),
                             cleanup_older_than=timedelta(hours=args.cleanup_hours))
    print(f"compacted {args.root}: {done['rows_flushed']} inlined rows flushed, data files "
          f"{done['files_before']} -> {done['files_after']}, {done['snapshots_expired']} snapshots expired, "
          f"{done['files_deleted']} unused files deleted")
    return 0


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old_root", help="a root in the one-Parquet-file-per-batch layout (left untouched)")
    parser.add_argument("new_root", help="an empty or new root for the DuckLake tables; " + ROOT_HELP)


def run_migrate(args: argparse.Namespace) -> int:
    from storage.migrate import migrate_store

    counts = migrate_store(args.old_root, args.new_root, log=lambda line: print(line, file=sys.stderr))
    rows = ", ".join(f"{t} {n}" for t, n in counts.items() if t != "files_copied")
    print(f"migrated {args.old_root} -> {args.new_root}: rows {rows}; {counts['files_copied']} other files copied")
    return 0
