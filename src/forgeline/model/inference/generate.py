"""Batched autoregressive generation with a preallocated KV cache.

    prompts (left-padded to one length) -> one prefill forward -> one forward per new token for the unfinished rows

Left padding: each row's positions count from its first real token and its pads are masked out of attention, so
a prompt's completion does not depend on the other prompts in its batch (greedy output equals unbatched output).
When no row is padded, nothing is masked and positions are implicit: the model's fastest path.

Sampling follows transformers' order and semantics: repetition penalty -> temperature -> top-k -> top-p, then
argmax (greedy) or a draw from a seeded generator. Each completion carries the chosen tokens, their text, and
per-token log-probabilities under the model's unmodified distribution (log-softmax of the raw logits, fp32), which
is what policy-gradient training (PPO) scores against.

Stops: a stop token (by default the tokenizer's EOS and the generation config's eos ids) ends a row and is kept as
its last token (its text is not in `text`); a stop string ends a row once it appears in the decoded text, which is
cut just before it; otherwise a row ends after `max_new_tokens` (or when the model's context is full).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from ...errors import ConfigError, ForgelineError
from ..decode import NativeDecoder
from ..transformer import Transformer, require_lm_head

__all__ = ["Completion", "GenerationConfig", "encode_prompt", "generate", "iter_generate", "sample"]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False  # False (or temperature 0): greedy
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_strings: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None  # None: the tokenizer's EOS
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError("stop_strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_hf(cls, generation_config: dict[str, Any] | None, **overrides: Any) -> "GenerationConfig":
        """Defaults from a Hugging Face generation_config.json dict, then the caller's overrides (None = unset)."""
        gen = generation_config or {}
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens"):
            if gen.get(key) is not None:
                values[key] = gen[key]
        if values.get("top_k") == 0:
            values["top_k"] = None
        values.update({k: v for k, v in overrides.items() if v is not None and k in known})
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown generation settings: {sorted(unknown)}")
        return cls(**values)


@dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    prompt_tokens: int
    text: str | None = None
    stop: str | int | None = None  # what stopped it: the stop string or the stop token id


def encode_prompt(tokenizer, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of a plain-text prompt. add_bos None: as the tokenizer's own post-processor does (Hugging Face
    semantics: Llama's tokenizer.json adds <s>, Qwen's and SmolLM's add nothing)."""
    if add_bos is None:
        return list(tokenizer.backend.encode(text, add_special_tokens=True).ids)
    return tokenizer.encode(text, add_bos=add_bos and tokenizer.bos_id is not None)


def default_stop_ids(tokenizer, generation_config: dict[str, Any] | None = None) -> set[int]:
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    eos = (generation_config or {}).get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(e) for e in eos)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Logits processing
# ---------------------------------------------------------------------------------------------------------------


def process_logits(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty, temperature, top-k, top-p on (B, V) fp32 logits (transformers' order and rules)."""
    if seen is not None and cfg.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if cfg.greedy:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - cfg.top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


# ---------------------------------------------------------------------------------------------------------------
# Incremental text
# ---------------------------------------------------------------------------------------------------------------


class _RowText:
    """Decodes one row's tokens as they come; finds stop strings; releases text that can no longer change."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self.sent = 0
        self.text = ""

    def update(self, tokens: list[int]) -> tuple[str, str | None]:
        """(newly released text, the stop string found or None)."""
        self.text = self.tokenizer.decode(tokens)
        search_from = max(0, self.sent - self.holdback)
        for s in self.stop_strings:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[:at]
                return self.flush(), s
        end = len(self.text) - self.holdback
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            end = min(end, len(self.text) - 1)
        if end <= self.sent:
            return "", None
        delta = self.text[self.sent:end]
        self.sent = end
        return delta, None

    def flush(self) -> str:
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StepEvent:
    """One new token of one row (`row` indexes the caller's prompts). `text` is the newly released text;
    `completion` is set on the row's last event."""

    row: int
    token: int
    logprob: float
    text: str = ""
    completion: Completion | None = None


def _prepare_prompts(prompts, tokenizer, add_bos) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ConfigError("text prompts need a tokenizer")
            p = encode_prompt(tokenizer, p, add_bos)
        elif torch.is_tensor(p):
            p = p.tolist()
        p = [int(t) for t in p]
        if not p:
            raise ConfigError("every prompt needs at least one token (e.g. the BOS id)")
        out.append(p)
    return out


def iter_generate(
    model: Transformer,
    prompts: Sequence[str] | Sequence[Sequence[int]] | str,
    config: GenerationConfig | None = None,
    *,
    tokenizer=None,
    add_bos: bool | None = None,
    stream_text: bool = False,
    **overrides: Any,
) -> Iterator[StepEvent]:
    """Yield a StepEvent per new token per row, as they are produced (streaming); see :func:`generate`."""
    require_lm_head(model, "generate with")
    cfg = config or GenerationConfig()
    if overrides:
        cfg = replace(cfg, **overrides)
    ids = _prepare_prompts(prompts, tokenizer, add_bos)
    if tokenizer is not None and cfg.stop_token_ids is None:
        stop_ids = default_stop_ids(tokenizer)
    else:
        stop_ids = set(cfg.stop_token_ids or ())
    if cfg.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need a tokenizer")
    vocab = model.cfg.vocab_size
    for p in ids:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ForgelineError(f"prompt token id {bad[0]} is outside the model's vocabulary (size {vocab})")
    max_ctx = model.cfg.max_seq_len
    longest = max(len(p) for p in ids)
    if longest >= max_ctx:
        raise ForgelineError(f"a prompt has {longest} tokens; the model's context is {max_ctx} tokens, and at "
                             "least one new token must fit")
    max_new = min(cfg.max_new_tokens, max_ctx - longest)
    if max_new <= 0:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield from _loop(model, ids, cfg, max_new, stop_ids, tokenizer, stream_text)
    finally:
        model.train(was_training)


def _loop(model, ids, cfg, max_new, stop_ids, tokenizer, stream_text) -> Iterator[StepEvent]:
    device = model.inv_freq.device
    B = len(ids)
    lens = [len(p) for p in ids]
    P = max(lens)
    total = P + max_new
    pad = 0
    if tokenizer is not None and tokenizer.pad_id is not None and tokenizer.pad_id < model.cfg.vocab_size:
        pad = tokenizer.pad_id
    # Prompts that start alike (a benchmark's few-shot examples) share their keys and values: the shared tokens run
    # once, in one row, and every row's cache starts with a copy of them. Each row is laid out as
    # [shared prefix | left padding | the rest of its prompt].
    shared = shared_prefix_length(ids)
    prompt = torch.full((B, P), pad, dtype=torch.long)
    for i, p in enumerate(ids):
        prompt[i, :shared] = torch.tensor(p[:shared], dtype=torch.long)
        prompt[i, shared + P - len(p):] = torch.tensor(p[shared:], dtype=torch.long)
    prompt = prompt.to(device)
    padded = min(lens) != P
    attn = positions = None
    if padded:
        attn = torch.ones((B, total), dtype=torch.long, device=device)
        for i, n in enumerate(lens):
            attn[i, shared: shared + P - n] = 0
        positions = (attn[:, :P].cumsum(-1) - 1).clamp(min=0)
        next_pos = torch.tensor(lens, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros((B, model.cfg.vocab_size), dtype=torch.bool, device=device)
        for i, p in enumerate(ids):
            seen[i, torch.tensor(p, device=device)] = True

    need_text = tokenizer is not None and (bool(cfg.stop_strings) or stream_text)
    rows = list(range(B))  # batch position -> caller's row
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    out_logprobs: list[list[float]] = [[] for _ in range(B)]
    texts = [_RowText(tokenizer, cfg.stop_strings) if need_text else None for _ in range(B)]

    cache = model.new_kv_cache(B, total)
    if shared:
        fill_shared_prefix(model, cache, prompt[:1, :shared])
    # Decoding steps on a CPU go through the native kernels when the model allows it (see model/decode.py);
    # the prompt's prefill always takes torch's batched path.
    decoder = NativeDecoder.for_model(model) if device.type == "cpu" else None
    hidden = model(prompt[:, shared:], position_ids=None if positions is None else positions[:, shared:],
                   attention_mask=None if attn is None else attn[:, :P], kv_cache=cache, return_hidden=True)[:, -1]
    logits = model.output(hidden)
    for step in range(max_new):
        logits = logits.float()
        scores = process_logits(logits, cfg, seen)
        if cfg.greedy:
            chosen = scores.argmax(-1)
        else:
            chosen = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
        # log-softmax at the chosen token only: logit - logsumexp
        chosen_lp = logits.gather(1, chosen[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        if seen is not None:
            seen[torch.arange(len(rows), device=device), chosen] = True
        chosen_list, lp_list = chosen.tolist(), chosen_lp.tolist()
        last_step = step == max_new - 1
        keep: list[int] = []
        for b, (row, tok, lp) in enumerate(zip(rows, chosen_list, lp_list)):
            out_tokens[row].append(tok)
            out_logprobs[row].append(lp)
            stop: str | int | None = tok if tok in stop_ids else None
            delta = ""
            rt = texts[row]
            if rt is not None:
                if stop is None:
                    delta, found = rt.update(out_tokens[row])
                    stop = found
            done = stop is not None or last_step
            completion = None
            if done:
                if rt is not None:
                    delta += rt.flush()
                text = None
                if tokenizer is not None:
                    text = rt.text if rt is not None else tokenizer.decode(
                        out_tokens[row][:-1] if isinstance(stop, int) else out_tokens[row])
                completion = Completion(
                    tokens=out_tokens[row], logprobs=out_logprobs[row], prompt_tokens=lens[row], text=text,
                    finish_reason="stop" if stop is not None else "length", stop=stop)
            else:
                keep.append(b)
            yield StepEvent(row=row, token=tok, logprob=lp, text=delta, completion=completion)
        if not keep:
            break
        next_tokens = chosen[:, None]
        if len(keep) != len(rows):
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            next_tokens = next_tokens.index_select(0, index)
            rows = [rows[b] for b in keep]
            if seen is not None:
                seen = seen.index_select(0, index)
            if attn is not None:
                attn = attn.index_select(0, index)
                next_pos = next_pos.index_select(0, index)
        key_mask = None if attn is None else attn[:, : cache.length + 1]
        if decoder is not None and decoder.supports_batch(len(rows), cache):
            logits = decoder.step(next_tokens[:, 0], cache, positions=None if attn is None else next_pos,
                                  key_mask=key_mask)
        else:
            hidden = model(next_tokens, position_ids=None if attn is None else next_pos[:, None],
                           attention_mask=key_mask, kv_cache=cache, return_hidden=True)[:, -1]
            logits = model.output(hidden)
        if attn is not None:
            next_pos = next_pos + 1


# Below this many tokens a shared prefix is not worth its own forward call and cache copies.
MIN_SHARED_PREFIX = 16


def shared_prefix_length(rows: Sequence[Sequence[int]], minimum: int = MIN_SHARED_PREFIX) -> int:
    """How many leading tokens every row has in common, leaving each row at least one token of its own (its last
    position's output is needed); 0 for a single row or when fewer than `minimum` are shared."""
    if len(rows) < 2:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n if n >= minimum else 0


def fill_shared_prefix(model: Transformer, cache, prefix: torch.Tensor) -> None:
    """Compute the (1, S) `prefix` tokens' keys and values once and write them into the first S positions of every
    row of `cache` (which must be empty)."""
    if cache.length:
        raise ValueError("a shared prefix goes into an empty KV cache")
    S = prefix.shape[1]
    one = model.new_kv_cache(1, S)
    model(prefix, kv_cache=one, return_hidden=True)
    for layer, (k, v) in enumerate(zip(one.keys, one.values)):
        cache.keys[layer][:, :, :S] = k
        cache.values[layer][:, :, :S] = v
    cache.length = S


def generate(
    model: Transformer,
    prompts: Sequence[str] | Sequence[Sequence[int]] | str,
    config: GenerationConfig | None = None,
    *,
    tokenizer=None,
    add_bos: bool | None = None,
    on_text: Callable[[int, str], None] | None = None,
    **overrides: Any,
) -> list[Completion]:
    """Complete each prompt (text needs `tokenizer`; token-id lists do not). Returns one Completion per prompt, in
    order. `on_text(row, delta)` streams text as it becomes final. Keyword overrides patch `config`, e.g.
    ``generate(model, ["Hi"], tokenizer=tok, max_new_tokens=20, do_sample=True, temperature=0.7, seed=0)``."""
    n = 1 if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else len(prompts)
    results: list[Completion | None] = [None] * n
    for event in iter_generate(model, prompts, config, tokenizer=tokenizer, add_bos=add_bos,
                               stream_text=on_text is not None, **overrides):
        if on_text is not None and event.text:
            on_text(event.row, event.text)
        if event.completion is not None:
            results[event.row] = event.completion
    for i, r in enumerate(results):
        if r is None:  # max_new_tokens == 0
            results[i] = Completion(tokens=[], logprobs=[], finish_reason="length", prompt_tokens=0,
                                    text="" if tokenizer is not None else None)
    return results  # type: ignore[return-value]


def sample(
    model: Transformer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    seed: int | None = None,
) -> list[int]:
    """Continue one prompt (token ids); temperature 0 is greedy. Returns the new tokens only (the stop token, when
    hit, included). Kept for the demo and pre-training's sample; :func:`generate` is the full interface."""
    if not prompt_ids:
        raise ValueError("sample() needs at least one prompt token (e.g. the BOS id)")
    ctx = model.cfg.max_seq_len
    if len(prompt_ids) >= ctx:
        prompt_ids = prompt_ids[-(ctx - 1):]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                           temperature=temperature if temperature > 0 else 1.0, top_k=top_k,
                           stop_token_ids=list(stop_ids), seed=seed)
    return generate(model, [list(prompt_ids)], cfg)[0].tokens
