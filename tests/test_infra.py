"""infra/ read against the code: the KubeRay manifest sets every variable a worker reads and defines what
it refers to, the image installs with the lock's pins, prefect.yaml's deployments are complete, and
the locked environment is consistent (pip check; one distribution provides cv2)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import yaml

from actors.worker_env import SECRET_VARS, actor_runtime_env, describe_runtime_env, worker_vars

REPO = Path(__file__).resolve().parents[1]


def _documents(path: Path) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(path.read_text()) if d}


def _pod_env(spec: dict, configmaps: dict[str, dict]) -> set[str]:
    names = set()
    for container in spec["containers"]:
        names |= {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            names |= set(configmaps[source["configMapRef"]["name"]]["data"])
    return names


def test_kuberay_manifest_is_complete():
    docs = _documents(REPO / "infra" / "kuberay-raycluster.yaml")
    cluster = docs["RayCluster/fastface-ray"]["spec"]
    configmaps = {name.split("/", 1)[1]: d for name, d in docs.items() if name.startswith("ConfigMap/")}
    head, (gpu,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and cluster["enableInTreeAutoscaling"] is True
    worker = gpu["template"]["spec"]
    missing = set(worker_vars()) - _pod_env(worker, configmaps)
    assert not missing, f"worker pods lack {sorted(missing)}"
    # every claim a pod mounts is defined in the same file; /dev/shm is a memory volume on the GPU pods
    for pod in (head["template"]["spec"], worker):
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}" in docs
    mounts = {m["mountPath"]: m["name"] for m in worker["containers"][0]["volumeMounts"]}
    assert {v["name"]: v for v in worker["volumes"]}[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # secrets come from Secrets, never as literal values in the manifest
    for container in worker["containers"]:
        for entry in container["env"]:
            if entry["name"] in SECRET_VARS | {"AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"}:
                assert "valueFrom" in entry and "value" not in entry


def test_prefect_deployments_are_complete():
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    for deployment in deployments.values():
        assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
        assert (REPO / deployment["parameters"]["config"]).is_file() if "config" in deployment["parameters"] else True
    paper = deployments["weekly-paper"]
    assert paper["parameters"]["root"].startswith("s3://")
    env = paper["work_pool"]["job_variables"]["env"]
    assert env["FASTFACE_CATALOG"].startswith("postgres:")  # an s3:// root needs its catalog in a database
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} & set(env)


def test_image_installs_the_lock():
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    lock = (REPO / "requirements" / "lock.txt").read_text()
    base = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M)
    resolved_for = (REPO / "scripts" / "lock.sh").read_text()
    assert base and f"--python-version {base.group(1)}" in resolved_for, "the image's Python is the lock's"
    assert "cp requirements/lock.txt /tmp/constraints.txt" in dockerfile and "pip install -c /tmp/constraints.txt" in dockerfile
    assert "lock-without-torch.sh requirements/lock.txt" in dockerfile  # FASTFACE_TORCH keeps every other pin
    assert re.search(r"^onnxruntime-gpu==", lock, re.M), "the gpu extra's onnxruntime-gpu is pinned"
    assert "pip install --no-deps -c /tmp/constraints.txt onnxruntime-gpu" in dockerfile
    assert not re.search(r"^opencv-python-headless==", lock, re.M) and re.search(r"^opencv-python==", lock, re.M)


def test_locked_environment_is_consistent():
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    providers = sorted({d.metadata["Name"] for d in importlib.metadata.distributions()
                        if any(str(f).startswith("cv2/__init__.py") for f in (d.files or []))})
    assert providers == ["opencv-python"], providers


def test_actor_runtime_env_carries_the_workers_variables(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.write_text("[p]\naws_access_key_id = AKIDFILE\naws_secret_access_key = from-the-file\n")
    environ = {"FASTFACE_CATALOG": "postgres:dbname=x", "FASTFACE_SDXL_BASE": "/models/sdxl", "HOME": "/root",
               "FASTFACE_CLIP_PATH": "", "AWS_PROFILE": "p", "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
               "AWS_CONFIG_FILE": str(tmp_path / "none")}
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, environ, clear=True):
        env = actor_runtime_env()["env_vars"]
    # set values travel, unset/empty ones and unrelated ones do not; the profile's keys are resolved
    # on the driver (the file is not on the worker's node)
    assert env == {"FASTFACE_CATALOG": "postgres:dbname=x", "FASTFACE_SDXL_BASE": "/models/sdxl",
                   "AWS_ACCESS_KEY_ID": "AKIDFILE", "AWS_SECRET_ACCESS_KEY": "from-the-file", "AWS_REGION": "us-east-1"}
    text = describe_runtime_env({"env_vars": env})
    assert "from-the-file" not in text and "AWS_SECRET_ACCESS_KEY (secret)" in text
