"""The one-token decoding step on a CPU through forgeline's native kernels (forgeline/kernels/decode.c).

Generation spends almost all its time in steps that feed one new token per row through the model. On a CPU that
step is bound by streaming the weights once, and around the matrix products torch spends more time dispatching
forty small operators per layer than computing them. `NativeDecoder.step` computes exactly what
``Transformer.forward(tokens, kv_cache=...)`` computes for one new token per row, in five kernel calls per layer:

    x = embed(tokens)
    for each layer:
        qkv = linear(rms_norm(x) * attention_norm, [wq; wk; wv]) (+ qkv biases)
        a   = attention(rope(q), rope(k) -> cache, v -> cache)         # single query against the cache
        x  += linear(a, wo)
        g   = silu(linear(rms_norm(x) * ffn_norm, w1)) * linear(..., w3)
        x  += linear(g, w2)
    logits = linear(rms_norm(x) * norm, output)

It reads the model's own parameters (no copies) and writes the model's own KVCache, so prefill (many tokens, torch's
batched kernels) and decoding steps mix freely. fp32 results equal the torch path up to summation order; in bf16
the kernels keep fp32 between operations that torch rounds to bf16 one by one (rotary angles included), so the
two paths round differently, the kernels' way being the more accurate.

`NativeDecoder.for_model` returns None (callers keep the model's forward) whenever the kernels cannot run: no C
compiler, not a CPU model, mixed or unsupported dtypes, parameters that are DTensor shards or quantized tensors,
layers replaced by adapters, a pipeline stage without embedding or output, or autocast active.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .transformer import Attention, FeedForward, KVCache, Transformer, require_lm_head, rope_cos_sin


class NativeDecoder:
    def __init__(self, model: Transformer):
        require_lm_head(model, "decode with")
        self.model = model
        self.cfg = model.cfg
        self.dtype = model.tok_embeddings.weight.dtype
        self.layers = list(model.layers.values())

    @classmethod
    def for_model(cls, model: Transformer) -> "NativeDecoder | None":
        if not isinstance(model, Transformer):
            return None
        require_lm_head(model, "decode with")  # a reward model is an error, not a model the kernels step aside for
        if not kernels.available():
            return None
        if model.tok_embeddings is None or model.norm is None or model.output is None:
            return None
        if torch.is_autocast_enabled("cpu") or model.cfg.head_size % 2:
            return None
        dtype = model.tok_embeddings.weight.dtype
        qkv, unbiased = [], [model.output]  # only q/k/v may carry biases in this architecture
        params = [model.tok_embeddings.weight, model.norm.weight]
        for block in model.layers.values():
            att, ffn = block.attention, block.feed_forward
            if type(att) is not Attention or type(ffn) is not FeedForward:
                return None  # a wrapped sublayer (a bottleneck adapter): the kernels would skip its forward
            qkv += [att.wq, att.wk, att.wv]
            unbiased += [att.wo, ffn.w1, ffn.w2, ffn.w3]
            params += [block.attention_norm.weight, block.ffn_norm.weight]
        if any(type(layer) is not nn.Linear for layer in qkv + unbiased):
            return None  # adapters or quantized layers: their own forward must run
        if any(layer.bias is not None for layer in unbiased):
            return None
        params += [t for layer in qkv + unbiased for t in (layer.weight, layer.bias)]
        if not kernels.supports(*params, dtype=dtype):
            return None
        return cls(model)

    def supports_batch(self, batch_size: int, cache: KVCache) -> bool:
        return (batch_size <= kernels.MAX_ROWS and cache.keys[0].dtype == self.dtype
                and cache.keys[0].is_contiguous() and cache.values[0].is_contiguous())

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache: KVCache, *, positions: torch.Tensor | None = None,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab) for one new token per row. tokens (B,); positions (B,) rotary positions (default:
        the cache length for every row); key_mask (B, cache length + 1), nonzero = attend (left padding)."""
        model, pos = self.model, cache.length
        if positions is None:
            positions = torch.full((tokens.shape[0],), pos, dtype=torch.long)
        cos, sin = (t.contiguous() for t in rope_cos_sin(positions, model.inv_freq))
        mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
        x = model.tok_embeddings.weight.index_select(0, tokens)
        for i, block in enumerate(self.layers):
            att, ffn = block.attention, block.feed_forward
            qkv = kernels.linear(x, [att.wq.weight, att.wk.weight, att.wv.weight],
                                 [att.wq.bias, att.wk.bias, att.wv.bias],
                                 norm_weight=block.attention_norm.weight, eps=block.attention_norm.eps)
            a = kernels.attention(qkv, cos, sin, cache.keys[i], cache.values[i], pos,
                                  n_heads=att.wq.weight.shape[0] // att.head_dim, key_mask=mask)
            kernels.linear(a, [att.wo.weight], out=x, accumulate=True)
            g = kernels.swiglu(x, ffn.w1.weight, ffn.w3.weight, norm_weight=block.ffn_norm.weight,
                               eps=block.ffn_norm.eps)
            kernels.linear(g, [ffn.w2.weight], out=x, accumulate=True)
        cache.length += 1
        return kernels.linear(x, [model.output.weight], norm_weight=model.norm.weight, eps=model.norm.eps)
