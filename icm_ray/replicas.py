"""Shared model replicas on Ray Serve, and the Scorer that searches use to reach them.

`ModelReplica` owns one copy of the model. `@serve.batch` gathers the scoring calls of every
persona (and every tuning trial) that arrive together into one `Scorer.score` call, so
requests that share a prefix share its work. `ServeScorer` is the client side: a `Scorer`
that forwards to a deployment handle and retries while Serve replaces a dead replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from ray import serve

from icm_ray.backends.base import Scorer, ScoreRequest, ScoreResult
from icm_ray.errors import UserError, user_error_in

log = logging.getLogger(__name__)
MODEL_APP = "icm-model"


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, model: dict[str, Any], max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.005):
        from icm_ray.backends import CachingScorer, load_scorer

        # Results cached by request content on the replica too: a persona actor restarted after
        # a crash replays the steps since its checkpoint and gets the very numbers it got
        # before (a recomputation in another batch can round differently in bf16), and
        # searches or tuning trials that ask the same question share one answer.
        self.scorer = CachingScorer(load_scorer(model))
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.calls = 0

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def score_batch(self, calls: list[list[ScoreRequest]]) -> list[list[ScoreResult] | UserError]:
        flat = [request for call in calls for request in call]
        self.calls += len(calls)
        try:  # in a thread: the event loop keeps collecting the next batch meanwhile
            results = await asyncio.to_thread(self.scorer.score, flat)
        except UserError:  # one call's input (a prompt over the context) must not fail the others
            return [await self._score_alone(call) for call in calls]
        out, start = [], 0
        for call in calls:
            out.append(results[start:start + len(call)])
            start += len(call)
        return out

    async def _score_alone(self, call: list[ScoreRequest]) -> list[ScoreResult] | UserError:
        try:
            return await asyncio.to_thread(self.scorer.score, call)
        except UserError as err:
            return err

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        result = await self.score_batch(requests)
        if isinstance(result, UserError):
            raise result
        return result

    def identity(self) -> dict[str, Any]:
        return self.scorer.identity()

    async def generate(self, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                       logprobs: int | None = None, seed: int | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self.scorer.generate, prompt, max_tokens, temperature,
                                       logprobs, seed)

    def check_health(self) -> None:  # Serve calls this; a raising replica is replaced
        pass


def model_app(config):
    """The Serve application holding the model replicas (bound, ready for serve.run).

    `config` is a RunConfig: its `model` section says what to load, `ray` how many replicas.
    """
    import os

    model, ray = config.model.model_dump(), config.ray
    if model["threads"] is None:  # Ray sets OMP threads to the replica's CPU share; use the cores
        model["threads"] = max(1, int(ray.replica_cpus), (os.cpu_count() or 1) // ray.replicas)
    return ModelReplica.options(
        num_replicas=ray.replicas,
        max_ongoing_requests=max(2 * ray.max_batch_size, 8),  # >= batch size, or batches cap at 5
        ray_actor_options={"num_cpus": ray.replica_cpus, "num_gpus": ray.replica_gpus},
    ).bind(model, ray.max_batch_size, ray.batch_wait_timeout_s)


class ServeScorer(Scorer):
    """A Scorer backed by the model deployment. Retries while a replica is being replaced."""

    def __init__(self, handle, retry_seconds: float = 300.0):
        self.handle = handle
        self.retry_seconds = retry_seconds
        self._identity: dict[str, Any] | None = None

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        while True:
            try:
                return self.handle.score.remote(list(requests)).result()
            except Exception as err:  # replica died or is restarting: Serve will replace it
                if user_error_in(err):  # the input itself: retrying cannot help
                    raise UserError(str(user_error_in(err))) from None
                if time.monotonic() > deadline:
                    raise
                log.warning("scoring failed (%s); retrying in %.1fs", type(err).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = self.handle.identity.remote().result()
        return self._identity
