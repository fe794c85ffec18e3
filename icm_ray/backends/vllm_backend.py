"""vLLM backend: an in-process `vllm.LLM` engine with automatic prefix caching.

Named vllm_backend so it never shadows the `vllm` package. Prompts are tokenised as the
contract says (segments one by one, then the query) and handed to vLLM as token ids, so its
prefix cache sees exactly the sharing the divide-and-conquer arrangement builds. Each
request generates one token at temperature 0 and asks for the log-probs of the options'
first tokens at that position (`logprob_token_ids`; on vLLM releases without it: the top 20,
and a prompt-logprob pass for options outside them), renormalised over the options.

Accounting: prompt_tokens is the token-id count; tokens_run = prompt_tokens minus vLLM's
`num_cached_tokens` (prefix-cache hits). vLLM schedules a batch's prompts together, so
prompts that share a prefix inside one batch may each compute it; later batches hit it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from icm_ray.backends.base import Scorer, ScoreRequest, ScoreResult
from icm_ray.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from packages, never a hub
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
TOP_K_FALLBACK = 20


class VLLMScorer(Scorer):
    def __init__(self, model: str = "smollm2-135m", dtype: str = "auto",
                 engine_args: dict[str, Any] | None = None):
        try:
            import vllm
        except ImportError as err:
            raise UserError(f"backend vllm needs the vllm package ({err}); pip install 'icm-ray[gpu]' "
                            "on a GPU machine, or `make venv-vllm` for the CPU build") from None
        import torch

        from icm_ray import models
        from icm_ray.backends.hf import cpu_has_fast_bf16

        self.vllm = vllm
        self.source = models.resolve(model)
        folder = models.converted_dir(self.source)
        gpu = torch.cuda.is_available()
        if dtype == "auto":  # as the transformers backend: bf16 only where it is fast
            dtype = "auto" if gpu else ("bfloat16" if cpu_has_fast_bf16() else "float32")
        self.dtype = dtype
        args: dict[str, Any] = {"model": str(folder), "dtype": dtype, "enable_prefix_caching": True,
                                "seed": 0}
        if not gpu:  # vLLM-CPU reserves 92% of RAM unless told a KV-cache size; no CUDA graphs
            args.update(enforce_eager=True, kv_cache_memory_bytes=1 << 30)
        args.update(engine_args or {})
        try:
            self.llm = vllm.LLM(**args)
        except Exception as err:
            raise UserError(f"{model}: vLLM cannot load the model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
        self.tokenizer = self.llm.get_tokenizer()
        probe = self.tokenizer("a").input_ids
        bos = self.tokenizer.bos_token_id
        self.prefix_tokens = [bos] if bos is not None and probe and probe[0] == bos else []
        self._token_memo: dict[str, list[int]] = {}
        fields = getattr(vllm.SamplingParams, "__struct_fields__", ()) or getattr(
            vllm.SamplingParams, "__dataclass_fields__", {})
        self.by_token_ids = "logprob_token_ids" in fields  # exact option log-probs (newer vLLM)
        self.tokens_run = 0

    def identity(self) -> dict[str, Any]:
        return {"backend": "vllm", "model": self.source.name, "model_sha256": self.source.sha256,
                "dtype": self.dtype, "vllm": self.vllm.__version__}

    def tokenize(self, text: str) -> list[int]:
        ids = self._token_memo.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(self._token_memo) > 100_000:
                self._token_memo.clear()
            self._token_memo[text] = ids
        return ids

    def option_ids(self, options: Sequence[str]) -> list[int]:
        ids = []
        for option in options:
            tokens = self.tokenize(option)
            if not tokens:
                raise UserError(f"label option {option!r} is empty after tokenisation")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise UserError(f"label options {list(options)} share their first token; "
                            "choose verbalisers that start differently")
        return ids

    def _prompt_ids(self, request: ScoreRequest) -> list[int]:
        ids = list(self.prefix_tokens)
        for segment in request.segments:
            ids += self.tokenize(segment)
        query = self.tokenize(request.query)
        if not query:
            raise UserError("a scoring request has an empty query")
        return ids + query

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        from vllm import SamplingParams, TokensPrompt

        if not requests:
            return []
        prompts = [self._prompt_ids(r) for r in requests]
        options = [self.option_ids(r.options) for r in requests]
        if self.by_token_ids:
            params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=o) for o in options]
        else:
            params = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_K_FALLBACK)] * len(prompts)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                    use_tqdm=False)
        values: list[list[float | None]] = []
        for out, ids in zip(outputs, options):
            row = out.outputs[0].logprobs[0]
            values.append([row[i].logprob if i in row else None for i in ids])
        self._fill_missing(prompts, options, values)
        results = []
        for out, prompt, row in zip(outputs, prompts, values):
            peak = max(row)  # type: ignore[type-var]
            norm = peak + math.log(sum(math.exp(v - peak) for v in row))  # type: ignore[operator]
            cached = min(out.num_cached_tokens or 0, len(prompt))
            self.tokens_run += len(prompt) - cached
            results.append(ScoreResult(tuple(v - norm for v in row), len(prompt),  # type: ignore[operator]
                                       len(prompt) - cached))
        return results

    def _fill_missing(self, prompts, options, values) -> None:
        """Options outside the top-k: their exact log-prob as the prompt logprob of the option
        token appended to the prompt (the prefix is cached, so this costs one token each)."""
        from vllm import SamplingParams, TokensPrompt

        missing = [(r, k) for r, row in enumerate(values) for k, v in enumerate(row) if v is None]
        if not missing:
            return
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[r] + [options[r][k]])
                                  for r, k in missing], params, use_tqdm=False)
        for (r, k), out in zip(missing, outs):
            values[r][k] = out.prompt_logprobs[-1][options[r][k]].logprob

    def generate(self, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                 logprobs: int | None = None, seed: int | None = None) -> dict[str, Any]:
        from vllm import SamplingParams, TokensPrompt

        ids = self.prefix_tokens + self.tokenize(prompt)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                logprobs=logprobs)
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        choice = out.outputs[0]
        cached = min(out.num_cached_tokens or 0, len(ids))
        self.tokens_run += len(ids) - cached + len(choice.token_ids)
        result: dict[str, Any] = {"text": choice.text, "prompt_tokens": len(ids),
                                  "completion_tokens": len(choice.token_ids),
                                  "finish_reason": "stop" if choice.finish_reason == "stop" else "length"}
        if logprobs is not None:
            rows = choice.logprobs or []

            def top(row) -> dict[str, float]:  # vLLM adds the sampled token to the top-k: keep k
                best = sorted(row.items(), key=lambda kv: -kv[1].logprob)[:max(1, logprobs)]
                return {self.tokenizer.decode([t]): lp.logprob for t, lp in best}

            result["logprobs"] = {
                "tokens": [self.tokenizer.decode([t]) for t in choice.token_ids],
                "token_logprobs": [row[t].logprob for t, row in zip(choice.token_ids, rows)],
                "top_logprobs": [top(row) for row in rows]}
        return result
