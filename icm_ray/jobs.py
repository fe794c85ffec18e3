"""Cluster jobs: send a run to a Ray cluster with the Ray Jobs SDK, and follow it.

The job's working directory is a bundle of this project's source plus the local files the
run names (--data, --config, --personas), so the cluster runs exactly this code on exactly
this data. Python dependencies come from the cluster's environment (see cluster.yaml) plus
any `--pip` packages, installed by Ray's runtime environment.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from icm_ray.errors import UserError

PROJECT = Path(__file__).resolve().parent.parent
FILE_OPTIONS = {"--data", "-d", "--config", "-c", "--personas"}


def job_address(address: str | None) -> str:
    return (address or os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or "http://127.0.0.1:8265")


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as err:  # the SDK raises ConnectionError/RuntimeError with long texts
        raise UserError(f"cannot reach the Ray job server at {url} ({type(err).__name__})") from None


def bundle(run_args: list[str]) -> tuple[Path, list[str]]:
    """A temporary working dir with the project source and the run's local input files."""
    work = Path(tempfile.mkdtemp(prefix="icm-ray-job-"))
    for part in ("icm_ray", "serve", "tune"):
        shutil.copytree(PROJECT / part, work / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(PROJECT / "pyproject.toml", work / "pyproject.toml")
    (work / "inputs").mkdir()
    args, rewritten = list(run_args), []
    out_given = False
    index = 0
    while index < len(args):
        arg = args[index]
        rewritten.append(arg)
        if arg in ("--out", "-o", "--resume") and index + 1 < len(args):
            value = args[index + 1]
            if not (value.startswith("s3://") or os.path.isabs(value)):
                raise UserError(f"{arg} {value}: a cluster job needs an absolute path or s3:// URI")
            out_given = True
        if arg in FILE_OPTIONS and index + 1 < len(args):
            source = Path(args[index + 1])
            if not source.exists():
                raise UserError(f"{source}: no such file or directory")
            target = work / "inputs" / f"{len(rewritten)}-{source.name}"
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
            rewritten.append(f"inputs/{target.name}")
            index += 2
            continue
        index += 1
    if not out_given:
        raise UserError("a cluster job needs --out (an absolute path on the cluster or s3://...)")
    return work, rewritten


def submit(address: str | None, run_args: list[str], pip: list[str] | None = None) -> str:
    work, args = bundle(run_args)
    try:
        runtime_env: dict = {"working_dir": str(work)}
        if pip:
            runtime_env["pip"] = list(pip)
        # `python -m` runs the bundled source (the working dir comes first on sys.path).
        entrypoint = "python -m icm_ray.cli run " + shlex.join(args)
        jobs = client(address)
        for attempt in range(30):
            try:
                return jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            except Exception as err:
                # A freshly started head needs a few seconds before its job agent answers.
                if "No available agent" in str(err) and attempt < 29:
                    time.sleep(2)
                    continue
                raise UserError(f"job submission to {job_address(address)} failed: {err}") from None
        raise AssertionError("unreachable")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _call(address: str | None, method: str, job_id: str):
    jobs = client(address)
    try:
        return getattr(jobs, method)(job_id)
    except RuntimeError as err:
        if "does not exist" in str(err) or "404" in str(err):
            raise UserError(f"no job '{job_id}' on {job_address(address)}") from None
        raise UserError(f"{method} for job '{job_id}' failed: {err}") from None


def status(address: str | None, job_id: str) -> str:
    return str(_call(address, "get_job_status", job_id).value)


def logs(address: str | None, job_id: str) -> str:
    return _call(address, "get_job_logs", job_id)


def stop(address: str | None, job_id: str) -> bool:
    return bool(_call(address, "stop_job", job_id))


def wait(address: str | None, job_id: str, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = status(address, job_id)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        if time.monotonic() > deadline:
            raise UserError(f"job '{job_id}' still {state} after {timeout_s:.0f}s")
        time.sleep(poll_s)
