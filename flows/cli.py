"""``fastface evaluate``, ``sql``, ``report``, ``compact`` and ``migrate-store``.

Added to the ``fastface`` command through the ``fastface.commands`` entry point
(:func:`register_commands`), so the library does not import this layer.
"""

from __future__ import annotations

import argparse
import os
import sys


def _overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. sweep.size=32), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="evaluation YAML (configs/smoke.yaml, configs/paper.yaml)")
    parser.add_argument("--root", required=True, help="store root: a folder or s3://bucket/prefix")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set sweep.size=32 (repeatable)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")


def _prepare_prefect_environment() -> None:
    """Embedded default: no usage reporting, a Prefect home that exists, time for a first migration.

    Prefect does not create missing parents of ``PREFECT_HOME``, and the ephemeral server's first
    start (database migrations) can exceed its 20 s default on a busy 2-core machine.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    home = os.environ.get("PREFECT_HOME")
    if home:
        os.makedirs(os.path.expanduser(home), exist_ok=True)


def run_evaluate(args: argparse.Namespace) -> int:
    from flows.config import ConfigError, load_config

    overrides = _overrides(args.set)
    try:
        config = load_config(args.config, overrides)  # fails before Prefect or Ray start
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if args.check:
        print(f"config {args.config} is valid: run {config.name!r}, {len(config.presets())} presets, "
              f"{len(config.sweep.models)} models")
        return 0
    _prepare_prefect_environment()
    from flows.evaluate import evaluate_flow

    evaluate_flow(config=str(args.config), root=args.root, overrides=overrides or None)
    return 0


def add_sql_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="store root: a folder or s3://bucket/prefix")
    parser.add_argument("--max-rows", type=int, default=50)
    parser.add_argument("query", help='SQL over the views runs, identities, prompts, examples, generations, metrics '
                                      '(deduplicated) and <table>_raw, e.g. "SELECT preset, metric, avg(value) FROM '
                                      'metrics JOIN examples USING (example_id) GROUP BY ALL"')


def run_sql(args: argparse.Namespace) -> int:
    import duckdb

    from storage import Catalog, Store

    with Catalog(Store(args.root)) as catalog:
        try:
            print(catalog.sql_table(args.query, max_rows=args.max_rows))
        except duckdb.Error as exc:
            raise ValueError(f"query failed: {str(exc).splitlines()[0]}") from None
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="store root: a folder or s3://bucket/prefix")
    parser.add_argument("--run", default=None, help="run id (default: the only run in the store)")
    parser.add_argument("--ip-adapter-scale", type=float, default=None, help="λ of the tables (default 0.8 if swept)")
    parser.add_argument("--baseline", default="baseline")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--attention-maps", default=None, metavar="PNG",
                        help="include a grid written by `fastface attention-maps` in the report")


def run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flows.report import build_report

    maps = None
    if args.attention_maps:
        if not Path(args.attention_maps).is_file():
            raise FileNotFoundError(f"--attention-maps {args.attention_maps} not found (make it with `fastface attention-maps`)")
        maps = Path(args.attention_maps).read_bytes()
    report = build_report(args.root, args.run, ip_adapter_scale=args.ip_adapter_scale, baseline=args.baseline,
                          bootstrap_samples=args.bootstrap, seed=args.seed, calibration=not args.no_calibration,
                          attention_maps_png=maps)
    print(report["summary_markdown"])
    print("\nwrote:", file=sys.stderr)
    for name, uri in report["files"].items():
        print(f"  {name}: {uri}", file=sys.stderr)
    return 0


def register_commands(register) -> None:
    """Entry point of the ``fastface.commands`` group: one line per subcommand."""
    register("evaluate", "run an evaluation config end to end (Prefect)", add_evaluate_arguments, run_evaluate)
    register("sql", "query the result tables with DuckDB", add_sql_arguments, run_sql)
    register("report", "write the evaluation report of a run", add_report_arguments, run_report)
    register("compact", "flush, merge and expire the store's tables (DuckLake maintenance)",
             "storage.commands:add_compact_arguments", "storage.commands:run_compact")
    register("migrate-store", "convert a store of the one-file-per-batch layout to DuckLake",
             "storage.commands:add_migrate_arguments", "storage.commands:run_migrate")
