"""Attention in which every block of tokens sees exactly its own path, laid out the same way
wherever and whenever it runs.

The trie walk runs a segment alone on top of the cache, or packed with others, or loads it
from the KV store. Here each block attends with its own call over its path's states gathered
in order (prefix, ancestors, itself, causal), so no block pays for another's masked-out
columns, and a block's attention does not depend on the pack around it. (The rest of the
layer still can, by rounding: the CPU's bf16 GEMM picks its kernel by row count, so in bf16
a segment's numbers move by about 0.1 nats with the plan, as much as bf16 differs from fp32;
in fp32 by about 1e-5. tests/test_real_model.py measures both.)

The model runs with `attn_implementation="icm_paths"`; a forward without a plan (`generate`,
one plain sequence) falls through to the stock SDPA attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "icm_paths"


@dataclass(frozen=True)
class Block:
    rows: slice  # this block's tokens among the forward's new tokens
    columns: list[slice]  # its path's positions in the cache, in path order, itself last
    mask: torch.Tensor  # additive [groups * rows, path]: all before the block, causal within


def block(rows: slice, columns: list[range], groups: int, dtype, device="cpu") -> Block:
    """A block whose path is the cache positions `columns` (ranges in order, itself last).

    `groups` query heads share each key/value head (grouped-query attention): their rows are
    stacked against the one head's states instead of repeating the states.
    """
    length = rows.stop - rows.start
    merged: list[slice] = []
    for r in columns:
        if not len(r):
            continue
        if merged and merged[-1].stop == r.start:
            merged[-1] = slice(merged[-1].start, r.stop)
        else:
            merged.append(slice(r.start, r.stop))
    path = sum(r.stop - r.start for r in merged)
    mask = torch.zeros((length, path), dtype=dtype)
    mask[:, path - length:].masked_fill_(
        torch.ones((length, length), dtype=torch.bool).triu(1), float("-inf"))
    return Block(rows, merged, mask.repeat(groups, 1).to(device))


def paths_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                    scaling: float | None = None, icm_blocks: list[Block] | None = None,
                    **kwargs):
    if icm_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    out = query.new_empty((batch, query.shape[2], heads, dim))
    for b in icm_blocks:
        length = b.rows.stop - b.rows.start
        q = query[:, :, b.rows].reshape(batch, kv_heads, heads // kv_heads * length, dim)
        if len(b.columns) == 1:
            k, v = key[:, :, b.columns[0]], value[:, :, b.columns[0]]
        else:
            k = torch.cat([key[:, :, c] for c in b.columns], dim=2)
            v = torch.cat([value[:, :, c] for c in b.columns], dim=2)
        result = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=b.mask, scale=scaling)
        out[:, b.rows] = result.reshape(batch, heads, length, dim).transpose(1, 2)
    return out, None


AttentionInterface.register(NAME, paths_attention)
