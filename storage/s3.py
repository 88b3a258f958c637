"""S3 settings of a store: the endpoint (``FASTFACE_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``), its
reachability check, and the fsspec / botocore options every S3 call of a store uses (fail in
seconds on a dead endpoint). Credentials: :mod:`storage.credentials`.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from storage.duck import StorageError

ENDPOINT_ENV_VARS = ("FASTFACE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
#: Seconds one TCP connect to an S3 endpoint may take (also botocore's connect timeout, storage.checks).
CONNECT_TIMEOUT_S = 5
S3_CLIENT_CONFIG = {"connect_timeout": CONNECT_TIMEOUT_S, "retries": {"max_attempts": 2, "mode": "standard"}}


def s3_endpoint() -> str | None:
    return next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)


def s3_endpoint_settings() -> dict[str, str]:
    """The endpoint fields of DuckDB's S3 secret (none for AWS itself), from ``FASTFACE_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``."""
    out: dict[str, str] = {}
    endpoint = s3_endpoint()
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not url.hostname:
            raise StorageError(f"S3 endpoint {endpoint!r} (from {'/'.join(ENDPOINT_ENV_VARS)}) has no host")
        out["ENDPOINT"] = url.netloc
        out["USE_SSL"] = "true" if url.scheme == "https" else "false"
        out["URL_STYLE"] = "path"
    return out


def endpoint_unreachable(endpoint: str) -> str | None:
    """Why a TCP connect to the S3 endpoint fails (``None`` when it answers): one connect, at most
    :data:`CONNECT_TIMEOUT_S`, so a wrong or dead endpoint fails in seconds. The one home of this
    check: :class:`Store` and :func:`storage.checks.check_store_root` word their own errors around it."""
    url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc)).lower()


def check_endpoint_reachable(endpoint: str) -> None:
    reason = endpoint_unreachable(endpoint)
    if reason:
        raise StorageError(
            f"cannot reach the S3 endpoint {endpoint} (from ${next(v for v in ENDPOINT_ENV_VARS if os.environ.get(v))}): "
            f"{reason}; check the URL or unset it to use AWS"
        )


def s3_fs_options(storage_options=None, endpoint: str | None = None) -> dict:
    """fsspec options for an s3:// store: the endpoint (unless given), no cached listings (other
    processes write there), and client timeouts so a dead endpoint fails in seconds, not after a minute."""
    options = dict(storage_options or {})
    client_kwargs = options.get("client_kwargs") or {}
    if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
        options["endpoint_url"] = endpoint
    options.setdefault("use_listings_cache", False)
    options.setdefault("config_kwargs", S3_CLIENT_CONFIG)
    return options
