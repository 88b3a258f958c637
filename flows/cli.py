"""``fastface evaluate``, ``sql``, ``report``, ``snapshots``, ``restore``, ``app``, ``compact`` and ``migrate-store``.

Added to the ``fastface`` command through the ``fastface.commands`` entry point
(:func:`register_commands`), so the library does not import this layer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def _overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE (e.g. sweep.size=32), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise ValueError(f"--set {item}: the value is not valid YAML ({problem})") from None
    return out


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="evaluation YAML (configs/smoke.yaml, configs/paper.yaml)")
    parser.add_argument("--root", required=True, help="store root: a folder or s3://bucket/prefix")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set sweep.size=32 (repeatable)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--plan", action="store_true",
                        help="print what a run would do (examples, images and scores missing per model × preset × "
                             "prompt set, pipeline loads, GPU hours) and exit; starts nothing, writes nothing")
    parser.add_argument("--json", action="store_true",
                        help="print the run's summary as JSON alone on stdout (every log line goes to stderr); "
                             "with --plan: the plan as JSON")
    parser.add_argument("--seconds-per-image", type=float, default=None, metavar="S",
                        help="with --plan: GPU seconds per image for the estimate (default: the median that earlier "
                             "runs of each model stored)")


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
    from evaluation.config import ConfigError, check_photos, load_config
    from storage.checks import check_store_root

    overrides = _overrides(args.set)
    try:
        config = load_config(args.config, overrides)  # fails before Prefect or Ray start
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    # What a run would reject anyway, before it starts: photos (faces only with --check: it runs the
    # face detector on every photo), and a root that cannot be written.
    problems = check_photos(config, detect_faces=args.check)
    if problems:
        raise ValueError(f"invalid evaluation config {args.config}: " + "; ".join(problems))
    if args.seconds_per_image is not None and not args.plan:
        raise ValueError("--seconds-per-image goes with --plan (e.g. fastface evaluate --config C --root R --plan "
                         "--seconds-per-image 2.5)")
    if args.seconds_per_image is not None and not args.seconds_per_image > 0:
        raise ValueError(f"--seconds-per-image must be a positive number, got {args.seconds_per_image}")
    if args.plan:
        from evaluation.plan import evaluation_plan, format_plan

        plan = evaluation_plan(config, args.root, seconds_per_image=args.seconds_per_image)
        print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
        return 0
    check_store_root(args.root, for_reading=False)
    if args.check:
        print(f"config {args.config} is valid: run {config.name!r}, {len(config.presets())} presets, "
              f"{len(config.sweep.models)} models")
        return 0
    _prepare_prefect_environment()
    from flows import interrupt
    from flows.evaluate import evaluate_flow

    command = " ".join(["fastface", "evaluate", "--config", str(args.config), "--root", args.root,
                        *[f"--set {item}" for item in args.set]])
    interrupt.install(lambda: stored_progress(args.root, config.name),
                      f"run `{command}` again to resume (finished rows are kept, none is made twice)")
    _quiet_prefect_tracebacks(args.debug)
    try:
        with _stdout_to_stderr(getattr(args, "json", False)):
            summary = evaluate_flow(config=str(args.config), root=args.root, overrides=overrides or None)
    except Exception as exc:  # a stage failed: one line (Prefect has logged the details)
        if args.debug:
            raise
        print(f"error: evaluation {config.name!r} failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    status = _report_failures(args.root, config.name, summary)
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, default=str), flush=True)
    return status


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool):
    """While the flow runs, everything written to stdout (Prefect, Ray, subprocesses) goes to stderr."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if not isinstance(exc, ValueError) or not line else line


def _quiet_prefect_tracebacks(debug: bool) -> None:
    """Prefect logs each failed task with its traceback; users get the one-line error at the end instead."""
    import logging

    if debug:
        return

    class _NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            return True

    import prefect.logging.configuration  # noqa: F401 - Prefect's handlers are configured on import

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTraceback())


def stored_progress(root: str, run: str) -> str:
    """What the store holds of a run: planned examples, images generated, scores (one SQL aggregate each)."""
    from storage import Catalog, Store

    with Catalog(Store(root)) as catalog:
        def count(sql: str) -> int:
            try:
                return int(catalog.query(sql, [run]).column(0)[0].as_py() or 0)
            except Exception:  # noqa: BLE001 - a table not written yet
                return 0

        planned = count("SELECT count(*) FROM examples WHERE run_id = ?")
        images = count("SELECT count(*) FROM generations WHERE run_id = ? AND status = 'ok'")
        scores = count("SELECT count(*) FROM metrics WHERE run_id = ? AND error IS NULL")
    if not planned:
        return f"run {run!r} had not planned its examples yet"
    return f"run {run!r} has {images} of {planned} planned images and {scores} scores stored"


def _report_failures(root: str, run: str, summary: dict) -> int:
    """Exit status of a finished evaluation: 1 when every planned image or score failed; counts on stderr."""
    from storage import Catalog, Store

    status = 0
    for stage, table, failed_where in (("generation", "generations", "status = 'failed'"),
                                       ("scoring", "metrics", "error IS NOT NULL")):
        counts = summary.get(stage) or {}
        failed, ok = int(counts.get("failed", 0)), int(counts.get("ok", 0))
        if not failed:
            continue
        with Catalog(Store(root)) as catalog:
            first = catalog.query(f"SELECT error FROM {table} WHERE run_id = ? AND {failed_where} "
                                  "ORDER BY created_at LIMIT 1", [run]).column(0).to_pylist()
        first_error = (first[0] or "").splitlines()[0] if first else "unknown"
        what = "images" if stage == "generation" else "scores"
        if ok == 0:
            print(f"error: {stage} failed: all {failed} planned {what} of run {run!r} failed; first error: "
                  f"{first_error}", file=sys.stderr)
            status = 1
        else:
            print(f"warning: {stage}: {failed} of {failed + ok} {what} of run {run!r} failed (re-run to retry "
                  f"them); first error: {first_error}", file=sys.stderr)
    return status


def add_sql_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="store root: a folder or s3://bucket/prefix")
    parser.add_argument("--max-rows", type=int, default=50, help="rows shown by --format table (default %(default)s)")
    parser.add_argument("--format", default="table", choices=("table", "csv", "json", "parquet"),
                        help="table (aligned text, first --max-rows rows), or every row as csv, json (an array of "
                             "objects) or parquet (needs --out)")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the result to FILE (default: stdout)")
    parser.add_argument("-f", "--file", default=None, metavar="QUERY.sql", help="read the query from a file")
    parser.add_argument("query", nargs="?", default=None,
                        help='SQL over the views runs, identities, prompts, examples, generations, metrics '
                             '(deduplicated) and <table>_raw, e.g. "SELECT preset, metric, avg(value) FROM '
                             'metrics JOIN examples USING (example_id) GROUP BY ALL". Read-only: statements that '
                             'change anything, and files outside the store, are refused')


def run_sql(args: argparse.Namespace) -> int:
    """Queries only: the lake attached read-only, external access off (storage.readonly)."""
    import duckdb

    from fastface.validation import positive_int
    from storage.catalog import write_result
    from storage.checks import check_store_root
    from storage.catalog import readonly_catalog
    from storage.readonly import check_read_only_sql

    query = args.query
    if args.file is not None:
        if query is not None:
            raise ValueError("give the query either as an argument or with -f FILE, not both")
        try:
            with open(args.file, encoding="utf-8") as f:
                query = f.read()
        except OSError as exc:
            raise ValueError(f"-f {args.file}: cannot read the query file ({exc.strerror or exc})") from None
    if not (query or "").strip().rstrip(";").strip():
        raise ValueError('the query is empty; e.g. fastface sql --root ROOT "SELECT * FROM runs"')
    positive_int("--max-rows", args.max_rows)
    if args.format == "parquet" and not args.out:
        raise ValueError("--format parquet writes a file: give --out FILE.parquet")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise ValueError(f"--out {args.out}: the folder {folder} does not exist")
    check_store_root(args.root, for_reading=True)
    check_read_only_sql(query)
    with readonly_catalog(args.root) as catalog:
        tmp = None if not args.out else os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                                     f".tmp-{os.getpid()}-{os.path.basename(args.out)}")
        try:
            with catalog.store.catalog_lock(exclusive=False):
                reader = catalog.con.execute(query).fetch_record_batch(8192)
                write_result(reader, args.format, tmp, max_rows=args.max_rows)
            if tmp:
                os.replace(tmp, args.out)  # the file appears whole or not at all
        except duckdb.PermissionException as exc:
            raise ValueError(f"refused: {str(exc).splitlines()[0]}; fastface sql reads only the store's own "
                             "tables") from None
        except duckdb.Error as exc:
            raise ValueError(f"query failed: {str(exc).splitlines()[0]}") from None
        finally:
            if tmp and os.path.exists(tmp):
                os.remove(tmp)
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

    from fastface import validation
    from fastface.presets import PRESETS
    from evaluation.report import build_report
    from storage.checks import check_store_root

    if args.baseline not in PRESETS:
        raise ValueError(f"--baseline {args.baseline!r} is not a preset; allowed: {', '.join(PRESETS.names())}")
    if args.ip_adapter_scale is not None:
        validation.scale("--ip-adapter-scale", args.ip_adapter_scale)
    validation.positive_int("--bootstrap", args.bootstrap)
    check_store_root(args.root, for_reading=True)

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


def add_snapshots_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="store root: a folder or s3://bucket/prefix")
    parser.add_argument("--limit", type=int, default=30, help="show the latest N snapshots (default %(default)s)")


def run_snapshots(args: argparse.Namespace) -> int:
    from fastface.validation import positive_int
    from storage.checks import check_store_root
    from storage.readonly import readonly_store

    positive_int("--limit", args.limit)
    check_store_root(args.root, for_reading=True)
    with readonly_store(args.root) as store:
        rows, total = store.snapshots(args.limit)
    print(f"{'snapshot':>8} | {'time (UTC)':<19} | what changed")
    for row in rows:
        what = row["changes"] + (f" ({row['message']})" if row["message"] else "")
        print(f"{row['snapshot_id']:>8} | {row['time']:%Y-%m-%d %H:%M:%S} | {what}")
    print(f"({total} snapshots" + (f", latest {len(rows)} shown)" if total > len(rows) else ")"))
    return 0


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="store root: a folder or s3://bucket/prefix")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--snapshot", type=int, help="bring the tables back to this snapshot (see fastface snapshots)")
    when.add_argument("--before", metavar="TIME",
                      help="bring the tables back to the last snapshot before TIME (ISO 8601; UTC unless it says)")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for a run evaluating into the store to finish (default %(default)s)")


@contextlib.contextmanager
def _runs_locked(root: str, runs: list[str], wait_s: float):
    """Hold the run lock (flows.run_lock) of every run in the store, or fail naming the one in progress."""
    from flows.run_lock import RunLockTimeout, file_lock, lock_name

    with contextlib.ExitStack() as stack:
        for run in runs:
            try:
                if os.environ.get("PREFECT_API_URL"):
                    from flows.run_lock import run_lock

                    stack.enter_context(run_lock(run, root, timeout_seconds=wait_s))
                else:  # what `fastface evaluate` on a temporary server takes (flows.run_lock)
                    from pathlib import Path

                    home = Path(os.path.expanduser(os.environ.get("PREFECT_HOME") or "~/.prefect"))
                    stack.enter_context(file_lock(home / "run-locks" / f"{lock_name(run, root)}.lock",
                                                  timeout_seconds=wait_s))
            except (RunLockTimeout, TimeoutError):
                raise ValueError(f"run {run!r} is being evaluated into {root}; restore when it has finished "
                                 f"(or raise --wait)") from None
        yield


def run_restore(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from storage import Store
    from storage.checks import check_store_root

    if args.before is not None:
        try:
            when = datetime.fromisoformat(args.before)
        except ValueError:
            raise ValueError(f"--before {args.before!r} is not an ISO 8601 time (e.g. 2026-12-07T01:30:00)") from None
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    check_store_root(args.root, for_reading=True)
    with Store(args.root) as store:
        runs = store.run_ids("runs")
        snapshot = args.snapshot if args.before is None else store.snapshot_before(when)
        with _runs_locked(args.root, runs, args.wait):
            restored = store.restore(snapshot)
    if not restored:
        print(f"{args.root} already holds the contents of snapshot {snapshot}: nothing to restore")
    else:
        tables = ", ".join(f"{t} {n} rows" for t, n in restored.items())
        print(f"restored {args.root} to snapshot {snapshot} (a new snapshot; undo with fastface restore "
              f"again): {tables}")
    return 0


def register_commands(register) -> None:
    """Entry point of the ``fastface.commands`` group: one line per subcommand."""
    register("evaluate", "run an evaluation config end to end (Prefect)", add_evaluate_arguments, run_evaluate)
    register("sql", "query the result tables with DuckDB (read-only)", add_sql_arguments, run_sql)
    register("report", "write the evaluation report of a run", add_report_arguments, run_report)
    register("snapshots", "list the store's snapshots (what each commit changed)", add_snapshots_arguments,
             run_snapshots)
    register("restore", "bring the store's tables back to an earlier snapshot (undo)", add_restore_arguments,
             run_restore)
    register("app", "a local web app: fronts, galleries, presets side by side, generation",
             "app.cli:add_app_arguments", "app.cli:run_app")
    register("compact", "flush, merge and expire the store's tables (DuckLake maintenance)",
             "storage.commands:add_compact_arguments", "storage.commands:run_compact")
    register("migrate-store", "convert a store of the one-file-per-batch layout to DuckLake",
             "storage.commands:add_migrate_arguments", "storage.commands:run_migrate")
