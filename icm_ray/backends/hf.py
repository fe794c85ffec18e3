"""Hugging Face transformers backend: CPU or GPU, with shared-prefix KV-cache reuse.

A batch of requests is arranged into a trie of segments. The trie is walked depth first
with one KV cache: each segment is run once on top of its parent's cache, every query
ending at a node is scored on top of it, then the cache is cropped back. Each segment and
each query is always its own forward pass, so a request's numbers do not depend on what
else is in the batch (determinism across batching, restarts and Serve replicas).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from icm_ray.backends.base import Scorer, ScoreRequest, ScoreResult
from icm_ray.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from packages, never a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cpu_has_fast_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class _Node:
    tokens: list[int]
    children: dict[str, "_Node"] = field(default_factory=dict)
    queries: list[int] = field(default_factory=list)  # request indices ending here


class TransformersScorer(Scorer):
    def __init__(self, model: str = "smollm2-135m", dtype: str = "auto",
                 threads: int | None = None, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from transformers.utils import logging as hf_logging

        from icm_ray import models

        hf_logging.disable_progress_bar()

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.source = models.resolve(model)
        folder = models.converted_dir(self.source)
        if dtype == "auto":  # bf16 is slower than fp32 on CPUs without native bf16
            dtype = "bfloat16" if device != "cpu" or cpu_has_fast_bf16() else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16, float16)")
        self.dtype = dtype
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        probe = self.tokenizer("a").input_ids
        bos = self.tokenizer.bos_token_id
        self.prefix_tokens = [bos] if bos is not None and probe and probe[0] == bos else []
        self.max_tokens = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self._token_memo: dict[str, list[int]] = {}
        self.tokens_run = 0

    def identity(self) -> dict[str, Any]:
        return {"backend": "transformers", "model": self.source.name,
                "model_sha256": self.source.sha256, "dtype": self.dtype, "device": self.device}

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

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        root = _Node(self.prefix_tokens)
        for index, request in enumerate(requests):
            node = root
            for segment in request.segments:
                child = node.children.get(segment)
                if child is None:
                    child = node.children[segment] = _Node(self.tokenize(segment))
                node = child
            node.queries.append(index)
        results: list[ScoreResult | None] = [None] * len(requests)
        from transformers import DynamicCache

        with self.torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            self._walk(root, requests, results, cache, depth_tokens=0, pending=0)
        return results  # type: ignore[return-value]

    def _forward(self, tokens: list[int], cache):
        ids = self.torch.tensor([tokens], dtype=self.torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        self.tokens_run += len(tokens)
        return out.logits[0, -1]

    def _walk(self, node: _Node, requests, results, cache, depth_tokens: int, pending: int):
        """`pending`: tokens run for this node's path but not yet charged to any request."""
        if node.tokens:  # the caller crops these off again after the subtree
            self._forward(node.tokens, cache)
            depth_tokens += len(node.tokens)
            pending += len(node.tokens)
        for index in node.queries:
            request = requests[index]
            query = self.tokenize(request.query)
            if not query:
                raise UserError("a scoring request has an empty query")
            total = depth_tokens + len(query)
            if total > self.max_tokens:
                raise UserError(f"prompt of {total} tokens exceeds the model's context of "
                                f"{self.max_tokens}; use fewer examples per persona")
            logits = self._forward(query, cache)
            cache.crop(-len(query))
            chosen = logits[self.option_ids(request.options)].float()
            logprobs = self.torch.log_softmax(chosen, dim=-1).tolist()
            results[index] = ScoreResult(tuple(logprobs), total, pending + len(query))
            pending = 0
        for child in node.children.values():
            self._walk(child, requests, results, cache, depth_tokens, pending)
            pending = 0
            if child.tokens:
                cache.crop(-len(child.tokens))
