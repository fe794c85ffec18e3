"""The effective configuration of a run: YAML/JSON file, then command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from icm_ray.data import read_yaml
from icm_ray.errors import UserError
from icm_ray.fields import Integer
from icm_ray.prompts import PromptConfig
from icm_ray.search import SearchConfig

KV_CACHE_MB_MAX = 1_048_576  # 1 TiB of KV states per replica: anything above is a typo


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str = Field("auto", description="auto (vllm where a replica has a GPU and vllm is "
                         "installed, else transformers), transformers, vllm, openai")
    name: str = Field("smollm2-135m", description="named model, .gguf file or HF directory; "
                      "for openai: the server's model name")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (bf16 where the CPU has it), float32, bfloat16, float16")
    threads: Integer | None = Field(None, ge=1, description="torch threads per replica")
    device: str = "cpu"
    kv_cache_mb: Integer = Field(2048, ge=0, json_schema_extra={"maximum": KV_CACHE_MB_MAX},
                                 description="transformers backend: MiB of KV states of prompt "
                                 "prefixes kept across calls (LRU; 0: keep none; at most 1048576)")
    # openai backend (any server with /v1/completions and logprobs)
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="name of the environment variable holding "
                                    "the API key (the key itself is never written to results)")
    timeout_s: float = Field(60.0, gt=0, description="per HTTP request")
    max_retries: Integer = Field(4, ge=0, description="on connection errors, 429 and 5xx, with backoff")
    concurrency: Integer = Field(4, ge=1, description="HTTP requests in flight per scorer")
    top_logprobs: Integer = Field(5, ge=1, le=20, description="alternatives asked for per request")
    # vllm backend
    engine_args: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM arguments")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from icm_ray.backends import BACKENDS

        if value != "auto" and value not in BACKENDS:
            raise ValueError(f"unknown backend '{value}' (use auto, {', '.join(BACKENDS)})")
        return value

    @field_validator("kv_cache_mb")
    @classmethod
    def _sane_cache_size(cls, value: int) -> int:
        if value > KV_CACHE_MB_MAX:
            raise PydanticCustomError(
                "less_than_equal", "at most {limit} MiB (1 TiB) per replica, got {value}",
                {"limit": KV_CACHE_MB_MAX, "value": value})
        return value

    @model_validator(mode="after")
    def _openai_needs_url(self) -> ModelConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs model.base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: Integer = Field(1, ge=1, description="model replicas on Ray Serve")
    replica_cpus: float = Field(1.0, gt=0)
    replica_gpus: float = Field(0.0, ge=0)
    max_batch_size: Integer = Field(8, ge=1, description="scoring calls per shared forward batch")
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    actor_cpus: float = Field(0.05, gt=0, description="fractional, so actors never starve replicas")
    checkpoint_every: Integer = Field(5, ge=1, description="iterations between checkpoints")
    max_restarts: Integer = Field(3, ge=0)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    search: SearchConfig = SearchConfig()
    prompts: PromptConfig = PromptConfig()
    model: ModelConfig = ModelConfig()
    ray: RayConfig = RayConfig()


def describe_validation_error(err: ValidationError, source: str, within: str = "") -> str:
    """One line for the first error: `source: field 'a.b': message (and N more)`.

    `within` is where the validated mapping sits in the source (e.g. "config" in inputs.json).
    """
    first = err.errors()[0]
    where = ".".join([within] * bool(within) + [str(p) for p in first["loc"]]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: field '{where}': {first['msg']}{more}"


def load_config(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"{path}: no such config file")
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping with sections search/prompts/model/ray")
        raw = loaded
    for section, values in (overrides or {}).items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            base = raw.get(section) or {}
            if not isinstance(base, dict):
                raise UserError(f"{source}: field '{section}': expected a mapping")
            raw[section] = {**base, **values}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(describe_validation_error(err, source)) from None
