"""Results and checkpoints on S3, against a moto S3 server on 127.0.0.1."""

import sys

import pytest

from icm_ray.errors import UserError
from icm_ray.store import S3Store, open_store, safe_name
from tests.conftest import _start_moto, demo_subset


def test_round_trip_and_clear(s3_env):
    store = open_store(f"s3://{s3_env}/runs/a")
    assert isinstance(store, S3Store) and store.is_empty()
    store.write_json("summary.json", {"x": 1})
    store.write_parquet("labels.parquet", [{"id": "a", "label": True}])
    store.write_jsonl("steering_examples/p.jsonl", [{"id": "a"}])
    assert store.exists("summary.json") and not store.exists("nope.json")
    assert store.read_json("summary.json") == {"x": 1}
    assert store.read_parquet("labels.parquet") == [{"id": "a", "label": True}]
    assert not store.is_empty()
    store.clear()
    assert store.is_empty()
    with pytest.raises(UserError, match="not found"):
        store.read_json("summary.json")


def test_missing_bucket_is_one_clear_line(s3_env):
    with pytest.raises(UserError, match="s3://no-such-bucket-x: bucket does not exist"):
        open_store("s3://no-such-bucket-x/run")


def test_bad_credentials_are_one_clear_line(monkeypatch):
    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this server checks IAM
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        with pytest.raises(UserError, match="access denied") as info:
            open_store("s3://some-bucket/run")
        assert "\n" not in str(info.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_names_are_sanitised_for_keys_and_paths():
    for evil in ["../../etc/passwd", "a/b", "x\x00y\n", "..", ""]:
        name = safe_name(evil)
        assert "/" not in name and ".." not in name.replace("-", "") and name
        assert all(ord(c) >= 32 for c in name)
    assert safe_name("politically-liberal") == "politically-liberal"
    assert safe_name("a/b") != safe_name("a_b")


@pytest.mark.slow
def test_run_and_resume_on_s3_through_ray(ray_cluster, s3_env, tmp_path, monkeypatch):
    """Results and checkpoints land on S3; an interrupted run resumes from its S3 checkpoints."""
    from icm_ray.cli import main
    from icm_ray.engine import run_on_ray
    from icm_ray.store import open_store

    data = demo_subset(tmp_path, personas=1, per_persona=8)
    uri = f"s3://{s3_env}/runs/r1"
    config = tmp_path / "config.yaml"
    config.write_text("ray:\n  checkpoint_every: 1\n")
    monkeypatch.setattr(sys, "argv", ["icm-ray", "run", "--data", str(data), "--iterations", "3",
                                      "--out", uri, "--config", str(config)])
    import icm_ray.engine as engine

    real = engine.run_on_ray
    calls = []

    def interrupted(*args, **kwargs):  # first attempt dies after the first checkpoints
        if not calls:
            calls.append(1)

            def stop(persona, info):
                if info["iteration"] >= 1:
                    raise KeyboardInterrupt
            return real(args[0], args[1], args[2], stop)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_on_ray", interrupted)
    with pytest.raises(SystemExit) as first:
        main()
    assert first.value.code == 130
    store = open_store(uri)
    assert store.exists("inputs.json") and not store.exists("summary.json")
    persona = store.read_json("inputs.json")["examples"][0]["persona"]
    assert store.read_json(f"checkpoints/{safe_name(persona)}.json")["iteration"] >= 1
    monkeypatch.setattr(sys, "argv", ["icm-ray", "run", "--resume", uri])
    with pytest.raises(SystemExit) as second:
        main()
    assert second.value.code == 0
    summary = store.read_json("summary.json")
    assert summary["personas"][0]["iterations"] == 3
    assert len(store.read_parquet("labels.parquet")) == 8
    assert run_on_ray is real
