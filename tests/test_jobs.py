"""`icm-ray submit` to a real Ray head started here with `ray start --head` (loopback only)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from icm_ray.store import RunStore
from tests.conftest import _free_port, demo_subset

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's unix sockets live here
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # as with an activated venv
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats",
                    # own ports for every agent, so another cluster on this machine never clashes
                    f"--dashboard-agent-listen-port={_free_port()}",
                    f"--dashboard-agent-grpc-port={_free_port()}",
                    f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                    f"--ray-client-server-port={_free_port()}"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:  # stop only this head's processes (`ray stop` would stop every cluster here)
        mine = [p for p in psutil.process_iter(["cmdline"])
                if any(temp in part for part in (p.info["cmdline"] or []))]
        for proc in mine:
            proc.terminate()
        _, alive = psutil.wait_procs(mine, timeout=15)
        for proc in alive:
            proc.kill()


@pytest.mark.slow
def test_submit_runs_the_job_on_the_cluster_and_writes_results(ray_head, tmp_path):
    data = demo_subset(tmp_path, personas=1, per_persona=8)
    out = tmp_path / "job-run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([str(BIN / "icm-ray"), "submit", "--address", ray_head, "--wait", "--",
                           "--data", str(data), "--iterations", "2", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    job_id = done.stdout.splitlines()[0]
    assert "SUCCEEDED" in done.stdout
    summary = RunStore(out).read_json("summary.json")
    assert summary["personas"][0]["iterations"] == 2
    status = subprocess.run([str(BIN / "icm-ray"), "jobs", "status", job_id, "--address", ray_head],
                            env=env, capture_output=True, text=True, timeout=60)
    assert status.stdout.strip() == "SUCCEEDED"
    logs = subprocess.run([str(BIN / "icm-ray"), "jobs", "logs", job_id, "--address", ray_head],
                          env=env, capture_output=True, text=True, timeout=60)
    assert "ICM results per persona" in logs.stdout
    missing = subprocess.run([str(BIN / "icm-ray"), "jobs", "status", "raysubmit_nope",
                              "--address", ray_head], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no job 'raysubmit_nope'" in missing.stderr


def test_submit_needs_an_absolute_out(tmp_path):
    from icm_ray.errors import UserError
    from icm_ray.jobs import bundle

    with pytest.raises(UserError, match="absolute path or s3://"):
        bundle(["--out", "relative/run"])
    with pytest.raises(UserError, match="needs --out"):
        bundle(["--iterations", "2"])


def test_unreachable_job_server_is_one_line(capsys, monkeypatch):
    from icm_ray.cli import main

    monkeypatch.setattr(sys, "argv", ["icm-ray", "jobs", "status", "raysubmit_x", "--address",
                                      f"http://127.0.0.1:{_free_port()}"])  # nothing listens there
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "cannot reach the Ray job server" in err and "\n" not in err
