"""Checks on a store root before anything opens it: one line naming the root and the fix, within seconds.

- local: a root to read must be a folder that holds tables (a read never creates one);
  a root to write must be a folder that exists or can be created.
- ``s3://``: credentials must be found by the standard AWS chain (:mod:`storage.credentials`;
  the message names the variables), the endpoint
  must answer (a refused or silent endpoint fails in about :data:`CONNECT_TIMEOUT_S`
  seconds, naming it), and the bucket must exist.

:data:`storage.s3.S3_CLIENT_CONFIG` is what :class:`storage.store.Store` gives botocore, so every
S3 call fails fast on a dead endpoint instead of retrying for tens of seconds.
"""

from __future__ import annotations

import os

from storage.credentials import CHAIN_HINT, CredentialsError, resolve_s3_credentials
from storage.schemas import TABLES
from storage.layout import CATALOG_FILE, DATA_DIR
from storage.s3 import CONNECT_TIMEOUT_S, S3_CLIENT_CONFIG, endpoint_unreachable, s3_endpoint, s3_fs_options

class StoreRootError(ValueError):
    """A store root that cannot be used; the message names the root and what to do."""


def _check_s3_credentials(root: str) -> None:
    """The one credential rule (:func:`storage.credentials.resolve_s3_credentials`), as a store-root error."""
    try:
        resolve_s3_credentials(root)
    except CredentialsError as exc:
        raise StoreRootError(str(exc)) from None


def _check_endpoint_answers(root: str, endpoint: str) -> None:
    """A refused or silent endpoint fails here in seconds, naming it (the check: :func:`endpoint_unreachable`)."""
    reason = endpoint_unreachable(endpoint)
    if reason:
        raise StoreRootError(f"cannot reach the S3 endpoint {endpoint} for {root}: {reason}; check "
                             "FASTFACE_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and that the server is up")


def _s3_call_error(root: str, exc: Exception) -> StoreRootError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StoreRootError(f"no S3 credentials for {root}: {CHAIN_HINT}")
    if isinstance(exc, EndpointConnectionError):
        return StoreRootError(f"cannot reach the S3 endpoint for {root}: {exc}")
    if isinstance(exc, PermissionError) or (isinstance(exc, ClientError) and "AccessDenied" in str(exc)):
        return StoreRootError(f"access to {root} denied: check the credentials' permissions ({exc})")
    return StoreRootError(f"cannot open {root}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _has_tables(fs, path: str) -> bool:
    try:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return False
    return bool(names & _STORE_MARKERS)


#: What a store root holds: the DuckLake catalog file and data folder (or, in the old layout, one
#: folder per table — opening such a root then names ``fastface migrate-store``).
_STORE_MARKERS = set(TABLES) | {CATALOG_FILE, DATA_DIR}


def check_store_root(root: str, *, for_reading: bool) -> None:
    """Fail with one line when ``root`` cannot be used; nothing is created (also not a missing local folder)."""
    if not root or not str(root).strip():
        raise StoreRootError("the store root is empty: give a folder or s3://bucket/prefix")
    protocol = root.split("://", 1)[0] if "://" in root else "file"
    if protocol in ("file", "local"):
        path = os.path.abspath(os.path.expanduser(root.split("://", 1)[-1]))
        if for_reading:
            if not os.path.isdir(path):
                raise StoreRootError(f"no store at {path}: the folder does not exist (give the --root an evaluation "
                                     "wrote)")
            if not set(os.listdir(path)) & _STORE_MARKERS:
                raise StoreRootError(f"{path} is not a FastFace store: it has none of the tables "
                                     f"{', '.join(TABLES)}/ (give the --root an evaluation wrote)")
            return
        from fastface.validation import writable_folder

        try:
            writable_folder("--root", path)
        except ValueError as exc:
            raise StoreRootError(str(exc)) from None
        return
    if protocol not in ("s3", "s3a"):
        return  # other fsspec protocols: their own errors
    bucket = root.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise StoreRootError(f"{root} names no bucket: use s3://bucket/prefix")
    _check_s3_credentials(root)
    endpoint = s3_endpoint()
    if endpoint:
        _check_endpoint_answers(root, endpoint)
    import fsspec

    try:  # the bucket and the tables first: opening the store itself needs its catalog configured
        fs = fsspec.filesystem("s3", **s3_fs_options(endpoint=endpoint))
        if not fs.exists(bucket):
            raise StoreRootError(f"S3 bucket {bucket!r} of {root} does not exist" +
                                 (f" at {endpoint}" if endpoint else "") + "; create it or fix the root")
        if for_reading and not _has_tables(fs, root.split("://", 1)[1].rstrip("/")):
            raise StoreRootError(f"{root} is not a FastFace store: it has none of the tables {', '.join(TABLES)}/")
    except StoreRootError:
        raise
    except Exception as exc:  # botocore/s3fs errors, turned into one line naming the root
        raise _s3_call_error(root, exc) from None


__all__ = ["CONNECT_TIMEOUT_S", "S3_CLIENT_CONFIG", "StoreRootError", "check_store_root", "s3_fs_options"]
