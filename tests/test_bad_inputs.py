"""Bad input through the real entry points: one line naming the problem, a non-zero exit, no traceback,
nothing written or deleted that should not be.

Most cases call the CLI's ``main`` in this process (no model is loaded before these checks, and a
subprocess costs several seconds of imports); a representative subset runs ``fastface`` as a
subprocess, where the exit code and the whole output are the user's. S3 cases run against moto's
server on 127.0.0.1 and against a port on 127.0.0.1 that refuses connections. The last tests run a
real ``fastface evaluate`` (its own temporary Prefect server and local Ray): a run whose every
generation fails exits 1 with one line, and a SIGINT to its process group during generation stops
it within 10 s, after which the re-run completes exactly the planned rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from conftest import wait_for_stored_rows  # noqa: E402
from storage_support import FAKE_AWS_ENV, create_bucket, moto_endpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CI_CONFIG = str(REPO / "configs" / "ci.yaml")
IMAGES = Path(next(iter(importlib.util.find_spec("insightface").submodule_search_locations))) / "data" / "images"
HANKS, GROUP = IMAGES / "Tom_Hanks_54745.png", IMAGES / "t1.jpg"
BUCKET = "fastface-bad-inputs"


# -- helpers -----------------------------------------------------------------------------------
def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under the folders with its size and mtime: equal before and after = nothing written/deleted."""
    out = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                stat = path.stat()
                out[str(path)] = (stat.st_size, stat.st_mtime_ns)
            else:
                out[str(path)] = (-1, 0)
    return out


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_line_error(code: int, out: str, err: str, pattern: str, *, only_line: bool = True) -> str:
    assert code not in (0, None), f"exit {code}; stdout {out!r}; stderr {err!r}"
    assert "Traceback" not in out + err, err
    errors = error_lines(err)
    assert len(errors) == 1, f"expected one error line, got: {err!r}"
    assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"
    if only_line:
        assert [line for line in err.splitlines() if line.strip()] == errors, err
        assert not out.strip(), out
    return errors[0]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    from fastface.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def run_fastface(argv: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastface.cli", *argv], env=env or subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def refused_endpoint() -> str:
    """An http URL on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_config(path: Path, **changes) -> Path:
    import yaml

    config = yaml.safe_load(Path(CI_CONFIG).read_text())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(config))
    return path


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def work(tmp_path):
    """A folder with a corrupt photo, a faceless photo, an existing output and a plain file."""
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(6000))
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noface.png")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.png").write_bytes(b"existing output")
    (tmp_path / "empty-folder").mkdir()
    return tmp_path


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    """A small real store: examples of run `r` with presets baseline and am1, metrics, and an earlier report."""
    from storage import Store, Sweep
    from fastface.presets import get_preset

    root = tmp_path_factory.mktemp("store") / "root"
    store = Store(str(root))
    sweep = Sweep(run_id="r", identities=[{"identity_id": "i0", "content_hash": "h0"}],
                  prompts=[{"prompt_id": "p0", "text": "a photo of a person", "kind": "realistic"}],
                  models=["tiny-hyper"], presets={p: get_preset(p).to_dict() for p in ("baseline", "am1")},
                  ip_adapter_scales=[0.8], code_version="t", steps=2, width=32, height=32)
    examples = sweep.examples()
    store.append("examples", examples, "r")
    store.append("metrics", [{"example_id": e["example_id"], "metric": "clip", "value": 0.2} for e in examples], "r")
    store.write_bytes("reports/r/table.csv", b"earlier report\n")
    return root


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    endpoint = moto_endpoint()
    create_bucket(endpoint, BUCKET)
    return endpoint


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("FASTFACE_S3_ENDPOINT_URL", s3)
    return s3


@pytest.fixture
def no_s3_credentials(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("FASTFACE_S3_ENDPOINT_URL", refused_endpoint())


# -- generate: every flag checked before any model work ----------------------------------------
def _generate(work: Path, *extra: str, out: str | None = "out/x.png") -> list[str]:
    argv = ["generate", "--model", "tiny-hyper", "--face", str(HANKS), "--prompt", "a photo of a person"]
    if out is not None:
        argv += ["--out", str(work / out) if not out.startswith("/") else out]
    return argv + list(extra)


GENERATE_CASES = [
    (("--ip-adapter-scale", "nan"), {}, r"--ip-adapter-scale must be a finite number, got nan"),
    (("--ip-adapter-scale", "1e9"), {}, r"--ip-adapter-scale is 1000000000\.0, out of range; allowed: 0 <= "),
    (("--lora-scale", "-5"), {}, r"--lora-scale is -5\.0, out of range; allowed: 0 <= --lora-scale <= 1\.5"),
    (("--size", "0"), {}, r"--size must be a positive multiple of 2 for model 'tiny-hyper', got 0"),
    (("--size", "-64"), {}, r"--size must be a positive multiple of 2 .* got -64"),
    (("--size", "33"), {}, r"--size must be a positive multiple of 2 for model 'tiny-hyper' \(e\.g\. 32\), got 33"),
    (("--size", "100000"), {}, r"--size is 100000, out of range; allowed: 2 <= --size <= 4096"),
    (("--steps", "0"), {}, r"--steps must be a positive whole number, got 0"),
    (("--batch-size", "0"), {}, r"--batch-size must be a positive whole number, got 0"),
    (("--size", "abc"), {}, r"argument --size: invalid int value: 'abc'"),
    ((), {"out": "out/x.gif"}, r"--out: .*x\.gif has suffix '\.gif'; allowed: \.png, \.jpg, \.jpeg, \.webp"),
    ((), {"out": "out"}, r"--out: .*out is a folder; give an image file name"),
    ((), {"out": "a-file/x.png"}, r"--out: .*a-file is a file, not a folder"),
    ((), {"out": "/proc/fastface-nope/x.png"}, r"--out: cannot write to /proc/fastface-nope .*not writable"),
    (("--model", "tiny-hyperr"), {}, r"unknown model 'tiny-hyperr'. Did you mean 'tiny-hyper'"),
    (("--preset", "ff-am3"), {}, r"unknown preset 'ff-am3'.*ff-am2"),
    (("--face-backend", "insightface"), {}, r"face-backend 'insightface' gives 512-d .* use --face-backend dlib"),
]


@pytest.mark.parametrize("extra, where, message", GENERATE_CASES,
                         ids=[" ".join(c[0]) or c[1]["out"] for c in GENERATE_CASES])
def test_generate_rejects_flags(work, capsys, extra, where, message):
    before = snapshot(work)
    code, out, err = run_main(capsys, _generate(work, *extra, **where))
    assert_one_line_error(code, out, err, message)
    assert snapshot(work) == before


def test_generate_rejects_missing_face_and_bad_batch_files(work, capsys):
    before = snapshot(work)
    cases = [
        (["generate", "--model", "tiny-hyper", "--face", str(work / "nope.png"), "--prompt", "p", "--out",
          str(work / "out" / "y.png")], r"face photo .*nope\.png not found"),
        (["generate", "--model", "tiny-hyper", "--face", str(HANKS), "--out", str(work / "out" / "y.png")],
         r"give --face and --prompt \(or --batch-file\)"),
    ]
    (work / "seed.jsonl").write_text(json.dumps({"face": str(HANKS), "prompt": "p", "seed": "x1"}) + "\n")
    (work / "empty.csv").write_text("face,prompt\n")
    before = snapshot(work)
    cases += [
        (["generate", "--model", "tiny-hyper", "--batch-file", str(work / "seed.jsonl"), "--out", str(work / "out")],
         r"seed\.jsonl: row 1: seed must be a whole number, got 'x1'"),
        (["generate", "--model", "tiny-hyper", "--batch-file", str(work / "empty.csv"), "--out", str(work / "out")],
         r"batch file .*empty\.csv has no rows"),
    ]
    for argv, message in cases:
        assert_one_line_error(*run_main(capsys, argv), message)
    assert snapshot(work) == before


def test_generate_names_unreadable_and_faceless_photos(work, capsys, fastface_cache):
    before = snapshot(work)
    for photo, message in ((work / "corrupt.png", r"cannot read image .*corrupt\.png"),
                           (work / "noface.png", r"no face found in .*noface\.png")):
        argv = ["generate", "--model", "tiny-hyper", "--face", str(photo), "--prompt", "p", "--out",
                str(work / "out" / "y.png"), "--cache-dir", str(fastface_cache)]
        assert_one_line_error(*run_main(capsys, argv), message)
    assert snapshot(work) == before


def test_generate_writes_the_suffix_it_prints_and_names_the_face_of_a_group_photo(work, capsys, fastface_cache):
    """Not bad input, but the two promises of the issue: --out x.jpg writes x.jpg; a group photo says what it used."""
    out = work / "out" / "group.jpg"
    code, stdout, stderr = run_main(capsys, [
        "generate", "--model", "tiny-hyper", "--preset", "am1", "--face", str(GROUP), "--prompt", "a person",
        "--out", str(out), "--size", "32", "--steps", "2", "--cache-dir", str(fastface_cache)])
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (32, 32)
    assert not out.with_suffix(".png").exists() and out.with_suffix(".json").is_file()
    assert re.search(r"note: .*t1\.jpg: \d+ faces found; using the most prominent one, at x=\d+\.\.\d+", stderr)


# -- faces compare and score ------------------------------------------------------------------
def test_faces_compare_and_score_reject_bad_input(work, capsys):
    prompts = work / "prompts.tsv"
    prompts.write_text("kept.png\ta photo of a person\n")
    before = snapshot(work)
    cases = [
        (["faces", "compare", str(work / "nope.png"), str(HANKS), "--backend", "dlib"], r"image .*nope\.png not found"),
        (["faces", "compare", str(work / "corrupt.png"), str(HANKS), "--backend", "dlib"],
         r"cannot read image .*corrupt\.png"),
        (["faces", "compare", str(HANKS), str(work / "noface.png"), "--backend", "dlib"],
         r"no face found in .*noface\.png"),
        (["faces", "compare", str(HANKS), str(HANKS), "--backend", "opencv"],
         r"argument --backend: invalid choice: 'opencv'"),
        (["score", "--images", str(work / "nope"), "--prompts", str(prompts)], r"images folder .*nope not found"),
        (["score", "--images", str(work / "out"), "--prompts", str(work / "nope.tsv")],
         r"prompts file .*nope\.tsv not found"),
        (["score", "--images", str(work / "out"), "--prompts", str(prompts), "--metrics", "clp"],
         r"--metrics: unknown metric\(s\) clp; allowed: .*clip"),
        (["score", "--images", str(work / "out"), "--prompts", str(prompts), "--batch-size", "0"],
         r"--batch-size must be a positive whole number, got 0"),
        (["score", "--images", str(work / "out"), "--prompts", str(prompts), "--out", str(work / "rows.txt")],
         r"--out: .*rows\.txt has suffix '\.txt'; allowed: \.parquet, \.csv, \.jsonl"),
        (["score", "--images", str(work / "out"), "--prompts", str(prompts), "--out",
          str(work / "a-file" / "rows.csv")], r"--out: .*a-file is a file, not a folder"),
    ]
    for argv, message in cases:
        assert_one_line_error(*run_main(capsys, argv), message)
    assert snapshot(work) == before


def test_faces_compare_says_which_face_of_a_group_photo_it_used(capsys):
    code, out, err = run_main(capsys, ["faces", "compare", str(GROUP), str(HANKS), "--backend", "dlib"])
    assert code == 0 and "similarity" in out
    assert re.search(r"note: .*t1\.jpg: \d+ faces found; using the most prominent one", err)


# -- evaluate --check: everything a run would reject --------------------------------------------
def _check(work: Path, *sets: str, config: str = CI_CONFIG, root: str | None = None) -> list[str]:
    argv = ["evaluate", "--config", config, "--root", root or str(work / "root"), "--check"]
    for item in sets:
        argv += ["--set", item]
    return argv


CHECK_CASES = [
    (("sweep.size=33",), r"sweep\.size must be a positive multiple of 2 for model 'tiny-hyper' \(e\.g\. 32\)"),
    (("sweep.size=0",), r"sweep\.size must be a positive multiple of 2"),
    (("dataset.prompts=[]",), r"dataset: no prompts; give dataset\.prompts"),
    (("dataset.prompts=['oil painting; person reading']", "sweep.sets=[{prompts: realistic, presets: [am1]}]"),
     r"sweep\.sets\[0\]: needs realistic prompts but the dataset has only stylistic ones"),
    (("name.x=1",), r"invalid override name\.x: name is a str \('ci'\), not a section"),
    (("sweep.ip_adapter_scales=[.nan]",), r"sweep\.ip_adapter_scales: values \[nan\] are out of range"),
    (("sweep.lora_scales=[-5]",), r"sweep\.lora_scales: values \[-5\.0\] are out of range"),
    (("sweep.ip_adapter_scales=[]",), r"sweep\.ip_adapter_scales: values: give at least one value"),
    (("report.ip_adapter_scale=.inf",), r"report\.ip_adapter_scale must be a finite number"),
    (("report.baseline=nope",), r"report\.baseline: unknown preset 'nope'; allowed: baseline, dcg"),
    (("sweep.steps=0",), r"sweep\.steps: steps must be a positive integer, got 0"),
    (("sweep.lora_scale=[1]",), r"sweep\.lora_scale: unknown field"),
    (("x=[",), r"--set x=\[: the value is not valid YAML"),
    (("=3",), r"--set expects KEY=VALUE"),
]


@pytest.mark.parametrize("sets, message", CHECK_CASES, ids=[" ".join(c[0]) for c in CHECK_CASES])
def test_evaluate_check_rejects_config_values(work, capsys, sets, message):
    before = snapshot(work)
    assert_one_line_error(*run_main(capsys, _check(work, *sets)), message)
    assert snapshot(work) == before and not (work / "root").exists()


def test_evaluate_check_rejects_photos_files_and_roots(work, capsys):
    corrupt = write_config(work / "corrupt.yaml", **{"dataset.identities": [{"uri": str(work / "corrupt.png")}]})
    faceless = write_config(work / "faceless.yaml", **{"dataset.identities": [{"uri": str(work / "noface.png")}]})
    crowd = write_config(work / "crowd.yaml", **{"dataset.identities": [{"uri": str(GROUP), "crop_faces": 40}]})
    (work / "broken.yaml").write_text("name: [unclosed\n")
    before = snapshot(work)
    cases = [
        (_check(work, config=str(corrupt)), r"dataset\.identities\[0\]: cannot read image .*corrupt\.png"),
        (_check(work, config=str(faceless)), r"dataset\.identities\[0\]: no face found in .*noface\.png"),
        (_check(work, config=str(crowd)), r"crop_faces is 40 but .*t1\.jpg has \d+ face\(s\)"),
        (_check(work, config=str(work / "nope.yaml")), r"config file .*nope\.yaml not found"),
        (_check(work, config=str(work / "broken.yaml")), r"config file .*broken\.yaml is not valid YAML"),
        (_check(work, root=str(work / "a-file" / "root")), r"--root: .*root is under .*a-file, which is a file"),
        (_check(work, root="/proc/fastface-nope"), r"--root: cannot write to /proc/fastface-nope"),
    ]
    for argv, message in cases:
        assert_one_line_error(*run_main(capsys, argv), message)
    assert snapshot(work) == before


def test_evaluate_check_accepts_the_ci_config_and_creates_nothing(work, capsys):
    code, out, _ = run_main(capsys, _check(work))
    assert code == 0 and "is valid" in out and not (work / "root").exists()


# -- sql and report ----------------------------------------------------------------------------
def test_sql_rejects_roots_that_are_not_stores_and_bad_queries(work, store_root, capsys):
    before = snapshot(work, store_root)
    cases = [
        (["sql", "--root", str(work / "nope"), "SELECT 1"], r"no store at .*nope: the folder does not exist"),
        (["sql", "--root", str(work / "empty-folder"), "SELECT 1"], r"empty-folder is not a FastFace store"),
        (["sql", "--root", str(store_root), "   "], r"the query is empty"),
        (["sql", "--root", str(store_root), ";"], r"the query is empty"),
        (["sql", "--root", str(store_root), "SELECT nope FROM metrics"], r"query failed: .*nope"),
        (["sql", "--root", str(store_root), "--max-rows", "0", "SELECT 1"], r"--max-rows must be a positive"),
    ]
    for argv, message in cases:
        assert_one_line_error(*run_main(capsys, argv), message)
    assert snapshot(work, store_root) == before and not (work / "nope").exists()


def test_report_rejects_bad_baselines_and_roots_without_overwriting(work, store_root, capsys):
    before = snapshot(work, store_root)
    cases = [
        (["report", "--root", str(store_root), "--baseline", "nope"],
         r"--baseline 'nope' is not a preset; allowed: baseline, dcg, am1, am2, ff-am1, ff-am2"),
        (["report", "--root", str(store_root), "--baseline", "dcg"],
         r"--baseline 'dcg' is not a preset of run 'r'; its presets: am1, baseline"),
        (["report", "--root", str(store_root), "--ip-adapter-scale", "nan"], r"--ip-adapter-scale must be a finite"),
        (["report", "--root", str(store_root), "--bootstrap", "0"], r"--bootstrap must be a positive whole number"),
        (["report", "--root", str(store_root), "--run", "nope"], r"no examples of run 'nope'"),
        (["report", "--root", str(work / "nope")], r"no store at .*nope"),
    ]
    for argv, message in cases:
        assert_one_line_error(*run_main(capsys, argv), message)
    assert snapshot(work, store_root) == before and not (work / "nope").exists()
    assert (store_root / "reports" / "r" / "table.csv").read_bytes() == b"earlier report\n"


# -- S3 ------------------------------------------------------------------------------------------
def test_s3_roots_fail_in_one_line(work, capsys, s3_env, monkeypatch):
    prefix = f"s3://{BUCKET}/{work.name}"
    cases = [
        (["sql", "--root", f"s3://{BUCKET}-missing/x", "SELECT 1"], r"S3 bucket 'fastface-bad-inputs-missing' .*"
                                                                     r"does not exist at http://127\.0\.0\.1"),
        (["sql", "--root", f"{prefix}/empty", "SELECT 1"], r"s3://.*/empty is not a FastFace store"),
        (["report", "--root", f"{prefix}/empty"], r"s3://.*/empty is not a FastFace store"),
        (["sql", "--root", "s3:///x", "SELECT 1"], r"s3:///x names no bucket"),
        (_check(work, root=f"s3://{BUCKET}-missing/run"), r"S3 bucket 'fastface-bad-inputs-missing'"),
    ]
    for argv, message in cases:
        assert_one_line_error(*run_main(capsys, argv), message)
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix=work.name)  # nothing created on read
    monkeypatch.setenv("FASTFACE_S3_ENDPOINT_URL", refused := refused_endpoint())
    for argv in (["sql", "--root", f"{prefix}/data", "SELECT 1"], ["report", "--root", f"{prefix}/data"],
                 _check(work, root=f"{prefix}/data")):
        started = time.monotonic()
        assert_one_line_error(*run_main(capsys, argv), rf"cannot reach the S3 endpoint {re.escape(refused)} for "
                                                       rf"s3://{BUCKET}/.*: connection refused")
        assert time.monotonic() - started < 10


def test_s3_without_credentials_names_the_variables(work, capsys, no_s3_credentials):
    """The one credential rule (storage/credentials.py) finds nothing: sql, report, evaluate --check and
    evaluate itself (before Prefect or Ray start) each say so in one line."""
    for argv in (["sql", "--root", f"s3://{BUCKET}/x", "SELECT 1"], ["report", "--root", f"s3://{BUCKET}/x"],
                 _check(work, root=f"s3://{BUCKET}/x"),
                 ["evaluate", "--config", CI_CONFIG, "--root", f"s3://{BUCKET}/x"]):
        assert_one_line_error(*run_main(capsys, argv),
                              r"no S3 credentials for s3://.*: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


# -- the same through `fastface` subprocesses: exit code and the whole output ------------------------
def test_subprocess_cases(work, store_root, s3):
    before = snapshot(work, store_root)
    no_credentials = subprocess_env(AWS_SHARED_CREDENTIALS_FILE=str(work / "none"), AWS_CONFIG_FILE=str(work / "none"),
                                    AWS_EC2_METADATA_DISABLED="true")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        no_credentials.pop(key, None)
    refused = refused_endpoint()
    refusing = subprocess_env(FASTFACE_S3_ENDPOINT_URL=refused, **FAKE_AWS_ENV)
    cases = [
        (_generate(work, "--ip-adapter-scale", "nan"), None, r"--ip-adapter-scale must be a finite number, got nan"),
        (_generate(work, "--size", "abc"), None, r"argument --size: invalid int value: 'abc'"),
        (_check(work, "sweep.size=33"), None, r"sweep\.size must be a positive multiple of 2"),
        (_check(work, "name.x=1"), None, r"invalid override name\.x"),
        (["sql", "--root", str(work / "nope"), "SELECT 1"], None, r"no store at .*nope"),
        (["sql", "--root", str(store_root), ""], None, r"the query is empty"),
        (["report", "--root", str(store_root), "--baseline", "nope"], None, r"--baseline 'nope' is not a preset"),
        (["sql", "--root", f"s3://{BUCKET}/x", "SELECT 1"], no_credentials,
         r"no S3 credentials for s3://.*: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        (["sql", "--root", f"s3://{BUCKET}/x", "SELECT 1"], refusing, rf"cannot reach the S3 endpoint {refused}"),
    ]
    for argv, env, message in cases:
        result = run_fastface(argv, env)
        assert_one_line_error(result.returncode, result.stdout, result.stderr, message)
        assert result.returncode == 2
    assert snapshot(work, store_root) == before and not (work / "nope").exists()


# -- failures are failures; retries only for what can change -------------------------------------
def test_a_run_whose_every_image_failed_exits_1_with_the_first_error(tmp_path, capsys):
    from flows.cli import _report_failures
    from storage import Store

    store = Store(str(tmp_path))
    store.append("generations", [{"example_id": f"e{i}", "status": "failed", "error": "height and width must be "
                                  "multiples of 2, got 33x33\nmore detail"} for i in range(8)], "ci")
    assert _report_failures(str(tmp_path), "ci", {"generation": {"ok": 0, "failed": 8}}) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: generation failed: all 8 planned images of run 'ci' failed; first error: "
                                "height and width must be multiples of 2, got 33x33"]
    # partial failures: counts and the first error, exit 0 (a re-run retries them)
    assert _report_failures(str(tmp_path), "ci", {"generation": {"ok": 5, "failed": 3}}) == 0
    assert capsys.readouterr().err.startswith("warning: generation: 3 of 8 images of run 'ci' failed (re-run to retry")


def test_only_transient_errors_are_retried():
    import torch
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError
    from ray.exceptions import RayActorError

    from evaluation.config import ConfigError
    from evaluation.retries import is_transient, retry_transient
    from fastface.faces import NoFaceError

    transient = [ConnectionResetError(), TimeoutError(), EndpointConnectionError(endpoint_url="http://x"),
                 RayActorError(), torch.OutOfMemoryError("CUDA out of memory"), MemoryError(),
                 RuntimeError("generator actors died 5 times (limit 4); giving up")]
    deterministic = [ValueError("sweep set 'joint' has no prompts"), ConfigError("x"), NoFaceError("a.png"),
                     KeyError("unknown model 'nope'"), FileNotFoundError("a.png"),
                     PermissionError("root"), NoCredentialsError(), TypeError("x"),
                     RuntimeError("generator actor failed to start: CUDA unavailable")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in deterministic] == [False] * len(deterministic)

    class State:
        def __init__(self, exc):
            self.data = exc

    assert retry_transient(None, None, State(ConnectionError())) is True
    assert retry_transient(None, None, State(ValueError("dataset.prompts is empty"))) is False


# -- real `fastface evaluate` runs: a failed stage, and Ctrl-C ----------------------------------------
def _evaluate_command(root: Path, cache_dir: str, *sets: str) -> list[str]:
    command = [sys.executable, "-m", "fastface.cli", "evaluate", "--config", CI_CONFIG, "--root", str(root),
               "--set", f"execution.cache_dir={cache_dir}"]
    for item in sets:
        command += ["--set", item]
    return command


def _evaluate_env(tmp_path: Path, ray_cluster) -> dict:
    """The run's own temporary Prefect server (fresh PREFECT_HOME); this session's Ray (start-up is slow)."""
    env = subprocess_env(PREFECT_HOME=str(tmp_path / "prefect-home"),
                         RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    env.pop("PREFECT_API_URL", None)
    return env


def _alive_actors(ray_cluster, wait_s: float = 10.0) -> list:
    """The pools' named actors still registered (a driver's actors end with it; give Ray a moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [a for a in ray_cluster.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("fastface-")]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def test_a_failed_stage_exits_1_in_one_line(tmp_path, ray_cluster, prefect_server, fastface_cache):
    """Every generator fails to start (no such device): no retries, exit 1, one error line, no traceback."""
    root = tmp_path / "root"
    env = dict(_evaluate_env(tmp_path, ray_cluster), PREFECT_API_URL=prefect_server["url"],  # the session's server
               PREFECT_HOME=str(prefect_server["home"]))
    result = subprocess.run(_evaluate_command(root, str(fastface_cache), "execution.device=cuda:99"),
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and re.match(r"error: evaluation 'ci' failed: .*generator actor failed to start",
                                         errors[0]), output[-3000:]
    assert output.count("generate-shard-0") and "Retrying" not in output  # a config error is not retried
    assert not _alive_actors(ray_cluster)


def test_ctrl_c_stops_within_10_s_and_the_rerun_completes_exactly_the_planned_rows(tmp_path, ray_cluster,
                                                                                    fastface_cache):
    import psutil

    from storage import Catalog, Store

    root = tmp_path / "root"
    # One image per batch at 128 px (~0.5 s each on CI's cores): generation lasts long enough to be caught working.
    command = _evaluate_command(root, str(fastface_cache), "execution.batch_size=1", "sweep.ip_adapter_scales=[0.5, 0.8]",
                                "sweep.size=128")
    env = _evaluate_env(tmp_path, ray_cluster)
    planned = 16  # 2 identities × 2 prompts × 2 presets × 2 scales; one generations file per image (batch 1)
    log = open(tmp_path / "interrupted.log", "w+")
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # generation has started: a generations row is committed
        stored = wait_for_stored_rows(root, "generations", 1, timeout=420, alive=lambda: proc.poll() is None)
        assert stored and proc.poll() is None, log.seek(0) or log.read()[-3000:]
        descendants = psutil.Process(proc.pid).children(recursive=True)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.seek(0)
    output = log.read()
    assert took < 10, f"exit took {took:.1f} s"
    assert proc.returncode == 130 and "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and re.match(r"interrupted: run 'ci' has \d+ of 16 planned images and \d+ scores stored; "
                                        r"run `fastface evaluate --config .* --root .*` again to resume", lines[0]), \
        output[-3000:]
    assert output.rstrip().endswith(lines[0])  # the last thing printed
    time.sleep(1)
    assert not [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # Prefect server
    assert not _alive_actors(ray_cluster)

    killed_rows = Store(str(root)).read("generations").num_rows
    assert 1 <= killed_rows < planned
    # --json: the summary alone on stdout (Prefect's and Ray's logs on stderr), what `| python -m json.tool` reads
    rerun = subprocess.run(command + ["--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    pretty = subprocess.run([sys.executable, "-m", "json.tool"], input=rerun.stdout, capture_output=True, text=True)
    assert pretty.returncode == 0, rerun.stdout[-3000:]
    summary = json.loads(pretty.stdout)
    assert summary["run"] == "ci" and summary["generation"]["ok"] == planned - killed_rows, summary
    with Catalog(Store(str(root))) as catalog:
        raw = catalog.query("SELECT count(*) FROM generations_raw").column(0)[0].as_py()
        ok = catalog.query("SELECT count(*) FROM generations WHERE status = 'ok'").column(0)[0].as_py()
        examples = catalog.query("SELECT count(*) FROM examples_raw").column(0)[0].as_py()
    assert (raw, ok, examples) == (planned, planned, planned)  # every planned row once, none generated twice
    assert len(Store(str(root)).image_ids("ci")) == planned
