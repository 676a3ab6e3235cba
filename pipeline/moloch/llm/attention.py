"""Attention over a shared prompt prefix held once, plus each row's own tokens.

The transformers backend (:mod:`moloch.llm.hf`) batches requests whose prompts begin
alike (a voter's ballots, a judge's probes of one anchor). The keys and values of such a
prefix are computed once (``PrefixStore``) and kept as one tensor; each row's cache holds
only its own tokens (the rest of its prompt, then what it writes). This module computes
attention over the two parts as one softmax:

    scores = [q . K_prefix, q . K_own + mask]       (one row of scores per query)
    out    = softmax(scores) @ [V_prefix; V_own]

split into blocks with a shared maximum, so the prefix is read once per batch instead of
once per row and no row copies it; and it reads only the slots of the cache filled so far.
Every key and value head is read once for its group of query heads (grouped-query
attention without repeating heads). The answer is softmax attention exactly; only the order
of floating-point sums differs from one softmax over the whole row.

``register()`` makes it the model's attention (``ATTENTION``): with no ``shared_prefix``
argument in a forward call it is transformers' own scaled-dot-product attention, so
training, prefix computation and every other caller are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = "moloch_shared_prefix"
SCORES_IN_CACHE = 2**19  # prefix scores computed at once (floats): 2 MB
# Matrix products of 1 to 3 rows take another kernel on CPU, which rounds otherwise: one
# row of a group decoding alone would get other bits than in company. Padded to 4, a row's
# result is the same whatever else shares its batch (tests).
MIN_ROWS = 4


@dataclass
class SharedPrefix:
    """What one forward call of a batch attends to besides its own cache.

    ``groups``: (rows, per-layer (keys, values) of shape [1, kv_heads, length, dim]) for
    each prefix the batch shares, the rows as a tensor of indices or, where they are
    consecutive, a slice; a row in no group has no prefix. ``filled``: how many
    slots of each row's own cache hold tokens after this call's update (the rest are unused
    and never read)."""

    groups: list[tuple[object, list]]
    filled: int


def shared_prefix_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None,
    **kwargs,
):  # fmt: skip
    """transformers' attention interface: ``query`` [batch, heads, q, dim]; ``key`` and
    ``value`` [batch, kv_heads, slots, dim] (the row's own cache); ``attention_mask``
    additive, [batch, 1, q, slots]. Returns [batch, q, heads, dim] and no weights."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    n = shared_prefix.filled
    layer = module.layer_idx
    # [batch, kv_heads, group * q, dim]: the query heads that read one key head, side by side
    grouped = query.reshape(batch, kv_heads, group * q_len, dim)
    own = torch.matmul(grouped, key[:, :, :n].transpose(-1, -2)).mul_(scale)
    own = own.view(batch, kv_heads, group, q_len, n).add_(attention_mask[:, :, None, :, :n])
    own = own.view(batch, kv_heads, group * q_len, n)
    top = own.amax(dim=-1, keepdim=True)  # [batch, kv_heads, group * q, 1]
    pre_total, pre_out = torch.zeros_like(top), torch.zeros_like(grouped)
    for rows, states in shared_prefix.groups:
        keys, values = states[layer]
        length = keys.shape[2]
        # a few rows at a time keep the prefix's scores small enough to stay in cache
        step = max(1, SCORES_IN_CACHE // (kv_heads * group * q_len * length))
        for chunk in _pieces(rows, step):
            # every query of these rows against the prefix at once: [kv_heads, r*g*q, length]
            mine = grouped[chunk].transpose(0, 1).reshape(kv_heads, -1, dim)
            r = mine.shape[1] // (group * q_len)
            scores = _product(mine, keys[0].transpose(-1, -2)).mul_(scale)
            peak = scores.amax(dim=-1, keepdim=True).view(kv_heads, r, -1, 1).transpose(0, 1)
            best = torch.maximum(top[chunk], peak)
            top[chunk] = best
            weights = scores.sub_(best.transpose(0, 1).reshape(kv_heads, -1, 1)).exp_()
            summed = weights.sum(dim=-1, keepdim=True).view(kv_heads, r, -1, 1).transpose(0, 1)
            pre_total[chunk] = summed
            mixed = _product(weights, values[0])
            mixed = mixed.view(kv_heads, r, -1, dim).transpose(0, 1)
            pre_out[chunk] = mixed
    weights = own.sub_(top).exp_()
    total = weights.sum(dim=-1, keepdim=True).add_(pre_total)
    out = torch.matmul(weights, value[:, :, :n]).add_(pre_out)
    out = out.div_(total).view(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def _pieces(rows, step: int):
    """``rows`` (a slice or a tensor of row indices) in pieces of at most ``step`` rows, of
    the same kind: a slice selects without copying."""
    if isinstance(rows, slice):
        return [slice(i, min(i + step, rows.stop)) for i in range(rows.start, rows.stop, step)]
    return rows.split(step)


def _product(a, b):
    """``a @ b`` for [heads, rows, k] by [heads, k, n], with at least ``MIN_ROWS`` rows."""
    import torch

    m = a.shape[1]
    if m >= MIN_ROWS:
        return torch.matmul(a, b)
    padded = torch.cat([a, a.new_zeros(a.shape[0], MIN_ROWS - m, a.shape[2])], 1)
    return torch.matmul(padded, b)[:, :m]


def register() -> str:
    """Make ``shared_prefix_attention`` known to transformers (masks as for sdpa); returns
    its name, for ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION
