"""OpenAI-compatible backend: scores through any server's `/v1/completions` with `logprobs`.

Works with vLLM's OpenAI server, Ray Serve LLM, llama.cpp's server and our own
`icm-ray serve`. Each request is one completion of ''.join(segments) + query with
max_tokens=1, temperature 0 and the top `top_logprobs` alternatives of the first generated
token; the options' log-probabilities are read from those and renormalised over the options
(log-softmax), as the in-process backends do with logits.

An option is matched to a top-logprob token by exact text, else by the longest token that
starts it (its first token, for options of several tokens). An option missing from the
top-k is read from a second request: the prompt plus the option with `echo`, where the
prompt logprob of the option's first token is exact (vLLM supports this). A server without
echo gets a one-line error naming the option and `top_logprobs` to raise.

Accounting: prompt_tokens is the server's `usage.prompt_tokens`. The client cannot see the
server's prefix cache, so tokens_run = prompt_tokens unless the server reports
`usage.prompt_tokens_details.cached_tokens` (vLLM with --enable-prompt-tokens-details).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from icm_ray.backends.base import Scorer, ScoreRequest, ScoreResult
from icm_ray.errors import UserError

RETRY_STATUS = {429, 500, 502, 503, 504}


class OpenAICompatScorer(Scorer):
    def __init__(self, base_url: str, model: str, api_key_env: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 4, concurrency: int = 4,
                 top_logprobs: int = 5, backoff_s: float = 0.5, probe: bool = True):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise UserError(f"model.base_url: '{base_url}' is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.top_logprobs = top_logprobs
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise UserError(f"model.api_key_env: environment variable {api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        self.client = httpx.Client(headers=headers, timeout=timeout,
                                   limits=httpx.Limits(max_connections=concurrency))
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-compat")
        self.requests_sent = 0
        self._lock = threading.Lock()
        if probe:  # fail at start-up, in one line, on a wrong URL, model name or a server without logprobs
            self._logprob_rows(self._complete("Hello", max_tokens=1, logprobs=1))

    def identity(self) -> dict[str, Any]:
        return {"backend": "openai", "base_url": self.base_url, "model": self.model}

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()

    # ------------------------------------------------------------------ HTTP

    def _complete(self, prompt: str, **params: Any) -> dict[str, Any]:
        """One POST /completions, retried with exponential backoff on connection errors, 429, 5xx."""
        body = {"model": self.model, "prompt": prompt, "temperature": 0.0, **params}
        url = f"{self.base_url}/completions"
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            delay = min(self.backoff_s * 2 ** attempt, 30.0)
            try:
                with self._lock:
                    self.requests_sent += 1
                response = self.client.post(url, json=body)
            except httpx.TransportError as err:  # refused, reset, timed out
                if last:
                    raise UserError(f"cannot reach OpenAI-compatible server {url} after "
                                    f"{attempt + 1} tries ({type(err).__name__}: {err})") from None
                time.sleep(delay)
                continue
            if response.status_code in RETRY_STATUS and not last:
                after = response.headers.get("retry-after", "")
                time.sleep(max(delay, float(after)) if after.replace(".", "", 1).isdigit() else delay)
                continue
            if response.status_code >= 400:
                raise UserError(self._describe_failure(url, response, attempt + 1))
            try:
                data = response.json()
                data["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                raise UserError(f"{url}: not an OpenAI completions response "
                                f"({response.text[:120]!r})") from None
            return data
        raise AssertionError("unreachable")

    def _describe_failure(self, url: str, response: httpx.Response, tries: int) -> str:
        try:
            detail = response.json()
            detail = detail.get("error", detail.get("detail", detail)) if isinstance(detail, dict) else detail
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
        except ValueError:
            detail = response.text
        detail = " ".join(str(detail).split())[:200]
        status = response.status_code
        if status in (401, 403):
            return f"{url}: the server refused the API key ({status}: {detail}); check model.api_key_env"
        if status == 404 and "model" in detail.lower():
            return f"{url}: model '{self.model}' not found on the server (404: {detail}); check model.name"
        if status in RETRY_STATUS:
            return f"{url}: server error {status} after {tries} tries ({detail})"
        return f"{url}: the server rejected the request ({status}: {detail})"

    # --------------------------------------------------------------- parsing

    def _logprob_rows(self, data: dict[str, Any]) -> dict[str, Any]:
        """The choice's logprobs as OpenAI legacy lists (tokens, token_logprobs, top_logprobs,
        text_offset); chat-style `content` lists (newer llama.cpp) are converted."""
        logprobs = data["choices"][0].get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            content = logprobs["content"]
            logprobs = {"tokens": [c.get("token") for c in content],
                        "token_logprobs": [c.get("logprob") for c in content],
                        "top_logprobs": [{t["token"]: t["logprob"] for t in c.get("top_logprobs") or []}
                                         for c in content]}
        if not isinstance(logprobs, dict) or not logprobs.get("tokens") \
                or not isinstance(logprobs.get("token_logprobs"), list):
            raise UserError(f"{self.base_url}/completions returned no logprobs for model '{self.model}'; "
                            "the openai backend needs a server that supports `logprobs`")
        return logprobs

    @staticmethod
    def _match(options: Sequence[str], top: dict[str, float]) -> list[float | None]:
        """Each option's log-prob among `top`: exact token text, else the longest token that
        starts the option (its first token)."""
        found: list[float | None] = []
        for option in options:
            if option in top:
                found.append(top[option])
                continue
            prefixes = [t for t in top if t and option.startswith(t)]
            found.append(top[max(prefixes, key=len)] if prefixes else None)
        return found

    def _option_by_echo(self, prompt: str, option: str) -> float:
        """The exact log-prob of the option's first token, as a prompt logprob (echo)."""
        data = self._complete(prompt + option, max_tokens=1, logprobs=1, echo=True)
        rows = self._logprob_rows(data)
        offsets = rows.get("text_offset")
        if not isinstance(offsets, list) or len(offsets) < len(rows["tokens"]) or not offsets \
                or offsets[0] != 0:
            raise UserError(f"{self.base_url}: option {option!r} is not among the top {self.top_logprobs} "
                            "logprobs and the server does not echo prompt logprobs; raise "
                            "model.top_logprobs")
        for index, offset in enumerate(offsets):
            if offset == len(prompt):
                value = rows["token_logprobs"][index]
                if value is None:
                    break
                return float(value)
            if offset > len(prompt):
                raise UserError(f"{self.base_url}: the option {option!r} does not start a new token "
                                "after the prompt; start options with a space")
        raise UserError(f"{self.base_url}: no prompt logprob for option {option!r} in the echo response")

    # ---------------------------------------------------------------- Scorer

    def _score_one(self, request: ScoreRequest) -> ScoreResult:
        prompt = "".join(request.segments) + request.query
        if len(set(request.options)) != len(request.options):
            raise UserError(f"label options {list(request.options)} repeat; give distinct options")
        data = self._complete(prompt, max_tokens=1, logprobs=self.top_logprobs)
        rows = self._logprob_rows(data)
        top = rows["top_logprobs"][0] if rows.get("top_logprobs") else None
        if not isinstance(top, dict) or not top:
            raise UserError(f"{self.base_url}/completions returned no top_logprobs; the openai backend "
                            "needs a server that supports `logprobs`")
        values = self._match(request.options, top)
        for index, value in enumerate(values):
            if value is None:
                values[index] = self._option_by_echo(prompt, request.options[index])
        peak = max(values)  # type: ignore[type-var]
        norm = peak + math.log(sum(math.exp(v - peak) for v in values))  # type: ignore[operator]
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        return ScoreResult(tuple(v - norm for v in values), prompt_tokens,  # type: ignore[operator]
                           prompt_tokens - min(cached, prompt_tokens))

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        return list(self.pool.map(self._score_one, requests))

    def generate(self, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                 logprobs: int | None = None, seed: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if logprobs is not None:
            params["logprobs"] = logprobs
        if seed is not None:
            params["seed"] = seed
        data = self._complete(prompt, **params)
        choice, usage = data["choices"][0], data.get("usage") or {}
        result: dict[str, Any] = {"text": choice.get("text", ""),
                                  "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                                  "completion_tokens": int(usage.get("completion_tokens") or 0),
                                  "finish_reason": choice.get("finish_reason")}
        if logprobs is not None:
            rows = self._logprob_rows(data)
            result["logprobs"] = {k: rows.get(k) for k in ("tokens", "token_logprobs", "top_logprobs")}
        return result
