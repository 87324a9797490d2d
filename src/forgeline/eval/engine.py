"""The request engine: what a benchmark asks of a model, in lm-evaluation-harness's two request types.

    loglikelihood(context, continuation) -> (log P(continuation | context), is_greedy)
    generate_until(context, until, max_new_tokens) -> text

Tokenisation follows the harness's `hf` backend so that the numbers agree: trailing spaces of a context move to the
front of its continuation; the continuation's tokens are those of encode(context + continuation) after the first
len(encode(context)) (so a merge across the boundary is scored as the harness scores it); no BOS unless asked
(`add_bos`); an empty context becomes the end-of-text token; a sequence longer than the model's context is cut from
the left (counted in `stats.truncated`).

Speed comes from computing each distinct context once:
* continuations of one token each (MMLU's " A".." D"): one forward pass over the context, every continuation read
  off its last position's distribution;
* longer continuations (ARC's answer texts, HellaSwag's endings): the context's keys and values are computed once
  into a KV cache, which is copied to one row per continuation; the continuations then run as one batch against it.
Contexts are sorted by length and batched with left padding; per-request results do not depend on the batch they
were computed in (within float rounding: tests/test_eval_engine.py checks 1e-5 across batch sizes 1, 4 and 16).
Under torchrun the distinct contexts are dealt out over the ranks and the results gathered on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..model.inference.generate import GenerationConfig, generate
from ..model.transformer import Transformer, require_lm_head

__all__ = ["EngineStats", "GenerationRequest", "LoglikelihoodResult", "RequestEngine"]


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float
    is_greedy: bool
    tokens: int  # continuation tokens scored


@dataclass(frozen=True)
class GenerationRequest:
    context: str
    until: tuple[str, ...] = ()
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int | None = None


@dataclass
class EngineStats:
    requests: int = 0
    contexts: int = 0  # distinct contexts computed
    forward_tokens: int = 0  # tokens run through the model
    truncated: int = 0  # requests cut from the left to fit the context window
    hit_max_tokens: int = 0  # generations stopped by max_new_tokens, not by a stop string or EOS
    notes: list[str] = field(default_factory=list)


class RequestEngine:
    """Log-likelihoods and generations for one model and its tokenizer.

    batch_tokens bounds the tokens of one forward batch (rows x padded length), which bounds memory: a KV cache
    row holds 2 x layers x kv_heads x head_dim floats per position."""

    def __init__(self, model: Transformer, tokenizer, *, batch_size: int = 16, batch_tokens: int = 8192,
                 max_length: int | None = None, add_bos: bool = False):
        require_lm_head(model, "evaluate")
        if batch_size < 1 or batch_tokens < 1:
            raise ConfigError("batch_size and batch_tokens must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.max_length = min(max_length or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.add_bos = add_bos
        self.device = model.inv_freq.device
        eot = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
        if eot is None:
            raise ConfigError("the tokenizer has neither an end-of-text nor a BOS token for empty contexts")
        self.prefix_token_id = eot
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id < model.cfg.vocab_size \
            else 0
        self.stats = EngineStats()

    # -- tokenisation --------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.add_bos and self.tokenizer.bos_id is not None)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The harness's split of context and continuation into tokens."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        if not context:
            return [self.prefix_token_id], self.tokenizer.encode(continuation, add_bos=False)
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return whole[:len(context_ids)], whole[len(context_ids):]

    # -- log-likelihoods -----------------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        """log P(continuation | context) and whether greedy decoding would produce the continuation, per request."""
        encoded = []
        for context, continuation in requests:
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise ConfigError(f"an empty continuation cannot be scored (context ...{context[-40:]!r})")
            if len(ctx) + len(cont) - 1 > self.max_length:  # cut the context from the left, as the harness does
                keep = max(self.max_length + 1 - len(cont), 1)
                if len(cont) > self.max_length:
                    cont = cont[-self.max_length:]
                    keep = 1
                ctx = ctx[-keep:]
                self.stats.truncated += 1
            encoded.append((tuple(ctx), tuple(cont)))
        self.stats.requests += len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(encoded):
            groups.setdefault(ctx, []).append(i)
        contexts = sorted(groups, key=lambda c: (-len(c), c))
        mine = _my_share(contexts)
        self.stats.contexts += len(contexts)
        results: dict[int, LoglikelihoodResult] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                batch: list[tuple[int, ...]] = []
                for ctx in mine:
                    rows = sum(len(groups[c]) for c in batch) + len(groups[ctx])
                    longest = max([len(c) for c in batch] + [len(ctx)]) + max(len(encoded[i][1]) for i in groups[ctx])
                    if batch and (len(batch) >= self.batch_size or rows * longest > self.batch_tokens):
                        results.update(self._score(batch, groups, encoded))
                        batch = []
                    batch.append(ctx)
                if batch:
                    results.update(self._score(batch, groups, encoded))
        finally:
            self.model.train(was_training)
        results = _gather(results)
        return [results[i] for i in range(len(encoded))]

    def _score(self, contexts: list[tuple[int, ...]], groups: dict, encoded: list) -> dict[int, LoglikelihoodResult]:
        model, device = self.model, self.device
        B, P = len(contexts), max(len(c) for c in contexts)
        tokens = torch.full((B, P), self.pad_id, dtype=torch.long)
        key_mask = torch.zeros((B, P), dtype=torch.long)
        for b, ctx in enumerate(contexts):
            tokens[b, P - len(ctx):] = torch.tensor(ctx)
            key_mask[b, P - len(ctx):] = 1
        padded = bool((key_mask == 0).any())
        positions = (key_mask.cumsum(-1) - 1).clamp(min=0)
        requests = [(b, i) for b, ctx in enumerate(contexts) for i in groups[ctx]]
        longest_rest = max(len(encoded[i][1]) for _, i in requests) - 1
        cache = model.new_kv_cache(B, P + longest_rest) if longest_rest > 0 else None
        hidden = model(tokens.to(device), position_ids=positions.to(device),
                       attention_mask=key_mask.to(device) if padded else None, kv_cache=cache,
                       return_hidden=True)[:, -1]
        first = F.log_softmax(model.output(hidden).float(), dim=-1)  # (B, V): each context's next-token log-probs
        self.stats.forward_tokens += B * P
        out: dict[int, LoglikelihoodResult] = {}
        if cache is None:  # every continuation is one token
            for b, i in requests:
                tok = encoded[i][1][0]
                out[i] = LoglikelihoodResult(first[b, tok].item(), bool(first[b].argmax().item() == tok), 1)
            return out
        # The continuations (all but their last token) against copies of their context's cache rows, sorted by
        # length and run in chunks of similar lengths: answers of 1 and of 15 tokens padded to one length would
        # almost double the tokens run.
        order = sorted(range(len(requests)), key=lambda r: len(encoded[requests[r][1]][1]))
        chunk_rows = max(1, min(self.batch_size, self.batch_tokens // max(P + longest_rest, 1)))
        for start in range(0, len(order), chunk_rows):
            chunk = [requests[r] for r in order[start:start + chunk_rows]]
            out.update(self._continue(cache, key_mask, first, chunk, encoded))
        return out

    def _continue(self, cache, key_mask, first, chunk, encoded) -> dict[int, LoglikelihoodResult]:
        model, device = self.model, self.device
        R = len(chunk)
        L = max(len(encoded[i][1]) for _, i in chunk) - 1
        rows = [b for b, _ in chunk]
        out: dict[int, LoglikelihoodResult] = {}
        hidden = None
        if L > 0:
            view = _rows_of(cache, torch.tensor(rows, device=device))
            rest = torch.full((R, L), self.pad_id, dtype=torch.long)
            rest_mask = torch.zeros((R, L), dtype=torch.long)
            for r, (_, i) in enumerate(chunk):
                cont = encoded[i][1]
                rest[r, :len(cont) - 1] = torch.tensor(cont[:-1])
                rest_mask[r, :len(cont) - 1] = 1
            start = key_mask.sum(-1)[rows]
            rest_positions = start[:, None] + torch.arange(L)[None]
            mask = torch.cat([key_mask[rows], rest_mask], dim=1)
            hidden = model(rest.to(device), position_ids=rest_positions.to(device), attention_mask=mask.to(device),
                           kv_cache=view, return_hidden=True)
            self.stats.forward_tokens += R * L
        for r, (b, i) in enumerate(chunk):
            cont = encoded[i][1]
            n = len(cont)
            lp = first[b, cont[0]].item()
            greedy = first[b].argmax().item() == cont[0]
            if n > 1:
                logits = F.log_softmax(model.output(hidden[r, :n - 1]).float(), dim=-1)
                target = torch.tensor(cont[1:], device=device)
                lp += logits.gather(1, target[:, None]).sum().item()
                greedy = greedy and bool((logits.argmax(-1) == target).all())
            out[i] = LoglikelihoodResult(lp, bool(greedy), n)
        return out

    # -- generation ----------------------------------------------------------------------------------------------

    def generate_until(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Each context's continuation until one of its stop strings (cut before it), the end-of-text token, or
        max_new_tokens (counted in stats.hit_max_tokens)."""
        self.stats.requests += len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
        mine = _my_share(order)
        texts: dict[int, str] = {}
        by_settings: dict[tuple, list[int]] = {}
        for i in mine:
            r = requests[i]
            by_settings.setdefault((r.until, r.max_new_tokens, r.temperature, r.top_p, r.seed), []).append(i)
        was_training = self.model.training
        self.model.eval()
        try:
            for (until, max_new, temperature, top_p, seed), idx in by_settings.items():
                cfg = GenerationConfig(max_new_tokens=max_new, do_sample=temperature > 0,
                                       temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                                       stop_strings=tuple(until), seed=seed)
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start:start + self.batch_size]
                    prompts = []
                    for i in chunk:
                        ids = self.encode(requests[i].context) or [self.prefix_token_id]
                        room = self.max_length - max_new
                        if len(ids) > room:
                            ids = ids[-max(room, 1):]
                            self.stats.truncated += 1
                        prompts.append(ids)
                    with torch.inference_mode():
                        done = generate(self.model, prompts, cfg, tokenizer=self.tokenizer)
                    for i, completion in zip(chunk, done):
                        text = completion.text or ""
                        for stop in until:  # the text up to the first stop string, as the harness cuts it
                            text = text.split(stop)[0]
                        if completion.finish_reason == "length":
                            self.stats.hit_max_tokens += 1
                        texts[i] = text
        finally:
            self.model.train(was_training)
        texts = _gather(texts)
        return [texts[i] for i in range(len(requests))]


def _rows_of(cache, index: torch.Tensor):
    """A new KV cache holding copies of `cache`'s rows `index` (the shared context's keys and values, once per
    continuation), at the same length; `cache` itself stays as it is for the next chunk."""
    view = object.__new__(type(cache))
    view.keys = [k.index_select(0, index) for k in cache.keys]
    view.values = [v.index_select(0, index) for v in cache.values]
    view.max_len, view.length = cache.max_len, cache.length
    return view


def _my_share(items: list) -> list:
    """This rank's items, every world_size-th (sorted lists stay balanced by length)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return items[rank::world]
    return items


def _gather(results: dict) -> dict:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, results)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged
    return results
