"""One decoding step of a Llama-architecture model, written out (the CPU decode loop).

The transformers backend (:mod:`moloch.llm.hf`) decodes one token per row per step. On
2 cores at batch 16, a step of the embedded model (SmolLM2-135M, 30 layers) spent about
40 ms in its matrix products and another 35 ms in the modules around them: seven linear
layers per decoder layer, each a call through ``nn.Module``, the cache's bookkeeping and
the model's argument handling. ``decode_step`` computes the same step with the model's own
weights and operations, in the same order, on the same operands, so the logits are the
model's bit for bit (tested against the model's forward). The norms, the rotary embedding
and the linear layers are written as their operations (no module calls); the queries and
keys of a layer are rotated in one go, with ``rotate_half(x) * sin`` computed as ``x``
with its halves swapped times ``sin`` with its first half negated (a sign flip commutes
with a product exactly: the same bits from 4 operations instead of 14). And two changes:

- the query, key and value projections are one matrix product, and so are the MLP's gate
  and up projections (``fuse_projections``): a product's output columns do not depend on
  which other columns it computes (same bits, tested), and one larger product reads its
  weights faster than three small ones;
- the new key and value go straight into the slot of the static cache that the caller
  names (``slot``), without the cache's per-layer position arithmetic.

Used only where ``can_decode(model)``: a plain ``LlamaForCausalLM`` (not wrapped by peft)
whose linear layers run on prepacked weights (``hf._prepack_linears``), without biases,
with the backend's attention (:mod:`moloch.llm.attention`). Anything else decodes
through the model's forward.
"""

from __future__ import annotations

# parent module -> its linear layers that read the same input, in output order
FUSED = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def can_decode(model) -> bool:
    """Whether ``decode_step`` computes ``model``'s decoding step (see the module docstring)."""
    from .attention import ATTENTION

    if type(model).__name__ != "LlamaForCausalLM":
        return False
    if getattr(model.config, "_attn_implementation", None) != ATTENTION:
        return False
    for layer in model.model.layers:
        for parent, names in FUSED.items():
            module = getattr(layer, parent)
            if not hasattr(module, "fused"):
                return False
            if any(getattr(module, n).bias is not None for n in names):
                return False
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            if linear.bias is not None or not hasattr(linear, "packed"):
                return False
    return hasattr(model.lm_head, "packed") and model.lm_head.bias is None


def fuse_projections(model, dense: dict | None = None) -> None:
    """Give each decoder layer's attention and MLP of a prepacked Llama model one packed
    weight for their projections that read the same input (``fused``); ``dense`` maps a
    linear layer to the weight it computes with now (a merged LoRA adapter, from
    ``hf._merge_adapter``), the others use their own. Without ``dense`` the base weights
    are packed once and kept (``fused_base``). Does nothing for other models."""
    import torch

    if type(model).__name__ != "LlamaForCausalLM":
        return
    dense = dense or {}
    for layer in model.model.layers:
        for parent, names in FUSED.items():
            module = getattr(layer, parent)
            parts = [getattr(module, n) for n in names]
            if not all(hasattr(p, "packed") for p in parts):
                return  # not prepacked: nothing reads ``fused``
            if not dense and hasattr(module, "fused_base"):
                module.fused = module.fused_base
                continue
            weight = torch.cat([dense.get(p, p.weight).detach() for p in parts])
            module.fused = torch.ops.mkldnn._reorder_linear_weight(weight)
            if not dense:
                module.fused_base = module.fused


def decode_step(model, ids, positions, cache, slot: int, mask, shared_prefix):
    """Logits [batch, vocab] of one new token per row.

    Reads ``ids`` and ``positions`` [batch, 1], the additive ``mask`` [batch, 1, 1, slots]
    over each row's own cache (a transformers ``StaticCache`` filled by the prompt's
    forward) and ``shared_prefix`` (:class:`moloch.llm.attention.SharedPrefix`, whose
    ``filled`` is ``slot + 1``); writes the new keys and values into ``slot`` of every
    layer's cache."""
    from .attention import shared_prefix_attention

    linear = packed_product
    inner, config = model.model, model.config
    batch = ids.shape[0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden = inner.embed_tokens(ids)
    cos, sin = (t[:, 0, None] for t in inner.rotary_emb(hidden, positions))  # [batch, 1, head]
    turned = _turned(sin)
    for layer, layer_cache in zip(inner.layers, cache.layers, strict=True):
        attention, mlp = layer.self_attn, layer.mlp
        qkv = linear(_norm(layer.input_layernorm, hidden), attention.fused)
        qkv = qkv.view(batch, heads + 2 * kv_heads, head)
        qk = _rotate(qkv[:, : heads + kv_heads], cos, turned)
        q, k = qk[:, :heads, None], qk[:, heads:]  # [batch, heads, 1, head], [batch, kv, head]
        layer_cache.keys[:, :, slot] = k
        layer_cache.values[:, :, slot] = qkv[:, heads + kv_heads :]
        out, _ = shared_prefix_attention(
            attention, q, layer_cache.keys, layer_cache.values, mask,
            scaling=attention.scaling, shared_prefix=shared_prefix,
        )  # fmt: skip
        hidden = hidden + linear(out.view(batch, 1, -1), attention.o_proj.packed)
        x = _norm(layer.post_attention_layernorm, hidden)
        gate, up = linear(x, mlp.fused).chunk(2, dim=-1)
        hidden = hidden + linear(mlp.act_fn(gate) * up, mlp.down_proj.packed)
    return linear(_norm(inner.norm, hidden), model.lm_head.packed)[:, -1]


# Fewest rows a prepacked product computes: oneDNN takes another kernel for a single row,
# which rounds otherwise (a row decoding alone would get other bits than in company), and
# on 2 cores 1 to 3 rows take longer than 4 (all linear layers of a step: 24.5, 27.0,
# 22.3 and 21.6 ms at 1, 2, 3 and 4 rows, AMD EPYC).
MIN_LINEAR_ROWS = 4


def packed_product(x, packed, bias=None):
    """``x @ weight.T + bias`` for ``x`` [..., in] and a weight prepacked for oneDNN
    (``hf._prepack_linears``), computed on at least ``MIN_LINEAR_ROWS`` rows (zero rows
    added, then dropped): each row's result is the same whatever else is in the batch."""
    import torch

    linear = torch.ops.mkldnn._linear_pointwise
    rows = x.numel() // x.shape[-1]
    if rows >= MIN_LINEAR_ROWS:
        return linear(x, packed, bias, "none", [], "")
    flat = x.reshape(rows, -1)
    padded = torch.cat([flat, flat.new_zeros(MIN_LINEAR_ROWS - rows, flat.shape[1])])
    return linear(padded, packed, bias, "none", [], "")[:rows].view(*x.shape[:-1], -1)


# The model's modules, written as their own operations on the same operands in the same
# order (so the same bits), without a module call.


def _norm(module, x):
    """``LlamaRMSNorm``: weight * (x * rsqrt(mean(x^2) + eps)), in float32 and back to
    ``x``'s dtype as the module computes it (no copies when ``x`` is float32)."""
    dtype, x = x.dtype, x.float()
    scale = x.pow(2).mean(-1, keepdim=True).add_(module.variance_epsilon).rsqrt_()
    return module.weight * (x * scale).to(dtype)


def _turned(sin):
    """``sin`` with its first half negated: ``rotate_half(x) * sin`` is then ``x`` with its
    halves swapped, times this (a sign flip commutes with a product, exactly)."""
    import torch

    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x, cos, turned):
    """``apply_rotary_pos_emb`` on [batch, heads, head] (queries and keys in one):
    x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return (x * cos).add_(swapped.mul_(turned))
