"""KV states of prompt prefixes kept across scoring calls, and the cache the trie walk grows.

A prompt is a path of segments; the KV states of one segment depend only on the tokens of
its whole path (and so on its positions). `PrefixKVStore` maps a path's key (a hash chain
of its segment texts) to the KV states of the path's last segment, so a later call whose
prompts share that path loads them instead of running the model again. It is an LRU with a
byte budget: a miss only costs recomputation, never a wrong answer.

`BufferCache` is a transformers `DynamicCache` whose layers write into preallocated buffers:
the walk appends and crops thousands of times per call, and the stock layer copies the
whole cache on every append.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def path_key(parent: bytes, segment: str) -> bytes:
    """Key of the path `parent` + `segment` (parent keys have a fixed length: no ambiguity)."""
    return hashlib.blake2b(parent + segment.encode("utf-8"), digest_size=16).digest()


class PrefixKVStore:
    """LRU of per-segment KV states, each a tensor [layers, 2 (key, value), 1, heads, tokens, dim]."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> torch.Tensor | None:
        states = self._entries.get(key)
        if states is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return states

    def put(self, key: bytes, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = states
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


class BufferLayer(DynamicLayer):
    """A DynamicLayer that appends into a buffer it doubles when full, and crops in O(1)."""

    def __init__(self):
        super().__init__()
        self.length = 0
        self._keys = self._values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, dim = key_states.shape
        self._keys = key_states.new_empty((batch, heads, 1024, dim))
        self._values = value_states.new_empty((batch, heads, 1024, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            grow = max(end, 2 * self._keys.shape[-2])
            self._keys = torch.cat([self._keys[..., :self.length, :], self._keys.new_empty(
                (*self._keys.shape[:2], grow - self.length, self._keys.shape[-1]))], dim=-2)
            self._values = torch.cat([self._values[..., :self.length, :], self._values.new_empty(
                (*self._values.shape[:2], grow - self.length, self._values.shape[-1]))], dim=-2)
        self._keys[..., self.length:end, :] = key_states
        self._values[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        self.length -= abs(tokens_to_remove)
        if self.is_initialized:
            self.keys, self.values = self._keys[..., :self.length, :], self._values[..., :self.length, :]

    def states(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._keys[..., start:end, :], self._values[..., start:end, :]


class BufferCache(DynamicCache):
    """A DynamicCache of BufferLayers (full-attention models only) that can load and export
    the states of a span of positions."""

    def __init__(self, config):
        super().__init__(config=config)
        self.layers = [BufferLayer() for _ in self.layers]

    def load(self, states: list[torch.Tensor]) -> None:
        """Append the stored states of consecutive segments, in order (one copy per layer)."""
        if not states:
            return
        joined = states[0] if len(states) == 1 else torch.cat(states, dim=4)
        for index, layer in enumerate(self.layers):
            layer.update(joined[index, 0], joined[index, 1])

    def export(self, start: int, end: int) -> torch.Tensor:
        """States of positions [start, end) as a new tensor (safe to keep after crops)."""
        return torch.stack([torch.stack(layer.states(start, end)) for layer in self.layers])
