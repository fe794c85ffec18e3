import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def write_native(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def typed_rows(persona: str = "p", n: int = 12) -> list[dict]:
    """Claims of two hidden types; gold says alpha statements are True."""
    rows = []
    for i in range(n):
        kind = "alpha" if i % 2 == 0 else "beta"
        rows.append({"id": f"{persona}-{i}", "persona": persona,
                     "claim": f"statement {i} of kind {kind}", "gold": kind == "alpha"})
    return rows


@pytest.fixture
def typed_file(tmp_path):
    return write_native(tmp_path / "typed.jsonl", typed_rows())


@pytest.fixture(scope="session")
def ray_cluster():
    """One private local Ray cluster for the whole session (each start costs seconds)."""
    import logging

    import ray
    from ray import serve

    from icm_ray.engine import patient_serve_proxy

    patient_serve_proxy()  # as ensure_ray: a slow proxy start is not a dead proxy
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=200 * 1024 * 1024, logging_level=logging.WARNING,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})  # loopback only
    yield ray
    serve.shutdown()
    ray.shutdown()


def demo_subset(tmp_path, personas=2, per_persona=10) -> Path:
    """A small native file cut from the built-in demo data (the tests never need ../shared)."""
    from icm_ray.data import load_demo

    dataset, _ = load_demo()
    rows = []
    for name in dataset.personas()[:personas]:
        for example in [e for e in dataset.examples if e.persona == name][:per_persona]:
            rows.append({"id": example.id, "persona": name, "claim": example.claim,
                         "gold": dataset.gold[example.id]})
    return write_native(tmp_path / "subset.jsonl", rows)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(env_extra: dict):
    """A real S3 protocol server (moto) on 127.0.0.1, in its own process."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env_extra})
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    return proc, url


@pytest.fixture(scope="session")
def moto_server():
    proc, url = _start_moto({})
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """AWS settings pointing boto3 at the loopback moto server, and a fresh bucket."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"icm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket
