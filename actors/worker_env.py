"""The environment every Ray actor of a run needs, carried to it through ``runtime_env``.

An actor on another node does not see the driver's environment: each builds its own
:class:`storage.Store` (catalog, S3 endpoint and credentials) and loads weights from the
``FASTFACE_*`` locations. :func:`actor_runtime_env` hands the driver's values to every actor
(Ray's ``runtime_env={"env_vars": ...}``), so a run works on any node whatever that node's own
environment holds. The names come from the registries that read them (weight sources, metric
checkpoints, the store), so a new variable cannot be forgotten here; ``infra/`` sets the same
names on the pods (checked by ``tests/test_infra.py``).

Credentials travel as what the standard AWS chain resolved on the driver (a shared-credentials
file or a web-identity token file on the driver's machine is not on the worker's): they live
in Ray's runtime environment of the actor only, never in a row, a log line or an artifact
(:func:`describe_runtime_env` prints names, never values).
"""

from __future__ import annotations

import os
from typing import Mapping

from storage.catalog_spec import CATALOG_ENV
from storage.duck import DUCKDB_ENV_VARS
from storage.faults import RETRY_ENV
from storage.s3 import ENDPOINT_ENV_VARS

#: The store: its catalog, the S3 endpoint, DuckDB's limits, how long an outage is waited out.
STORE_VARS = (CATALOG_ENV, *ENDPOINT_ENV_VARS, *DUCKDB_ENV_VARS, RETRY_ENV)
#: The AWS chain's inputs (storage/credentials.py) besides the keys themselves.
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")
#: Caches and hub settings shared by every loader.
CACHE_VARS = ("FASTFACE_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FASTFACE_OFFLINE",
              "FASTFACE_INSIGHTFACE_ROOT", "FASTFACE_VERBOSE")
#: Secrets: carried, never printed.
SECRET_VARS = frozenset({"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
#: What an actor runs with unless the pool is verbose (``FASTFACE_VERBOSE=1``, debug logging): no progress
#: bars (tqdm's, and so diffusers' "Loading pipeline components"; the hub's and transformers'), library logs
#: at error level. Read by each library when it is imported, so an actor imports none of them to quiet them
#: (diffusers alone is ~4 s of CPU in an actor that does not use it).
QUIET_VARS = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "DIFFUSERS_VERBOSITY": "error"}


def weight_vars() -> tuple[str, ...]:
    """Every weight location a worker reads: the checkpoints' sources and the metrics' models."""
    from fastface.checkpoints import SOURCES
    from fastface.metrics.aesthetic import AESTHETIC_PATH_ENV
    from fastface.metrics.clip_models import CLIP_PATH_ENV
    from fastface.metrics.image_reward import ENV_PATH as IMAGEREWARD_PATH_ENV

    return tuple(SOURCES.get(name).env for name in SOURCES.names()) + (
        CLIP_PATH_ENV, AESTHETIC_PATH_ENV, IMAGEREWARD_PATH_ENV)


def worker_vars() -> tuple[str, ...]:
    """All names an actor reads from its environment (store, credentials, caches, weights)."""
    return STORE_VARS + AWS_VARS + CACHE_VARS + weight_vars()


def _resolved_credentials(environ: Mapping[str, str]) -> dict[str, str]:
    """Keys the AWS chain finds on the driver when they are not plain environment variables (a profile,
    a web identity): resolved here so an actor on a node without that file still has them."""
    if environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        return {}
    if not any(environ.get(v) for v in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                         "AWS_ROLE_ARN", "AWS_CONFIG_FILE")):
        return {}
    from storage.credentials import CredentialsError, resolve_s3_credentials

    try:
        found = resolve_s3_credentials()
    except CredentialsError:
        return {}  # a local store needs none; an s3:// store already failed its check with one line
    out = {"AWS_ACCESS_KEY_ID": found.key_id, "AWS_SECRET_ACCESS_KEY": found.secret, "AWS_REGION": found.region}
    if found.token:
        out["AWS_SESSION_TOKEN"] = found.token
    return out


def worker_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's values of :func:`worker_vars` that are set (plus resolved AWS keys, see above)."""
    environ = os.environ if environ is None else environ
    out = {name: environ[name] for name in worker_vars() if environ.get(name)}
    out.update(_resolved_credentials(environ))
    return out


def actor_runtime_env(environ: Mapping[str, str] | None = None) -> dict:
    """Ray ``runtime_env`` for every actor of a pool: ``{"env_vars": worker_environment()}``."""
    return {"env_vars": worker_environment(environ)}


def describe_runtime_env(runtime_env: Mapping) -> str:
    """Names of the variables carried (secrets marked, values never shown), for logs."""
    names = sorted(runtime_env.get("env_vars", {}))
    return ", ".join(f"{n} (secret)" if n in SECRET_VARS else n for n in names) or "none"


__all__ = ["AWS_VARS", "CACHE_VARS", "QUIET_VARS", "SECRET_VARS", "STORE_VARS", "actor_runtime_env", "describe_runtime_env",
           "weight_vars", "worker_environment", "worker_vars"]
