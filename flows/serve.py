"""Scheduled evaluations: serve ``evaluate`` on a cron schedule against a Prefect server.

    export PREFECT_API_URL=http://127.0.0.1:4200/api     # `prefect server start` (see docs/evaluation.md)
    python -m flows.serve --config configs/smoke.yaml --root runs/nightly --cron "0 3 * * *"

``flow.serve`` registers the deployment and runs its scheduled runs in this process
(no work pool needed). For a work pool (process or Kubernetes workers), use
``prefect deploy`` with the repository's ``prefect.yaml``, or :func:`register_deployment`
with ``work_pool_name``.
"""

from __future__ import annotations

import argparse
from typing import Sequence

DEFAULT_CRON = "0 3 * * *"  # nightly, 03:00 UTC
DEPLOYMENT_NAME = "nightly"


def deployment(config: str, root: str, *, name: str = DEPLOYMENT_NAME, cron: str = DEFAULT_CRON,
               timezone: str = "UTC", work_pool_name: str | None = None, paused: bool | None = None):
    """The ``RunnerDeployment`` of ``evaluate`` with its parameters and a cron schedule."""
    from prefect.schedules import Cron

    from flows.evaluate import evaluate_flow

    return evaluate_flow.to_deployment(
        name=name, schedules=[Cron(cron, timezone=timezone)], parameters={"config": config, "root": root},
        work_pool_name=work_pool_name, paused=paused, tags=["fastface", "evaluation"],
        description=f"FastFace evaluation of {config} into {root}",
    )


def register_deployment(config: str, root: str, **options) -> str:
    """Register (create or update) the scheduled deployment with the Prefect API; returns its id."""
    return str(deployment(config, root, **options).apply())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--root", default="runs/nightly")
    parser.add_argument("--cron", default=DEFAULT_CRON)
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--name", default=DEPLOYMENT_NAME)
    parser.add_argument("--register-only", action="store_true", help="register the deployment and exit")
    args = parser.parse_args(argv)
    from evaluation.config import load_config

    load_config(args.config)  # fail now, not at 03:00
    if args.register_only:
        print(register_deployment(args.config, args.root, name=args.name, cron=args.cron, timezone=args.timezone))
        return 0
    from prefect import serve

    serve(deployment(args.config, args.root, name=args.name, cron=args.cron, timezone=args.timezone))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
