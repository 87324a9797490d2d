"""GGUF import: llama.cpp model files -> a forgeline model, tokenizer and chat template.

The file is read with the ``gguf`` package (llama.cpp's own reader, memory-mapped). Metadata becomes the
ModelConfig; ``tokenizer.ggml.*`` becomes a ``tokenizers`` byte-level BPE (tokens + merges, the pre-tokenizer regex
named by ``tokenizer.ggml.pre``; or, for ``llama`` tokenizers, a SentencePiece BPE from tokens + scores), special
tokens from the token types, BOS/EOS/PAD ids, ``add_bos_token``) and
``tokenizer.chat_template`` the chat template. Tensors are dequantized one at a time into the model's dtype.

Supported architectures: ``llama`` (also Mistral, SmolLM, TinyLlama files) and ``qwen2``.
Tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1 are dequantized here (vectorised numpy); Q5_0, Q5_1 and the
k-quants Q2_K..Q6_K by ``gguf.quants.dequantize``. Anything else (IQ*, TQ*, MXFP4, ...) is a clear error.

llama.cpp's converter permutes the rows of the Llama q/k projections from Hugging Face's half-split rotary layout
to interleaved pairs (``convert_hf_to_gguf.py: LlamaModel.permute``); the permutation is undone here so the
weights fit forgeline's (= transformers') layout. Qwen2 files are stored unpermuted (NEOX rotary).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import CheckpointError, ConfigError
from ..config import ModelConfig
from ..transformer import require_lm_head
from .common import LoadedModel, allocate_model, load_state_into, parse_dtype
from .model_dir import model_state_dict, save_imported

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_GGUF_ARCHITECTURES", "SUPPORTED_GGUF_TYPES", "dequantize", "import_gguf", "load_gguf",
           "tokenizer_from_gguf"]

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
_OWN_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_DELEGATED_TYPES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_GGUF_TYPES = _OWN_TYPES + _DELEGATED_TYPES


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------------------------------------------


def _blocks(raw: np.ndarray, type_size: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1, type_size)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """fp32 array of `shape` (numpy order: rows last-dimension-contiguous) from a tensor's raw GGUF data."""
    n = int(np.prod(shape))
    if type_name == "F32":
        out = np.ascontiguousarray(raw).view(np.float32)
    elif type_name == "F16":
        out = np.ascontiguousarray(raw).view(np.float16).astype(np.float32)
    elif type_name == "BF16":
        out = (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif type_name == "Q8_0":  # 34 bytes: fp16 scale d, 32 x int8; x = d * q
        b = _blocks(raw, 34)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        out = d * b[:, 2:].view(np.int8).astype(np.float32)
    elif type_name == "Q4_0":  # 18 bytes: fp16 d, 16 bytes of nibbles; x = d * (q - 8)
        b = _blocks(raw, 18)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        out = d * (_nibbles(b[:, 2:]).astype(np.float32) - 8.0)
    elif type_name == "Q4_1":  # 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles; x = d * q + m
        b = _blocks(raw, 20)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        out = d * _nibbles(b[:, 4:]).astype(np.float32) + m
    elif type_name in _DELEGATED_TYPES:
        gguf = _gguf()
        out = gguf.quants.dequantize(np.ascontiguousarray(raw), gguf.GGMLQuantizationType[type_name])
    else:
        raise CheckpointError(f"GGUF tensor type {type_name} is not supported (supported: "
                              f"{', '.join(SUPPORTED_GGUF_TYPES)})")
    out = np.asarray(out, dtype=np.float32).reshape(-1)
    if out.size != n:
        raise CheckpointError(f"GGUF tensor of type {type_name} holds {out.size} values, its shape says {n}")
    return out.reshape(shape)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> Hugging Face's two halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (convert_hf_to_gguf.py), used to write test files the way llama.cpp does."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------


class _Meta:
    def __init__(self, reader, path: Path):
        self.reader = reader
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except Exception as exc:
            raise CheckpointError(f"{self.path}: cannot read metadata {key} ({exc})") from None
        return value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata {key} is missing")
        return value


def _open(path: Path):
    gguf = _gguf()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # bad magic, unsupported version, truncated file
        raise CheckpointError(f"{path}: {_why_unreadable(path, exc)}") from None
    return reader


_GGUF_HEADER_BYTES = 24  # magic, version, tensor count, metadata count


def _why_unreadable(path: Path, exc: Exception) -> str:
    """What the reader's failure means for the user. The reader itself fails deep inside numpy ("index 0 is out of
    bounds", "cannot reshape array") when a file ends early, which says nothing about the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_GGUF_HEADER_BYTES)
    if size == 0:
        return "not a GGUF file: the file is empty"
    if not b"GGUF".startswith(head[:4]):  # a file cut inside the magic itself still starts like one
        return "not a GGUF file (it does not start with the GGUF magic bytes)"
    if "version" in str(exc).lower():
        return f"not a readable GGUF file ({exc})"
    if size < _GGUF_HEADER_BYTES:
        return f"truncated GGUF file: it ends after {size} bytes, inside the header"
    return (f"truncated or corrupt GGUF file: its metadata or tensor data run past the end of the file "
            f"({size:,} bytes); download or copy it again")


def config_from_gguf(meta: _Meta, tensors: dict[str, Any]) -> tuple[ModelConfig, str]:
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise CheckpointError(f"{meta.path}: unsupported GGUF architecture {arch!r}; supported: "
                              f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{meta.path}: rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{meta.path}: per-frequency rope factors (rope_freqs, Llama 3.1-style long context) "
                              "are not supported in GGUF import; import the Hugging Face checkpoint instead")
    dim = int(meta.require(f"{arch}.embedding_length"))
    n_heads = int(meta.require(f"{arch}.attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or dim // n_heads)
    rot = meta.get(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise CheckpointError(f"{meta.path}: partial rotary embeddings ({rot} of {head_dim} dims) are not supported")
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{meta.path}: tensor token_embd.weight is missing")
    vocab = int(meta.get(f"{arch}.vocab_size") or int(embd.shape[-1]))
    try:
        cfg = ModelConfig(
            vocab_size=vocab,
            dim=dim,
            n_layers=int(meta.require(f"{arch}.block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
            head_dim=None if head_dim * n_heads == dim else head_dim,
            ffn_dim=int(meta.require(f"{arch}.feed_forward_length")),
            max_seq_len=int(meta.get(f"{arch}.context_length") or 2048),
            # stored as float32: 1e-5 reads back as 9.9999997e-06; 7 significant digits recover the written value
            norm_eps=float(f"{float(meta.get(f'{arch}.attention.layer_norm_rms_epsilon') or 1e-5):.7g}"),
            rope_theta=float(f"{float(meta.get(f'{arch}.rope.freq_base') or 10000.0):.7g}"),
            qkv_bias="blk.0.attn_q.bias" in tensors,
            tie_embeddings="output.weight" not in tensors,
        )
    except ValueError as exc:
        raise CheckpointError(f"{meta.path}: invalid model shape: {exc}") from None
    return cfg, arch


_GGUF_TO_FORGELINE = [
    (re.compile(r"^token_embd\.weight$"), "tok_embeddings.weight"),
    (re.compile(r"^output_norm\.weight$"), "norm.weight"),
    (re.compile(r"^output\.weight$"), "output.weight"),
    (re.compile(r"^blk\.(\d+)\.attn_norm\.weight$"), r"layers.\1.attention_norm.weight"),
    (re.compile(r"^blk\.(\d+)\.attn_q\.(weight|bias)$"), r"layers.\1.attention.wq.\2"),
    (re.compile(r"^blk\.(\d+)\.attn_k\.(weight|bias)$"), r"layers.\1.attention.wk.\2"),
    (re.compile(r"^blk\.(\d+)\.attn_v\.(weight|bias)$"), r"layers.\1.attention.wv.\2"),
    (re.compile(r"^blk\.(\d+)\.attn_output\.weight$"), r"layers.\1.attention.wo.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_gate\.weight$"), r"layers.\1.feed_forward.w1.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_up\.weight$"), r"layers.\1.feed_forward.w3.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_down\.weight$"), r"layers.\1.feed_forward.w2.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_norm\.weight$"), r"layers.\1.ffn_norm.weight"),
]
_FORGELINE_TO_GGUF = [
    (re.compile(r"^tok_embeddings\.weight$"), "token_embd.weight"),
    (re.compile(r"^norm\.weight$"), "output_norm.weight"),
    (re.compile(r"^output\.weight$"), "output.weight"),
    (re.compile(r"^layers\.(\d+)\.attention_norm\.weight$"), r"blk.\1.attn_norm.weight"),
    (re.compile(r"^layers\.(\d+)\.attention\.wq\.(weight|bias)$"), r"blk.\1.attn_q.\2"),
    (re.compile(r"^layers\.(\d+)\.attention\.wk\.(weight|bias)$"), r"blk.\1.attn_k.\2"),
    (re.compile(r"^layers\.(\d+)\.attention\.wv\.(weight|bias)$"), r"blk.\1.attn_v.\2"),
    (re.compile(r"^layers\.(\d+)\.attention\.wo\.weight$"), r"blk.\1.attn_output.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w1\.weight$"), r"blk.\1.ffn_gate.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w3\.weight$"), r"blk.\1.ffn_up.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w2\.weight$"), r"blk.\1.ffn_down.weight"),
    (re.compile(r"^layers\.(\d+)\.ffn_norm\.weight$"), r"blk.\1.ffn_norm.weight"),
]


def gguf_to_forgeline_name(name: str) -> str | None:
    for pattern, repl in _GGUF_TO_FORGELINE:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def forgeline_to_gguf_name(name: str) -> str:
    for pattern, repl in _FORGELINE_TO_GGUF:
        if pattern.match(name):
            return pattern.sub(repl, name)
    raise ValueError(f"no GGUF name for {name!r}")


def _iter_tensors(reader, path: Path, cfg: ModelConfig, arch: str, dtype: torch.dtype | None):
    for t in reader.tensors:
        name = gguf_to_forgeline_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {arch} model")
        shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
        type_name = t.tensor_type.name
        if type_name not in SUPPORTED_GGUF_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} has type {type_name}, which is not supported "
                                  f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})")
        try:
            raw = np.asarray(t.data)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {t.name} ({exc}); the file may be truncated") from None
        w = dequantize(raw, type_name, shape)
        if arch == "llama" and name.endswith(("attention.wq.weight", "attention.wq.bias")):
            w = unpermute_rotary(w, cfg.n_heads)
        elif arch == "llama" and name.endswith(("attention.wk.weight", "attention.wk.bias")):
            w = unpermute_rotary(w, cfg.kv_heads)
        w = np.ascontiguousarray(w)
        if not w.flags.writeable:  # an F32 tensor is a view of the read-only memory map
            w = w.copy()
        tensor = torch.from_numpy(w)
        yield name, tensor.to(dtype) if dtype is not None else tensor


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

_GPT2 = "gpt2"
_DIGITS_THEN_GPT2 = "digits+gpt2"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp uses for it (llama-vocab.cpp).
_PRE_TOKENIZERS = {
    "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2,
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2, "command-r": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "llama-v3": _LLAMA3_REGEX, "smaug-bpe": _LLAMA3_REGEX,
    "qwen2": _QWEN2_REGEX, "deepseek-r1-qwen": _QWEN2_REGEX,
}


def _pre_tokenizer(pre: str | None, path: Path):
    from tokenizers import Regex, pre_tokenizers

    kind = _PRE_TOKENIZERS.get(pre or "default")
    if kind is None:
        logger.warning("%s: pre-tokenizer %r is not known to forgeline; using GPT-2's", path, pre)
        kind = _GPT2
    if kind == _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(kind), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _sentencepiece_bpe(tokens: list[str], scores: list[float], unk: str | None, *,
                       add_space_prefix: bool = True):
    """A SentencePiece BPE vocabulary (tokens + scores) as a `tokenizers` BPE, the way transformers converts
    Llama's tokenizer.model (LlamaConverter): merges are every split of a piece into two vocabulary pieces, ranked by
    the merged piece's score; byte fallback; "▁" for spaces, prepended to the text."""
    import tokenizers
    from tokenizers import decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep the order above
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token=unk,
                                              fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return backend


def tokenizer_from_gguf(meta: _Meta):
    """A forgeline Tokenizer from tokenizer.ggml.* metadata: tokenizer.ggml.model 'gpt2' (byte-level BPE: tokens +
    merges + pre-tokenizer) or 'llama' (SentencePiece BPE: tokens + scores, byte fallback)."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, processors

    from ...tokenizer import Tokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind not in ("gpt2", "llama"):
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2', "
                              "byte-level BPE, and 'llama', SentencePiece BPE); import the Hugging Face checkpoint "
                              "for its tokenizer.json")
    tokens: list[str] = list(meta.require("tokenizer.ggml.tokens"))
    types = [int(t) for t in (meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.tokens has duplicate tokens")
    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError(f"{meta.path}: a SentencePiece tokenizer needs tokenizer.ggml.scores")
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        backend = _sentencepiece_bpe(tokens, [float(x) for x in scores],
                                     None if unk_id is None else tokens[int(unk_id)],
                                     add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    else:
        merges = []
        for m in meta.get("tokenizer.ggml.merges") or []:
            parts = m.split(" ")
            if len(parts) != 2:
                raise CheckpointError(f"{meta.path}: malformed merge {m!r}")
            merges.append((parts[0], parts[1]))
        pre = meta.get("tokenizer.ggml.pre")
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                                  ignore_merges=_PRE_TOKENIZERS.get(pre) == _LLAMA3_REGEX))
        backend.pre_tokenizer = _pre_tokenizer(pre, meta.path)
        backend.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special; user-defined ones (type 4) are matched verbatim but decoded as text.
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if int(t) == 3]
    users = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if int(t) == 4]
    if specials:
        backend.add_special_tokens(specials)
    if users:
        backend.add_tokens(users)

    def token(key: str) -> str | None:
        i = meta.get(key)
        if i is None:
            return None
        i = int(i)
        if not 0 <= i < len(tokens):
            raise CheckpointError(f"{meta.path}: {key}={i} is outside the vocabulary")
        return tokens[i]

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos
                                                                                       else []))
        special = {t: vocab[t] for t in ([bos] if add_bos else []) + ([eos] if add_eos else [])}
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                               special_tokens=list(special.items()))
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=token("tokenizer.ggml.padding_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=None,
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_gguf(path: str | Path, *, dtype: torch.dtype | str | None = torch.float32,
              device: str | torch.device = "cpu", load_tokenizer: bool = True) -> LoadedModel:
    """Load a GGUF file: model (dequantized to `dtype`), tokenizer and chat template, generation defaults."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    reader = _open(path)
    meta = _Meta(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    cfg, arch = config_from_gguf(meta, tensors)
    for t in reader.tensors:  # all types checked before anything is allocated
        if t.tensor_type.name not in SUPPORTED_GGUF_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which is not supported "
                                  f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})")
    tokenizer = tokenizer_from_gguf(meta) if load_tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"{cfg.vocab_size}")
    model = allocate_model(cfg, dtype=dtype, device=device)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for t in reader.tensors:
        name = gguf_to_forgeline_name(t.name)
        shape = tuple(reversed([int(x) for x in t.shape]))
        if name in expected and expected[name] != shape:
            raise CheckpointError(f"{path}: {t.name} has shape {list(shape)}, but the metadata implies "
                                  f"{list(expected[name])}")
    load_state_into(model, _iter_tensors(reader, path, cfg, arch, dtype), str(path))
    model.eval()
    gen: dict[str, Any] = {}
    if tokenizer is not None:
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return LoadedModel(model=model, tokenizer=tokenizer, generation_config=gen, architecture=None,
                       hf_config=None, source=str(path))


def import_gguf(path: str | Path, out: str | Path, *, dtype: torch.dtype | str | None = torch.float32,
                overwrite: bool = False) -> Path:
    """`forgeline import gguf`: a GGUF file -> a forgeline model directory (dequantized weights)."""
    return save_imported(load_gguf(path, dtype=dtype), out, overwrite=overwrite)


def write_gguf(model, tokenizer, path: str | Path, *, arch: str = "llama", types: dict[str, str] | None = None,
               default_type: str = "F32") -> Path:
    """Write a model (and its byte-level BPE tokenizer) as GGUF, laid out as llama.cpp's converter does: q/k rows
    permuted for `llama`, tied output omitted, tokens/merges/token types/special ids/chat template in metadata.

    types: forgeline parameter name -> GGUF type name (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), else
    `default_type` for 2-D weights (1-D tensors stay F32, as in llama.cpp). For tests and tools.
    """
    require_lm_head(model, "write as GGUF (llama.cpp's architectures are language models)")
    gguf = _gguf()
    cfg = model.cfg
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ConfigError(f"cannot write GGUF architecture {arch!r}")
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_key_length(cfg.head_size)
    w.add_value_length(cfg.head_size)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer is not None:
        backend = json.loads(tokenizer.backend.to_str())
        if backend["model"]["type"] != "BPE":
            raise ConfigError("only byte-level BPE tokenizers can be written to GGUF")
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        tokens = [""] * cfg.vocab_size
        for t, i in vocab.items():
            tokens[i] = t
        for i in range(len(vocab), cfg.vocab_size):  # padded vocabulary rows: unused placeholder tokens
            tokens[i] = f"<unused_{i}>"
        specials = {a["id"] for a in backend.get("added_tokens", []) if a.get("special")}
        token_types = [3 if i in specials else (5 if i >= len(vocab) else 1) for i in range(cfg.vocab_size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        w.add_token_merges(merges)
        for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
            i = getattr(tokenizer, f"{role}_id")
            if i is not None:
                add(i)
        w.add_add_bos_token(False)
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
    for name, tensor in model_state_dict(model).items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        data = tensor.detach().float().numpy()
        if arch == "llama" and ".attention.wq." in name:
            data = permute_rotary(data, cfg.n_heads)
        elif arch == "llama" and ".attention.wk." in name:
            data = permute_rotary(data, cfg.kv_heads)
        qtype = (types or {}).get(name, default_type if data.ndim == 2 else "F32")
        data = np.ascontiguousarray(data, dtype=np.float32)
        gname = forgeline_to_gguf_name(name)
        if qtype == "F32":
            w.add_tensor(gname, data)
        elif qtype == "F16":
            w.add_tensor(gname, data.astype(np.float16))
        else:
            gtype = gguf.GGMLQuantizationType[qtype]
            q = gguf.quants.quantize(data, gtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
