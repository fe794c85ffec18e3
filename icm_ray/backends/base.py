"""The one interface every backend implements, and the content-keyed cache around it.

Contract (modelled on lm-evaluation-harness's `LM`):
- A `ScoreRequest` is (segments, query, options). The prompt is ''.join(segments) + query.
  Segments are tokenised one by one and their tokens concatenated, then the query's tokens;
  a backend may reuse work for requests that share leading segments, and must give the
  same numbers whether or not it does (up to floating-point rounding).
- Options are continuations of the query (the space before a word belongs to the option,
  e.g. " True"). Each option is represented by its first token; the first tokens of the
  options must differ. The response is log-softmax over those tokens' logits at the
  position after the query: log-probabilities normalised over the options only.
- Every result reports `prompt_tokens` (the tokens of its whole prompt) and `tokens_run`
  (the tokens the model actually ran for it; shared prefix tokens are charged to the first
  request that needed them). prompt_tokens - tokens_run were served from cache.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ScoreRequest:
    segments: tuple[str, ...]
    query: str
    options: tuple[str, ...]

    def content_key(self) -> str:
        payload = json.dumps([self.segments, self.query, self.options], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ScoreResult:
    logprobs: tuple[float, ...]
    prompt_tokens: int
    tokens_run: int

    @property
    def tokens_cached(self) -> int:
        return self.prompt_tokens - self.tokens_run


class Scorer(ABC):
    """Answers batches of label-scoring requests. Implementations: one file each."""

    @abstractmethod
    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """One result per request, in order."""

    def identity(self) -> dict[str, Any]:
        """What model this is (name, file hash, dtype): recorded in every run's config.json."""
        return {"backend": type(self).__name__}

    def generate(self, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                 logprobs: int | None = None, seed: int | None = None) -> dict[str, Any]:
        """Continue `prompt`. Returns text, prompt_tokens, completion_tokens, finish_reason and,
        when `logprobs` is given, OpenAI-style tokens / token_logprobs / top_logprobs."""
        raise NotImplementedError(f"{type(self).__name__} does not generate text")


class CachingScorer(Scorer):
    """Wraps a scorer with an LRU cache keyed by a hash of each request's content."""

    def __init__(self, inner: Scorer, max_entries: int = 200_000):
        self.inner = inner
        self.max_entries = max_entries
        self._cache: OrderedDict[str, ScoreResult] = OrderedDict()

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        keys = [r.content_key() for r in requests]
        results: list[ScoreResult | None] = [None] * len(requests)
        missing: dict[str, int] = {}
        for index, key in enumerate(keys):
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                results[index] = replace(hit, tokens_run=0)
            elif key not in missing:
                missing[key] = index
        if missing:
            fresh = self.inner.score([requests[i] for i in missing.values()])
            for key, result in zip(missing, fresh):
                self._cache[key] = result
                results[missing[key]] = result
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        for index, key in enumerate(keys):  # duplicates inside one batch
            if results[index] is None:
                results[index] = replace(self._cache[key], tokens_run=0)
        return results  # type: ignore[return-value]

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def generate(self, *args, **kwargs) -> dict[str, Any]:
        return self.inner.generate(*args, **kwargs)
