"""Scorer backends, one file each, and the registry that maps a backend name to one."""

from __future__ import annotations

from typing import Any

from icm_ray.backends.base import CachingScorer, Scorer, ScoreRequest, ScoreResult
from icm_ray.errors import UserError

__all__ = ["BACKENDS", "CachingScorer", "ScoreRequest", "ScoreResult", "Scorer", "load_scorer"]


def _transformers(model: dict[str, Any]) -> Scorer:
    from icm_ray.backends.hf import TransformersScorer

    return TransformersScorer(model.get("name", "smollm2-135m"), model.get("dtype", "auto"),
                              model.get("threads"), model.get("device", "cpu"))


BACKENDS = {"transformers": _transformers}


def load_scorer(model: dict[str, Any]) -> Scorer:
    """Build the scorer a model config (ModelConfig as a dict) asks for."""
    backend = model.get("backend", "transformers")
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}' (use one of {', '.join(BACKENDS)})")
    return BACKENDS[backend](model)
