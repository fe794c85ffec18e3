"""Scorer backends, one file each, and the registry that maps a backend name to one.

`auto` (the default) picks vllm where the replica has a GPU (device cuda, or torch sees
one) and the vllm package is installed, and transformers otherwise: CPU runs are unchanged.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from icm_ray.backends.base import CachingScorer, Scorer, ScoreRequest, ScoreResult
from icm_ray.errors import UserError

__all__ = ["BACKENDS", "CachingScorer", "ScoreRequest", "ScoreResult", "Scorer", "check_model",
           "load_scorer", "resolve_backend"]


def _transformers(model: dict[str, Any]) -> Scorer:
    from icm_ray.backends.hf import TransformersScorer

    return TransformersScorer(model.get("name", "smollm2-135m"), model.get("dtype", "auto"),
                              model.get("threads"), model.get("device", "cpu"),
                              kv_cache_mb=model.get("kv_cache_mb", 2048))


def _vllm(model: dict[str, Any]) -> Scorer:
    from icm_ray.backends.vllm_backend import VLLMScorer

    return VLLMScorer(model.get("name", "smollm2-135m"), model.get("dtype", "auto"),
                      model.get("engine_args") or {})


def _openai(model: dict[str, Any]) -> Scorer:
    from icm_ray.backends.openai_compat import OpenAICompatScorer

    return OpenAICompatScorer(model.get("base_url") or "", model.get("name", ""), model.get("api_key_env"),
                              model.get("timeout_s", 60.0), model.get("max_retries", 4),
                              model.get("concurrency", 4), model.get("top_logprobs", 5))


BACKENDS = {"transformers": _transformers, "vllm": _vllm, "openai": _openai}


def resolve_backend(model: dict[str, Any]) -> str:
    backend = model.get("backend", "auto")
    if backend != "auto":
        return backend
    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    if str(model.get("device", "cpu")).startswith("cuda"):
        return "vllm"
    import torch

    return "vllm" if torch.cuda.is_available() else "transformers"


def load_scorer(model: dict[str, Any]) -> Scorer:
    """Build the scorer a model config (ModelConfig as a dict) asks for."""
    backend = resolve_backend(model)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}' (use auto, {', '.join(BACKENDS)})")
    return BACKENDS[backend](model)


def check_model(model: dict[str, Any]) -> None:
    """Fail before anything starts, in one line: a local model must exist, a server must answer
    with logprobs for the model name."""
    if model.get("backend") == "openai":
        _openai(model).close()
        return
    if model.get("backend") == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("backend vllm needs the vllm package: pip install 'icm-ray[gpu]' on a GPU "
                        "machine, or `make venv-vllm` for the CPU build")
    from icm_ray.models import resolve

    resolve(model.get("name", "smollm2-135m"))
