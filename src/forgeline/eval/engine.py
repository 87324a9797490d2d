"""The request engine: what a benchmark asks of a model, in lm-evaluation-harness's two request types.

    loglikelihood(context, continuation) -> (log P(continuation | context), is_greedy)
    generate_until(context, until, max_new_tokens) -> text

Tokenisation follows the harness's `hf` backend so that the numbers agree: trailing spaces of a context move to the
front of its continuation; the continuation's tokens are those of encode(context + continuation) after the first
len(encode(context)) (so a merge across the boundary is scored as the harness scores it); no BOS unless asked
(`add_bos`); an empty context becomes the end-of-text token; a sequence longer than the model's context is cut from
the left (counted in `stats.truncated`).

Speed comes from computing each token once:
* contexts that share a prefix of at least MIN_SHARED_PREFIX tokens (a task's few-shot examples, an MMLU subject's
  header and dev questions) have its keys and values computed once and copied into every row's cache;
* a context and all its continuations run as one row, [context | continuation 1 | continuation 2 | ...], where each
  continuation attends to its context and itself (never to its siblings) at the positions that follow the context:
  the context runs once for all its choices, and a continuation's last token, which is only predicted, not at all;
* logits are computed only at the positions that score a continuation token.
Rows are sorted by length and batched with right padding; per-request results do not depend on the batch they were
computed in (within float rounding: tests/test_eval_engine.py checks 1e-5 across batch sizes 1, 4 and 16).
Under torchrun the distinct contexts are dealt out over the ranks and the results gathered on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..model.inference.generate import GenerationConfig, default_stop_ids, generate
from ..model.masks import prefix_tree_mask
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
                 max_length: int | None = None, add_bos: bool = False, shard: bool = True,
                 generation_config: dict | None = None):
        require_lm_head(model, "evaluate")
        if batch_size < 1 or batch_tokens < 1:
            raise ConfigError("batch_size and batch_tokens must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.max_length = min(max_length or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.add_bos = add_bos
        # Under torchrun each rank takes its share of the requests; a model whose forward is itself collective
        # (FSDP, tensor or pipeline parallel) needs every rank to run the same forwards: shard=False.
        self.shard = shard
        # A generation ends at the tokenizer's end-of-text and at the model's own end tokens (a chat model's end of
        # turn, from its generation_config.json), as `forgeline generate` ends it.
        self.stop_token_ids = sorted(default_stop_ids(tokenizer, generation_config))
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
        mine = _my_share(contexts) if self.shard else contexts
        self.stats.contexts += len(contexts)
        results: dict[int, LoglikelihoodResult] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for shared, family in _families(mine):
                    prefix = self._prefix_cache(family[0][:shared]) if shared else None
                    rows = sorted(family, key=lambda c: -_row_length(c, groups[c], encoded, shared))
                    batch: list[tuple[int, ...]] = []
                    for ctx in rows:
                        longest = _row_length(batch[0] if batch else ctx, groups[batch[0] if batch else ctx],
                                              encoded, shared)
                        if batch and (len(batch) >= self.batch_size or (len(batch) + 1) * longest > self.batch_tokens):
                            results.update(self._score(batch, groups, encoded, shared, prefix))
                            batch = []
                        batch.append(ctx)
                    if batch:
                        results.update(self._score(batch, groups, encoded, shared, prefix))
        finally:
            self.model.train(was_training)
        results = _gather(results) if self.shard else results
        return [results[i] for i in range(len(encoded))]

    def _prefix_cache(self, prefix: tuple[int, ...]):
        cache = self.model.new_kv_cache(1, len(prefix))
        self.model(torch.tensor([prefix], device=self.device), kv_cache=cache, return_hidden=True)
        self.stats.forward_tokens += len(prefix)
        return cache

    def _score(self, contexts: list[tuple[int, ...]], groups: dict, encoded: list, shared: int,
               prefix) -> dict[int, LoglikelihoodResult]:
        """One forward pass over rows [context after the shared prefix | continuation 1 | continuation 2 | ...]:
        each continuation (less its last token, which is only predicted) attends to its context and to itself,
        never to its siblings, at the positions that follow the context, so it is computed exactly as if it
        followed the context alone, and the context is computed once. Rows are right-padded."""
        model, device = self.model, self.device
        B = len(contexts)
        T = max(_row_length(c, groups[c], encoded, shared) for c in contexts)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        branch = torch.full((B, T), -1, dtype=torch.long)  # 0: the context; k: continuation k; -1: padding
        # Per request: the (row, column) of each position whose next-token distribution scores one of its tokens.
        rows_at, cols_at, targets, owner = [], [], [], []
        for b, ctx in enumerate(contexts):
            own = ctx[shared:]
            row, pos, br = list(own), list(range(shared, len(ctx))), [0] * len(own)
            for k, i in enumerate(groups[ctx], start=1):
                cont = encoded[i][1]
                at = [len(own) - 1] + list(range(len(row), len(row) + len(cont) - 1))
                row += cont[:-1]
                pos += range(len(ctx), len(ctx) + len(cont) - 1)
                br += [k] * (len(cont) - 1)
                rows_at += [b] * len(at)
                cols_at += at
                targets += cont
                owner += [i] * len(cont)
            tokens[b, :len(row)] = torch.tensor(row)
            positions[b, :len(row)] = torch.tensor(pos)
            branch[b, :len(row)] = torch.tensor(br)
        if bool((branch > 0).any()):
            mask = prefix_tree_mask(branch, prefix_keys=shared)
        else:  # one-token continuations only: plain causal attention (padding is on the right, after every query)
            mask = None
        cache = None
        if prefix is not None:
            cache = model.new_kv_cache(B, shared + T)
            for layer, (k_, v_) in enumerate(zip(prefix.keys, prefix.values)):
                cache.keys[layer][:, :, :shared] = k_
                cache.values[layer][:, :, :shared] = v_
            cache.length = shared
        hidden = model(tokens.to(device), position_ids=positions.to(device),
                       attention_mask=None if mask is None else mask.to(device), kv_cache=cache, return_hidden=True)
        self.stats.forward_tokens += B * T
        picked = hidden[torch.tensor(rows_at, device=device), torch.tensor(cols_at, device=device)]
        target = torch.tensor(targets, device=device)
        logprob, greedy = [], []
        for start in range(0, len(targets), _LOGIT_CHUNK):  # (positions, vocab) logits a chunk at a time
            logits = model.output(picked[start:start + _LOGIT_CHUNK]).float()
            t = target[start:start + _LOGIT_CHUNK]
            logprob.append(logits.gather(1, t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
            greedy.append(logits.argmax(-1) == t)
        lp_list, greedy_list = torch.cat(logprob).tolist(), torch.cat(greedy).tolist()
        out: dict[int, LoglikelihoodResult] = {}
        sums: dict[int, list] = {}
        for i, lp, g in zip(owner, lp_list, greedy_list):
            acc = sums.setdefault(i, [0.0, True, 0])
            acc[0] += lp
            acc[1] = acc[1] and g
            acc[2] += 1
        for i, (lp, g, n) in sums.items():
            out[i] = LoglikelihoodResult(lp, bool(g), n)
        return out

    # -- generation ----------------------------------------------------------------------------------------------

    def generate_until(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Each context's continuation until one of its stop strings (cut before it), the end-of-text token, or
        max_new_tokens (counted in stats.hit_max_tokens)."""
        self.stats.requests += len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
        mine = _my_share(order) if self.shard else order
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
                                       stop_strings=tuple(until), stop_token_ids=self.stop_token_ids, seed=seed)
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
        texts = _gather(texts) if self.shard else texts
        return [texts[i] for i in range(len(requests))]


_LOGIT_CHUNK = 1024

# A prefix shared by fewer tokens than this is run in every row: its own forward call would cost more than it saves.
MIN_SHARED_PREFIX = 16


def _row_length(ctx: tuple[int, ...], requests: list[int], encoded: list, shared: int) -> int:
    return len(ctx) - shared + sum(len(encoded[i][1]) - 1 for i in requests)


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _families(contexts: list[tuple[int, ...]]) -> list[tuple[int, list[tuple[int, ...]]]]:
    """The contexts in groups that share a prefix of at least MIN_SHARED_PREFIX tokens (a task's few-shot examples,
    one MMLU subject's header and dev questions), as (shared length, contexts); every context keeps at least one
    token of its own (its last position scores the first continuation token). The rest come as one group with
    nothing shared. The grouping depends only on the contexts, never on the batch size."""
    ordered = sorted(contexts)  # lexicographic: contexts with a common prefix are neighbours
    families, loose = [], []
    i = 0
    while i < len(ordered):
        j, shared = i + 1, len(ordered[i]) - 1
        while j < len(ordered):
            common = min(_common(ordered[i], ordered[j]), len(ordered[j]) - 1)
            if common < MIN_SHARED_PREFIX:
                break
            shared = min(shared, common)
            j += 1
        if j - i > 1:
            families.append((shared, ordered[i:j]))
        else:
            loose.append(ordered[i])
        i = j
    if loose:
        families.append((0, loose))
    return families


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
