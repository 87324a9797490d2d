"""A Llama-family decoder-only transformer, top to bottom.

    tokens -> embedding -> L x [x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> head

The head is the output projection to the vocabulary (`cfg.head="lm"`, a language model) or a reward model's score
head (`cfg.head="score"`): one scalar per position, which model/heads.py pools at each sequence's last token.

Attention is grouped-query (n_kv_heads < n_heads; MHA and MQA are the two ends) with rotary position embeddings and,
optionally, Qwen2-style biases on the q/k/v projections. Weight names and the rotary layout (two halves, not
interleaved pairs) match Hugging Face's Llama so checkpoints convert by renaming alone.

Beside it: rope.py (rotary embeddings), masks.py (causal, packed, padded and branched-row masks) and lean_ops.py
(autograd functions for training that keep fewer bytes for the backward pass; the blocks take them where they apply
and the plain modules elsewhere).

This file holds no parallelism. Distributed wrappers (DDP, FSDP2, tensor and pipeline parallel) act on the modules
from outside; the only concession is that the layers live in a ModuleDict and the embedding, final norm and output
may be None, so a pipeline stage can drop the parts it does not own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import lean_ops as lean
from .config import ModelConfig
from .masks import NO_MASK, BranchedRows, BranchMasks, build_attention_mask, query_rows
from .rope import apply_rope, rope_cos_sin, rope_inverse_frequencies, rotate  # noqa: F401  (also this module's API)

# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)).to(x.dtype), the normalisation in fp32: the forward pass is F.rms_norm's arithmetic
    (x.pow(2).mean + eps, rsqrt, multiply); the backward pass is written out (two reductions, three elementwise
    passes) instead of autograd's walk through pow, mean, add, rsqrt and two multiplications."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = xf * rstd
        out = weight * y.to(x.dtype)
        if out_dtype is not None:
            out = out.to(out_dtype)
            # The gradient comes back in out_dtype as well: y kept at that precision halves the norm's saved bytes,
            # with a rounding of the gradient's own size.
            y = y.to(out_dtype)
        ctx.save_for_backward(y, rstd, weight)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        y, rstd, weight = ctx.saved_tensors
        y = y.float()
        x_dtype = ctx.x_dtype
        dim = y.shape[-1]
        grad_w = None
        if x_dtype == torch.float32 and grad.dtype == torch.float32 and weight.dtype == torch.float32:
            gy_y = grad * y  # d loss / d weight per row; (gy * y) summed over the row is this times weight
            if ctx.needs_input_grad[1]:
                grad_w = gy_y.reshape(-1, dim).sum(0)
            mean_gy_y = torch.matmul(gy_y, weight).unsqueeze(-1).div_(dim)
            grad_x = (grad * weight).addcmul_(y, mean_gy_y, value=-1).mul_(rstd)
            return grad_x if ctx.needs_input_grad[0] else None, grad_w, None, None
        yc = y.to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad * yc).reshape(-1, dim).sum(0).to(weight.dtype)
        gy = (grad * weight).to(x_dtype).float()
        mean_gy_y = (gy * y).mean(-1, keepdim=True)
        grad_x = gy.addcmul_(y, mean_gy_y, value=-1).mul_(rstd)
        return grad_x.to(x_dtype), grad_w, None, None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the activation dtype (bf16 variance is too coarse).

    feeds_autocast: the output only feeds linear layers, so under autocast it leaves in autocast's dtype. Each
    linear would cast it anyway, but separately: the attention norm's output would be cast and saved for backward
    three times (q, k, v), the feed-forward norm's twice (gate, up). The values are the same either way."""

    def __init__(self, dim: int, eps: float, *, feeds_autocast: bool = False):
        super().__init__()
        self.eps = eps
        self.feeds_autocast = feeds_autocast
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = (torch.get_autocast_dtype(device) if self.feeds_autocast and torch.is_autocast_enabled(device)
                     and not torch.compiler.is_compiling() else None)
        return _RMSNorm.apply(x, self.weight, self.eps, out_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len` positions.

    `length` is the number of positions already written; the model advances it once per forward, after all layers
    have appended their keys and values for the new tokens.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, dtype: torch.dtype, device):
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_size)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} are needed")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (in that order): drops finished sequences."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """SDPA over (B, H, T, D) queries and (B, H_kv, S, D) keys/values; mask: None (causal), NO_MASK or a bool mask.

    Grouped-query heads go to the kernel as they are (enable_gqa): no repeated copies of the keys and values.
    Under bf16 autocast on a CPU without AMX the attention runs in fp32: there the CPU flash kernel's bf16 backward
    is about 2x slower than its fp32 one (AVX-512 has no bf16 arithmetic beyond dot products), and fp32 is the more
    accurate of the two. GPUs and AMX CPUs keep autocast's choice (bf16).
    """
    if (q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not lean.cpu_has_amx()):
        with torch.autocast("cpu", enabled=False):
            return attention(q.float(), k.float(), v.float(), mask)
    if isinstance(mask, BranchMasks):
        # Two kernel calls instead of one masked one: the prefix and first branch keep the causal kernel (which
        # skips the blocks above the diagonal), and the second branch attends to the prefix's keys and its own.
        P, S = mask.prefix, mask.split
        first = attention(q[:, :, :S], k[:, :, :S], v[:, :, :S], mask.first)
        if S == q.shape[2]:
            return first
        keys, values = torch.cat([k[:, :, :P], k[:, :, S:]], 2), torch.cat([v[:, :, :P], v[:, :, S:]], 2)
        return torch.cat([first, attention(q[:, :, S:], keys, values, mask.second)], 2)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask is NO_MASK:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_size
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_size, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the weights' (possibly tensor-parallel local) output size, hence -1.
        q = lean.linear(self.wq, x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = lean.linear(self.wk, x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = lean.linear(self.wv, x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if lean.fp32_attention_of_bf16_ok(q, k, v, cos, sin, mask, kv_cache):
            return lean.linear(self.wo, lean.Fp32AttentionOfBf16.apply(q, k, v, cos, sin, mask))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_id, k, v)
        out = attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def forward_at(self, x, cos, sin, mask, keep: torch.Tensor) -> torch.Tensor:
        """The attention output at the (B, K) positions `keep` only: keys and values from every position, queries
        and the output projection at K. The last block of a reward model needs no more."""
        B, T, dim = x.shape
        K = keep.shape[1]
        k = rotate(self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2), cos, sin)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        x_kept = x.gather(1, keep[..., None].expand(-1, -1, dim))
        at = keep[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])
        cos_kept = cos.expand(B, -1, -1, -1).gather(2, at)
        sin_kept = sin.expand(B, -1, -1, -1).gather(2, at)
        q = rotate(self.wq(x_kept).view(B, K, -1, self.head_dim).transpose(1, 2), cos_kept, sin_kept)
        out = attention(q, k, v, query_rows(mask, keep, T))
        return self.wo(out.transpose(1, 2).reshape(B, K, -1))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for proj in (self.wq, self.wk, self.wv):
            nn.init.normal_(proj.weight, mean=0.0, std=init_std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = lean.linear(self.w1, x), lean.linear(self.w3, x)
        if lean.swiglu_down_ok(a, b, self.w2):
            return lean.SwiGLUDown.apply(a, b, self.w2.weight)
        return self.w2(lean.swiglu(a, b))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.w3.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.w2.weight, mean=0.0, std=out_std)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, feeds_autocast=True)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, feeds_autocast=True)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None, keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """keep (B, K): only these positions' outputs are wanted (the last block of a reward model): queries, the
        output projection and the feed-forward run on K positions instead of T (keys and values on all)."""
        if keep is None:
            h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv_cache)
        else:
            if kv_cache is not None:
                raise ValueError("keep (output positions) takes no KV cache")
            x_kept = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            h = x_kept + self.attention.forward_at(self.attention_norm(x), cos, sin, mask, keep)
        return h + self.feed_forward(self.ffn_norm(h))


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # One head: `output` (vocabulary logits) for an LM, `score` (one scalar) for a reward model; the other is
        # None, and a pipeline stage that does not hold the head has it set to None too.
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if cfg.head == "lm" else None
        self.score = nn.Linear(cfg.dim, 1, bias=False) if cfg.head == "score" else None
        if self.output is not None and cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer(
            "inv_freq", rope_inverse_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(init_std) everywhere; the projections that write into the residual stream (attention output and
        MLP down) get init_std / sqrt(2 * n_layers) so the residual's variance does not grow with depth (GPT-2)."""
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=cfg.init_std)
        for block in self.layers.values():
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            block.attention.reset_parameters(cfg.init_std, out_std)
            block.feed_forward.reset_parameters(cfg.init_std, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=cfg.init_std)
        if self.score is not None:
            nn.init.normal_(self.score.weight, mean=0.0, std=score_init_std(cfg.dim))
        self.inv_freq = rope_inverse_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling).to(
            self.inv_freq.device
        )

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
        branches: BranchedRows | None = None,
        output_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); a reward model's score at every position (B, T); or, with return_hidden, the final
        normed hidden states (B, T, dim), which are also what a pipeline stage without the head returns.

        tokens: (B, T) ids, or (B, T, dim) hidden states when this module is a pipeline stage without embeddings.
        position_ids: (B, T); default: consecutive positions after what the KV cache already holds.
        doc_ids: (B, T) document index of each packed token (training); attention never crosses documents.
        attention_mask: (B, cache length + T) with 1 for real tokens and 0 for padding (generation); or a
        (B, 1, T, cache length + T) bool mask, True where a query may attend to a key, used as it is.
        branches: rows of one prefix and two continuations (BranchedRows), instead of doc_ids or attention_mask.
        output_positions: (B, K) the positions whose outputs are wanted: the result is (B, K, ...) and the last
        block's feed-forward runs on those positions only.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        B, T = h.shape[0], h.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=h.device)[None]
        cos, sin = rope_cos_sin(position_ids, self.inv_freq)
        cos, sin = cos[:, None].to(h.dtype), sin[:, None].to(h.dtype)
        if branches is not None:
            if doc_ids is not None or attention_mask is not None or kv_cache is not None:
                raise ValueError("branched rows take neither doc_ids, attention_mask nor a KV cache")
            mask = branches.masks(T, h.device)
        elif attention_mask is not None and attention_mask.dim() == 4:
            if doc_ids is not None:
                raise ValueError("a full attention mask takes no doc_ids")
            mask = attention_mask.to(device=h.device, dtype=torch.bool)
        else:
            mask = build_attention_mask(T, past + T, doc_ids=doc_ids, key_padding=attention_mask, device=h.device)
        layers = list(self.layers.values())
        for i, layer in enumerate(layers):
            if output_positions is not None and i == len(layers) - 1:
                h = layer(h, cos, sin, mask, kv_cache, keep=output_positions.to(h.device))
            else:
                h = layer(h, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if self.norm is not None:
            h = self.norm(h)
        if return_hidden:
            return h
        # The config says which head, not which attribute is set: a pipeline stage's view of an LM
        # (parallel/apply.py's stage_view) has no `score` attribute at all.
        if self.cfg.head == "score":
            return h if self.score is None else self.score(h).squeeze(-1)
        return h if self.output is None else self.output(h)

    def lm_head_weight(self) -> torch.Tensor:
        """The (vocab, dim) matrix that turns final hidden states into logits. Objectives take it from here for their
        chunked losses and log-probs (calling the head would materialise every logit); an adapter on the head
        changes what this returns, not the objectives."""
        require_lm_head(self, "compute logits with")
        if self.output is None:
            raise RuntimeError("this pipeline stage holds no LM head")
        return self.output.weight

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        weight = next(self.parameters())
        return KVCache(
            self.cfg, batch_size, max_len or self.cfg.max_seq_len, dtype=dtype or weight.dtype, device=weight.device
        )

    def num_params(self) -> int:
        """Parameters actually held (a tied table counted once)."""
        return sum(p.numel() for p in self.parameters())


def score_init_std(dim: int) -> float:
    """A new score head's weights are normal(0, 1/sqrt(dim + 1)), as TRL's reward models start: the initial rewards
    have about unit variance for unit-RMS final hidden states."""
    return 1.0 / math.sqrt(dim + 1)


def require_lm_head(model: Transformer, action: str) -> None:
    """The clear error for asking a reward model for what only a language model has (generation, logits, GGUF)."""
    if model.cfg.head == "score":
        raise ConfigError(f"a reward model (head=score) has no LM head to {action}")


def build_model(cfg: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Build and initialise; device='meta' allocates nothing (shape checks and planning for 7B/70B)."""
    with torch.device(device):
        model = Transformer(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
