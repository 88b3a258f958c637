"""One credential rule for S3 (storage.credentials): the standard AWS chain for the checks, the Store's
DuckDB secret and s3fs alike. Credentials that live only in a shared-credentials file selected by
``AWS_PROFILE`` open a store on moto; without any, each command says so in one line."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from storage_support import FAKE_AWS_ENV, create_bucket, moto_endpoint  # noqa: E402

from storage.catalog import Catalog  # noqa: E402
from storage.credentials import CredentialsError, duckdb_secret_fields, resolve_s3_credentials  # noqa: E402
from storage.catalog_spec import CATALOG_ENV  # noqa: E402
from storage.store import Store  # noqa: E402

BUCKET = "fastface-credentials"
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
            "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@pytest.fixture
def clean_aws(monkeypatch, tmp_path):
    """No credentials anywhere the chain looks (environment, default files, instance metadata)."""
    for key in AWS_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    return tmp_path


def _profile_file(folder, profile: str = "fastface-test") -> str:
    path = folder / "credentials"
    path.write_text(f"[{profile}]\naws_access_key_id = {FAKE_AWS_ENV['AWS_ACCESS_KEY_ID']}\n"
                    f"aws_secret_access_key = {FAKE_AWS_ENV['AWS_SECRET_ACCESS_KEY']}\n"
                    f"aws_session_token = {FAKE_AWS_ENV['AWS_SESSION_TOKEN']}\nregion = eu-west-1\n")
    return str(path)


def test_environment_credentials_resolve(clean_aws, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-env")
    found = resolve_s3_credentials()
    assert (found.key_id, found.secret, found.token, found.method) == ("AKIDENV", "secret-env", None, "env")
    assert "secret-env" not in repr(found)  # the secret never reaches a log line through repr
    assert duckdb_secret_fields(found) == {"KEY_ID": "AKIDENV", "SECRET": "secret-env", "REGION": "us-east-1"}


def test_profile_credentials_resolve(clean_aws, monkeypatch):
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", _profile_file(clean_aws))
    monkeypatch.setenv("AWS_PROFILE", "fastface-test")
    found = resolve_s3_credentials()
    assert (found.key_id, found.token, found.method) == ("testing", "testing", "shared-credentials-file")
    assert duckdb_secret_fields(found)["SESSION_TOKEN"] == "testing"


def test_missing_and_unknown_profile_are_one_line(clean_aws, monkeypatch):
    with pytest.raises(CredentialsError, match=r"^no S3 credentials for s3://b/x: set AWS_ACCESS_KEY_ID and "
                                               r"AWS_SECRET_ACCESS_KEY \(or AWS_PROFILE"):
        resolve_s3_credentials("s3://b/x")
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(CredentialsError, match=r"no S3 credentials for s3://b/x: .*nope.*AWS_PROFILE") as info:
        resolve_s3_credentials("s3://b/x")
    assert "\n" not in str(info.value)


def test_store_on_s3_with_profile_credentials_only(clean_aws, monkeypatch, capsys):
    """Tables (DuckDB's secret), images (s3fs) and the CLI's store check all take the profile's keys."""
    endpoint = moto_endpoint()
    create_bucket(endpoint, BUCKET)
    monkeypatch.setenv("FASTFACE_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", _profile_file(clean_aws))
    monkeypatch.setenv("AWS_PROFILE", "fastface-test")
    monkeypatch.setenv(CATALOG_ENV, f"sqlite:{clean_aws / 'catalog.sqlite'}")
    root = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/data"
    store = Store(root)
    store.append("generations", [{"example_id": "e0", "status": "ok"}], run_id="r1")
    uri = store.write_image("r1", "e0", b"\x89PNG profile")
    assert store.read_bytes(uri) == b"\x89PNG profile"
    with Catalog(Store(root)) as cat:
        assert cat.rows("SELECT count(*) AS n FROM generations") == [{"n": 1}]
    from fastface.cli import main

    assert main(["sql", "--root", root, "SELECT count(*) AS n FROM generations"]) == 0
    assert "1" in capsys.readouterr().out
    monkeypatch.delenv("AWS_PROFILE")  # the same command with no credentials at all: one line
    code = main(["sql", "--root", root, "SELECT 1"])
    err = capsys.readouterr().err
    assert code == 2 and [line for line in err.splitlines() if line.strip()] == [
        line for line in err.splitlines() if line.startswith("error: no S3 credentials for s3://")]

