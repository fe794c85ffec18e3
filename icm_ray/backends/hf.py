"""Hugging Face transformers backend: CPU or GPU, with shared-prefix KV-cache reuse.

A batch of requests is arranged into a trie of segments and walked depth first with one KV
cache: a big segment is run once on top of its parent's cache and cropped off again after
its subtree; small subtrees (up to `pack_tokens`) are packed into a single forward pass
(each segment attending to its own path only, see pathattention.py). Every prompt token is
run once per batch however many requests share it. Across calls, the KV states of every
segment run are kept in an LRU store keyed by the segment's whole path (kvstore.py), so a
later call loads a shared prefix instead of running it again. Packing, batching and reuse
change only rounding (see pathattention.py): about 1e-5 in fp32, about 0.1 nats in bf16.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from icm_ray.backends import pathattention
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
    key: bytes  # identifies the whole path (see kvstore.path_key)
    children: dict[str, _Node] = field(default_factory=dict)
    queries: list[int] = field(default_factory=list)  # request indices ending here
    size: int = 0  # tokens in this node and everything below it
    stored: Any = None  # this segment's KV states from the store, or None: to be run


class TransformersScorer(Scorer):
    def __init__(self, model: str = "smollm2-135m", dtype: str = "auto",
                 threads: int | None = None, device: str = "cpu", pack_tokens: int = 768,
                 kv_cache_mb: int = 2048):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from icm_ray import models

        hf_logging.disable_progress_bar()

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.source = models.resolve(model)
        try:
            folder = models.converted_dir(self.source)
        except UserError:
            raise
        except Exception as err:  # transformers' own errors are long; name the model and the cause
            raise UserError(f"{model}: cannot load the model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
        if dtype == "auto":  # bf16 is slower than fp32 on CPUs without native bf16
            dtype = "bfloat16" if device != "cpu" or cpu_has_fast_bf16() else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16, float16)")
        self.dtype = dtype
        self.device = device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        except Exception as err:
            raise UserError(f"{model}: cannot load the model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
        self.model.to(device).eval()
        probe = self.tokenizer("a").input_ids
        bos = self.tokenizer.bos_token_id
        self.prefix_tokens = [bos] if bos is not None and probe and probe[0] == bos else []
        self.max_tokens = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self._token_memo: dict[str, list[int]] = {}
        self.tokens_run = 0
        self.contexts_run = 0  # sum over run tokens of the positions each attends to
        self.pack_tokens = pack_tokens  # subtrees up to this size share one forward pass
        # Sliding-window layers (Gemma 3) drop old states that a crop-and-branch walk needs,
        # and a custom tree mask would bypass their window: keep every state, let the model
        # build its own masks, and do not pack.
        layer_types = getattr(self.model.config, "layer_types", None) or []
        self.sliding = any("sliding" in str(t) for t in layer_types)
        if self.sliding:
            self.pack_tokens = 0
        else:  # every block attends to its own path only: see pathattention
            self.model.set_attn_implementation(pathattention.NAME)
            config = self.model.config
            heads = config.num_attention_heads
            groups = heads // (getattr(config, "num_key_value_heads", None) or heads)
            self._block_shape = (groups, self.model.dtype, device)
        # KV states of prompt prefixes kept across calls (see kvstore): off for sliding-window
        # models, whose walk lets the model build its own masks over every state.
        from icm_ray.backends.kvstore import PrefixKVStore

        self.kv_store = PrefixKVStore(kv_cache_mb << 20) if kv_cache_mb > 0 and not self.sliding else None
        # Scores read only the options' logits, in fp32 from the final hidden state: bf16 logits
        # step by 1/16 nats and more at the magnitudes these models reach, and the full
        # vocabulary projection (49k rows for SmolLM2) is wasted on two options.
        head = self.model.get_output_embeddings()
        self._head_weight, self._head_bias = head.weight, getattr(head, "bias", None)
        self._softcap = getattr(self.model.config, "final_logit_softcapping", None)

    def identity(self) -> dict[str, Any]:
        return {"backend": "transformers", "model": self.source.name,
                "model_sha256": self.source.sha256, "dtype": self.dtype, "device": self.device}

    def generate(self, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
                 logprobs: int | None = None, seed: int | None = None) -> dict[str, Any]:
        torch = self.torch
        ids = self.prefix_tokens + self.tokenize(prompt)
        if len(ids) + max_tokens > self.max_tokens:
            raise UserError(f"prompt of {len(ids)} tokens plus {max_tokens} new ones exceeds the "
                            f"model's context of {self.max_tokens}")
        if seed is not None:
            torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
            "do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([ids], device=self.device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=self.device),
                max_new_tokens=max_tokens, output_logits=True, return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                top_k=None, top_p=None, **sampling)
        new = out.sequences[0, len(ids):].tolist()
        self.tokens_run += len(ids) + len(new)
        eos = self.tokenizer.eos_token_id
        finish = "stop" if new and new[-1] == eos else "length"
        shown = [t for t in new if t != eos]
        result: dict[str, Any] = {"text": self.tokenizer.decode(shown, skip_special_tokens=True),
                                  "prompt_tokens": len(ids), "completion_tokens": len(new),
                                  "finish_reason": finish}
        if logprobs is not None:
            tokens, token_logprobs, top = [], [], []
            for step, token in enumerate(new):  # the end token too, as OpenAI servers do
                row = torch.log_softmax(out.logits[step][0].float(), dim=-1)  # raw, as vLLM reports
                tokens.append(self.tokenizer.decode([token]))
                token_logprobs.append(float(row[token]))
                values, indices = row.topk(max(1, logprobs))
                top.append({self.tokenizer.decode([int(i)]): float(v) for v, i in zip(values, indices)})
            result["logprobs"] = {"tokens": tokens, "token_logprobs": token_logprobs,
                                  "top_logprobs": top}
        return result

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
        from transformers import DynamicCache

        from icm_ray.backends.kvstore import BufferCache, path_key

        store = self.kv_store
        root = _Node(self.prefix_tokens, b"root")
        root.stored = store.get(root.key) if store is not None and root.tokens else None
        for index, request in enumerate(requests):
            node = root
            for segment in request.segments:
                child = node.children.get(segment)
                if child is None:
                    child = node.children[segment] = _Node(self.tokenize(segment),
                                                           path_key(node.key, segment))
                    if store is not None:  # pinned for this call, whatever the LRU evicts meanwhile
                        child.stored = store.get(child.key)
                node = child
            node.queries.append(index)
        self._requests = requests
        self._query_ids = [self.tokenize(r.query) for r in requests]
        if any(not q for q in self._query_ids):
            raise UserError("a scoring request has an empty query")
        _measure(root, self._query_ids)
        self._results: list[ScoreResult | None] = [None] * len(requests)
        self._pending = 0
        with self.torch.inference_mode():
            cache = DynamicCache() if self.sliding else BufferCache(self.model.config)
            last, depth = self._extend(root, cache, 0)
            self._walk(last, cache, depth)
        return self._results  # type: ignore[return-value]

    def _forward(self, tokens: list[int], cache, positions: list[int], blocks, keep):
        """Run `tokens` at `positions` on top of the cache and return the final hidden states
        of the rows `keep`; `blocks` (pathattention) say which cached states each block of
        them attends to (None for sliding-window models: one plain continuation, masks by
        the model)."""
        self.contexts_run += sum(positions) + len(tokens)
        torch = self.torch
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        extra = {} if blocks is None else {"icm_blocks": blocks, "position_ids": torch.tensor(
            [positions], device=self.device)}
        out = self.model.base_model(input_ids=ids, cache=cache, use_cache=True, **extra)
        self.tokens_run += len(tokens)
        self._pending += len(tokens)
        return out.last_hidden_state[0, keep]

    def _option_logprobs(self, hidden, options: Sequence[str]) -> tuple[float, ...]:
        """log-softmax over the options' first-token logits, computed in fp32 from one final
        hidden state (an elementwise product and sum: the same bits whatever else is scored)."""
        torch = self.torch
        ids = self.option_ids(options)
        logits = (self._head_weight[ids].float() * hidden.float()).sum(-1)
        if self._head_bias is not None:
            logits = logits + self._head_bias[ids].float()
        if self._softcap:  # Gemma-style final logit soft-capping
            logits = self._softcap * torch.tanh(logits / self._softcap)
        return tuple(torch.log_softmax(logits, dim=-1).tolist())

    def _alone(self, tokens: list[int], cache, keep=-1):
        """Run `tokens` as a plain continuation of everything in the cache."""
        depth, count = cache.get_seq_length(), len(tokens)
        blocks = None if self.sliding else [
            pathattention.block(slice(0, count), [range(depth + count)], *self._block_shape)]
        return self._forward(tokens, cache, list(range(depth, depth + count)), blocks, keep)

    def _extend(self, node: _Node, cache, depth: int) -> tuple[_Node, int]:
        """Put on the cache the states of `node` and of the chain of only children below it
        that are too big to pack (prompts share one demonstration after another until they
        branch): stored segments are loaded, each run of the others goes in one pass.
        Returns the chain's last node and the cache's new depth."""
        chain = [node]
        while not chain[-1].queries and len(chain[-1].children) == 1:
            child = next(iter(chain[-1].children.values()))
            if child.size <= self.pack_tokens:
                break
            chain.append(child)
        loads: list[Any] = []
        fresh: list[_Node] = []

        def flush() -> None:
            if loads:
                cache.load(loads)
                loads.clear()
            if fresh:
                start = cache.get_seq_length()
                self._alone([t for n in fresh for t in n.tokens], cache)
                for n in fresh:
                    self._keep(n, cache, start)
                    start += len(n.tokens)
                fresh.clear()

        for n in chain:
            if depth + len(n.tokens) > self.max_tokens:
                raise UserError(f"prompt of over {self.max_tokens} tokens exceeds the model's "
                                "context; use fewer or shorter examples per persona")
            if n.stored is not None and fresh or n.stored is None and loads:
                flush()
            if n.stored is not None:
                loads.append(n.stored)
            elif n.tokens:
                fresh.append(n)
            depth += len(n.tokens)
        flush()
        return chain[-1], depth

    def _keep(self, node: _Node, cache, start: int) -> None:
        if self.kv_store is not None:
            self.kv_store.put(node.key, cache.export(start, start + len(node.tokens)))

    def _walk(self, node: _Node, cache, depth: int) -> None:
        """Score everything below `node`, whose path (depth tokens) is in the cache.

        Small subtrees (and the queries at this node) are packed into one forward pass, each
        segment attending to its own path; a subtree too big to pack puts its segment (and
        the chain of only children below it) in the cache and recurses.
        """
        group: list[Any] = []
        size = 0
        items: list[Any] = [("query", i) for i in node.queries]
        items += [("node", c) for c in node.children.values()]
        for kind, item in items:
            item_size = len(self._query_ids[item]) if kind == "query" else item.size
            if kind == "query" or item_size <= self.pack_tokens:
                if group and (size + item_size > self.pack_tokens or self.sliding):
                    self._packed(group, cache, depth)
                    group, size = [], 0
                group.append((kind, item))
                size += item_size
                continue
            last, below = self._extend(item, cache, depth)
            self._walk(last, cache, below)
            if below > depth:  # (a crop of 0 would empty a DynamicCache)
                cache.crop(depth - below)
        if group:
            self._packed(group, cache, depth)

    def _packed(self, items: list[Any], cache, depth: int) -> None:
        """One forward pass for several subtrees on top of a shared cached prefix.

        Segments found in the store are loaded into the cache after the prefix (columns
        depth..depth+loaded); the rest run in this pass, each token seeing the prefix, its
        ancestors (loaded or run) and itself.
        """
        tokens: list[int] = []
        positions: list[int] = []
        blocks: list[list[Any]] = []  # [start, length, ancestor blocks, loaded]
        loads: list[Any] = []
        loaded = [0]  # tokens loaded so far
        readouts: list[tuple[int, int, int]] = []  # request, last token index, block id
        fresh_nodes: list[tuple[_Node, int]] = []  # segments run here (and where): kept in the store

        def place(ids: list[int], position: int, ancestors: list[int], states=None,
                  into: int | None = None) -> int:
            """Lay `ids` as a new block, or at the end of block `into` (an only child of the
            same kind continues its parent's block: one attention call, one load)."""
            if into is None:
                blocks.append([loaded[0] if states is not None else len(tokens), 0, ancestors,
                               states is not None])
                into = len(blocks) - 1
            blocks[into][1] += len(ids)
            if states is not None:
                loads.append(states)
                loaded[0] += len(ids)
            else:
                tokens.extend(ids)
                positions.extend(range(position, position + len(ids)))
            return into

        def lay(kind: str, item: Any, position: int, ancestors: list[int],
                into: int | None = None) -> None:
            if kind == "query":
                block = place(self._query_ids[item], position, ancestors)
                readouts.append((item, len(tokens) - 1, block))
                return
            if item.stored is None:
                fresh_nodes.append((item, len(tokens)))
            block = place(item.tokens, position, ancestors, item.stored, into)
            below = position + len(item.tokens)
            for index in item.queries:
                lay("query", index, below, ancestors + [block])
            only = len(item.children) == 1 and not item.queries
            for child in item.children.values():
                if only and (child.stored is None) == (item.stored is None):
                    lay("node", child, below, ancestors, block)
                else:
                    lay("node", child, below, ancestors + [block])

        for kind, item in items:
            lay(kind, item, depth, [])
        if max(positions) + 1 > self.max_tokens:
            raise UserError(f"prompt of over {self.max_tokens} tokens exceeds the model's "
                            "context; use fewer examples per persona")
        if loads:  # (never for sliding-window models: they keep no store)
            cache.load(loads)
        span, count = loaded[0], len(tokens)
        torch = self.torch
        keep = torch.tensor([r[1] for r in readouts])
        if self.sliding:  # one query alone (see _walk)
            hidden = self._forward(tokens, cache, positions, None, keep)
        else:
            def columns(b: int) -> range:
                start, length, _, is_loaded = blocks[b]
                start += depth if is_loaded else depth + span
                return range(start, start + length)

            plan = [pathattention.block(slice(start, start + length), [range(depth)] + [
                columns(a) for a in ancestors] + [columns(b)], *self._block_shape)
                for b, (start, length, ancestors, is_loaded) in enumerate(blocks) if not is_loaded]
            hidden = self._forward(tokens, cache, positions, plan, keep)
        for node, offset in fresh_nodes:
            self._keep(node, cache, depth + span + offset)
        cache.crop(-(span + count))
        charged: set[int] = set()
        pending_outside = self._pending - count  # tokens run before this pack, not yet charged
        for row, (index, _, block) in enumerate(readouts):
            mine = [b for b in blocks[block][2] + [block] if b not in charged and not blocks[b][3]]
            charged.update(mine)
            run = sum(blocks[b][1] for b in mine) + pending_outside
            pending_outside = 0
            self._results[index] = ScoreResult(
                self._option_logprobs(hidden[row], self._requests[index].options),
                positions[readouts[row][1]] + 1, run)
        self._pending = 0


def _measure(node: _Node, query_ids: list[list[int]]) -> int:
    """Set node.size: tokens in the node, its queries and everything below it."""
    node.size = len(node.tokens) + sum(len(query_ids[i]) for i in node.queries) + sum(
        _measure(child, query_ids) for child in node.children.values())
    return node.size
