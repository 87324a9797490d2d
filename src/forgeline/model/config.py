"""Model shape configuration and the named presets (Llama conventions)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Shapes follow the published Llama-family models so that numbers (parameters, FLOPs, memory) can be checked
# against the papers. `vocab_size` is left open where the tokenizer decides it.
PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: the demo and the unit tests.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=512),
    # GPT-3 small / Pythia-160m width and depth with a SwiGLU MLP (8/3 d rounded to 256).
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, max_seq_len=2048),
    # GPT-3 medium width and depth.
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=2816, max_seq_len=2048),
    # TinyLlama-1.1B.
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048, vocab_size=32000),
    # Llama-2-7B.
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096, vocab_size=32000),
    # Llama-2-70B (grouped-query attention with 8 key/value heads).
    "70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, max_seq_len=4096, vocab_size=32000,
        norm_eps=1e-5,
    ),
}


class RopeScaling(BaseModel):
    """Llama-3.1 style frequency scaling: long wavelengths are slowed by `factor`, short ones kept."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["llama3"] = "llama3"
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_seq_len: int = Field(8192, gt=0)

    @model_validator(mode="after")
    def _check_order(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be greater than low_freq_factor")
        return self


class ModelConfig(BaseModel):
    """The decoder's shape. `preset` fills every field the user did not give."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str | None = None
    vocab_size: int | None = Field(None, gt=0, description="None: taken from the tokenizer")
    dim: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(8, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="None: equal to n_heads (MHA); 1 is MQA")
    head_dim: int | None = Field(None, gt=0, description="None: dim // n_heads")
    ffn_dim: int = Field(688, gt=0)
    max_seq_len: int = Field(2048, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    head: Literal["lm", "score"] = Field(
        "lm", description="lm: next-token logits (a language model); score: one scalar per position (a reward model)")
    pad_token_id: int | None = Field(
        None, ge=0, description="head=score only: the padding id. A sequence's reward is its score at the rightmost "
        "token that is not this id (transformers' rule for *ForSequenceClassification); None: the last position")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; presets are: {', '.join(PRESETS)}")
            return {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head_dim={self.head_size} must be even for rotary embeddings")
        if self.head == "score" and self.tie_embeddings:
            raise ValueError("a score-head model has no output projection to tie to the embedding; set "
                             "tie_embeddings=false")
        if self.head == "lm" and self.pad_token_id is not None:
            raise ValueError("pad_token_id chooses the token a score head is pooled at; an LM (head=lm) has no use "
                             "for it")
        if self.pad_token_id is not None and self.vocab_size is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside the vocabulary (size {self.vocab_size})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        return cls(preset=name, **overrides)


def num_params(cfg: ModelConfig, *, include_embedding: bool = True) -> int:
    """Parameter count computed from the shape alone (no model needed, so it works for 70B too)."""
    if cfg.vocab_size is None:
        raise ValueError("vocab_size must be set to count parameters")
    hd, q_out, kv_out = cfg.head_size, cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    attn = cfg.dim * q_out + 2 * cfg.dim * kv_out + q_out * cfg.dim
    if cfg.qkv_bias:
        attn += q_out + 2 * kv_out
    mlp = 3 * cfg.dim * cfg.ffn_dim
    block = attn + mlp + 2 * cfg.dim
    del hd
    embedding = cfg.vocab_size * cfg.dim
    if cfg.head == "score":
        head = cfg.dim  # one scalar per position
    else:
        head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    total = cfg.n_layers * block + cfg.dim + head + (embedding if include_embedding else 0)
    if not include_embedding and cfg.tie_embeddings:
        total += embedding  # the tied table still does the output projection's matmul work
    return total


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6N plus the attention score/value term 12 * L * H * d_head * T.

    N counts every weight that takes part in a matmul (the embedding lookup is a gather and costs nothing, but the
    output projection does). The attention term uses the PaLM-paper convention (no discount for causal masking), so
    MFU figures are comparable with published ones.
    """
    n = num_params(cfg, include_embedding=False)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
