"""S3 credentials: the standard AWS chain, in one place, for every reader and writer of a store.

One rule for ``fastface evaluate --check``, :class:`storage.store.Store` (DuckDB's S3 secret),
s3fs (images) and the Ray actors: credentials are what botocore's default chain finds —
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (optional ``AWS_SESSION_TOKEN``) in the
environment, then the shared credentials/config files (``AWS_PROFILE``,
``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``), then web identity
(``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``, as on EKS), container and instance
metadata. DuckDB's httpfs gets the resolved keys as a secret (its own ``credential_chain``
provider needs the ``aws`` extension, which does not ship on PyPI); s3fs resolves the same
chain itself. Keys are never logged, stored in rows or written into artifacts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from storage.duck import StorageError

CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CHAIN_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with a shared credentials file, "
              "or a web identity: AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN)")
DEFAULT_REGION = "us-east-1"


class CredentialsError(StorageError):
    """No usable S3 credentials; the message says where they were looked for."""


@dataclass(frozen=True)
class S3Credentials:
    """Resolved keys (repr hides the secret and the token) and the region."""

    key_id: str
    secret: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    region: str = DEFAULT_REGION
    method: str = "env"
    """Where botocore found them (``env``, ``shared-credentials-file``, ``assume-role-with-web-identity``, ...)."""


def _session():
    import botocore.session

    return botocore.session.Session()


def resolve_s3_credentials(root: str = "s3://") -> S3Credentials:
    """The credentials the standard AWS chain gives now, or :class:`CredentialsError` naming ``root`` and the fix."""
    from botocore.exceptions import BotoCoreError

    try:
        session = _session()
        credentials = session.get_credentials()
        region = session.get_config_variable("region")
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile no file has
        raise CredentialsError(f"no S3 credentials for {root}: {exc}; {CHAIN_HINT}") from None
    if credentials is None:
        raise CredentialsError(f"no S3 credentials for {root}: {CHAIN_HINT}")
    try:
        frozen = credentials.get_frozen_credentials()
    except BotoCoreError as exc:  # a web identity or role that cannot be assumed
        raise CredentialsError(f"S3 credentials for {root} could not be obtained "
                               f"({getattr(credentials, 'method', 'unknown')}): {exc}") from None
    if not frozen.access_key or not frozen.secret_key:
        raise CredentialsError(f"no S3 credentials for {root}: {CHAIN_HINT}")
    return S3Credentials(key_id=frozen.access_key, secret=frozen.secret_key, token=frozen.token or None,
                         region=region or os.environ.get("AWS_REGION") or DEFAULT_REGION,
                         method=getattr(credentials, "method", "unknown"))


def duckdb_secret_fields(credentials: S3Credentials) -> dict[str, str]:
    """The key fields of DuckDB's ``CREATE SECRET (TYPE s3, ...)`` for these credentials."""
    out = {"KEY_ID": credentials.key_id, "SECRET": credentials.secret, "REGION": credentials.region}
    if credentials.token:
        out["SESSION_TOKEN"] = credentials.token
    return out


__all__ = ["CHAIN_HINT", "CREDENTIAL_VARS", "CredentialsError", "S3Credentials", "duckdb_secret_fields",
           "resolve_s3_credentials"]
