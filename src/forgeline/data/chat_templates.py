"""Chat templates for SFT: render conversations, mark the tokens the loss is taken on, check special tokens.

Which template (``template=``):

* ``"model"``: the model's own Jinja template (``Tokenizer.chat_template``, from tokenizer_config.json), so that
  fine-tuning uses exactly the format the model will be prompted with.
* ``"chatml"``, ``"llama3"``: built-in templates, for base models without one.
* ``"auto"`` (default): the model's template when it has one, else ChatML.

Loss masks. Only the assistant's tokens are learned by default (``loss_on="assistant"``); ``"last_assistant"``
learns only the final assistant turn (earlier turns are context, e.g. for multi-turn data whose early answers come
from a weaker model); ``"all"`` learns every token. Each assistant turn's tokens include its end-of-turn token, so
the model learns to stop. The assistant text is located in one of two ways:

* Templates that mark assistant turns with ``{% generation %}...{% endgeneration %}`` (both built-ins, and any model
  template that has them): the characters rendered inside the tags, mapped to tokens exactly as transformers'
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` does (every token overlapping a tagged span), so
  the masks are the same as Hugging Face tooling produces.
* Other model templates: by prefix rendering. The conversation up to an assistant turn, rendered with the generation
  prompt, is what the model is given at inference; everything the full rendering adds after that prefix, up to and
  including the turn's end-of-turn token, is what the model must produce. A token belongs to the turn when it
  starts inside that span (a prompt token may swallow the whitespace after it, e.g. phi-3's ``<|assistant|>``).

The whole rendered conversation is encoded once and the masks come from the token offsets, so the ids trained on are
the ids of the full text, never a concatenation of separately encoded pieces. No BOS is added by encoding: a template
that wants BOS renders it (Llama 3 does), as with transformers, so it is never doubled.

Special tokens. A built-in template's markers must be single tokens of the tokenizer, else every turn would be
learned as a handful of ordinary sub-word pieces. Missing ones are an error, unless ``add_special_tokens=True``: then
they are added to the tokenizer (``ChatTemplate.added_tokens`` lists them) and the model's embedding and head must
grow to ``tokenizer.vocab_size`` (:func:`forgeline.model.resize.resize_token_embeddings`).
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from forgeline.errors import ConfigError, DataError, ForgelineError
from forgeline.tokenizer import Tokenizer, compile_chat_template

from .packing import TokenizedSample

__all__ = [
    "BUILTIN_TEMPLATES",
    "LOSS_ON",
    "TEMPLATE_NAMES",
    "ChatTemplate",
    "add_special_tokens_to",
    "load_chat_template",
    "missing_special_tokens",
]

LOSS_ON = ("assistant", "last_assistant", "all")
TEMPLATE_NAMES = ("auto", "model", "chatml", "llama3")

# ChatML (Qwen, SmolLM). The tagged span is the answer plus <|im_end|>: the newline after <|im_end|> is never
# generated (decoding stops at <|im_end|>), so it is not learned. Renders the same text as tokenizer.py's default.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 Instruct, with the tokenizer's own BOS in front (rendered only when it has one: Jinja would print None).
LLAMA3_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# name -> (source, end-of-turn token, special tokens the source writes as text)
BUILTIN_TEMPLATES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "chatml": (CHATML_TEMPLATE, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": (LLAMA3_TEMPLATE, "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# A short exchange rendered once per template to learn how it ends an assistant turn.
_PROBE_ANSWER = "General Kenobi."
_PROBE = (
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": _PROBE_ANSWER},
    {"role": "user", "content": "Bye."},
)


class ChatTemplate:
    """A chat template bound to a tokenizer: renders conversations and encodes them with loss masks.

    Build it with :func:`load_chat_template`. ``end_of_turn`` / ``end_of_turn_id`` is the token that closes every
    assistant turn: generation must stop on it, so the exporter adds it to ``generation_config.json``'s
    ``eos_token_id``.
    """

    def __init__(self, tokenizer: Tokenizer, name: str, source: str, *, end_of_turn: str | None = None,
                 added_tokens: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.added_tokens: tuple[str, ...] = tuple(added_tokens)
        # Tagged templates give the assistant spans directly; untagged ones need prefix rendering.
        self.tagged = bool(_GENERATION_TAG.search(source))
        self.end_of_turn = end_of_turn if end_of_turn is not None else self._detect_end_of_turn()
        eot_id = tokenizer.token_to_id(self.end_of_turn)
        if eot_id is None or tokenizer.encode(self.end_of_turn) != [eot_id]:
            raise ConfigError(f"template {name!r}: its end-of-turn token {self.end_of_turn!r} is not a single token "
                              "of this tokenizer")
        self.end_of_turn_id: int = eot_id
        self._check_probe()

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, end_of_turn={self.end_of_turn!r}, tagged={self.tagged})"

    # ------------------------------------------------------------------------------------------- rendering

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as transformers' ``apply_chat_template`` renders it."""
        return self._render(messages, add_generation_prompt)[0]

    def _render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool
                ) -> tuple[str, list[tuple[int, int]]]:
        """Rendered text and the character spans of its ``{% generation %}`` blocks (empty for untagged templates)."""
        if not self.tagged and self.source == self.tokenizer.chat_template:
            # The model's own untagged template renders through the tokenizer, the code every other forgeline
            # command prompts the model with.
            try:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt), []
            except ForgelineError as e:
                raise DataError(str(e)) from None
        return _render_tracked(self.source, [dict(m) for m in messages], add_generation_prompt, self.tokenizer)

    def assistant_spans(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and, per assistant turn, the character span the model must produce."""
        if self.tagged:
            return self._render(messages, False)
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            if not text.startswith(prompt):
                raise DataError(
                    f"message {i}: template {self.name!r} renders the conversation before this assistant turn "
                    "differently from the whole conversation, so the turn's tokens cannot be located; "
                    "use template=chatml or llama3"
                )
            # The turn ends where the rendering with and without the later messages parts; the last end-of-turn
            # token before that closes it (a template may append more, e.g. phi-3's final EOS, which is not learned).
            alone = self.render(messages[: i + 1])
            bound = _common_prefix_length(text, alone)
            end = text.rfind(self.end_of_turn, len(prompt), bound)
            if end < 0:
                raise DataError(f"message {i}: the assistant turn does not end with {self.end_of_turn!r} in template "
                                f"{self.name!r}")
            spans.append((len(prompt), end + len(self.end_of_turn)))
        return text, spans

    # -------------------------------------------------------------------------------------------- encoding

    def encode(self, messages: Sequence[Mapping[str, Any]], *, loss_on: str = "assistant") -> TokenizedSample:
        """Token ids of the rendered conversation and its loss mask (see the module doc for ``loss_on``)."""
        if loss_on not in LOSS_ON:
            raise ConfigError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
        if loss_on == "all":
            text, spans = self.render(messages), []
        else:
            text, spans = self.assistant_spans(messages)
            if not spans:
                raise DataError("the conversation has no assistant turn to learn")
            if loss_on == "last_assistant":
                spans = spans[-1:]
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if ids.size == 0:
            raise DataError("the conversation renders to no tokens")
        if loss_on == "all":
            mask = np.ones(ids.size, dtype=bool)
        elif self.tagged:
            mask = _mask_overlapping(encoding.offsets, spans)
        else:
            mask = _mask_starting_inside(encoding.offsets, spans)
        return TokenizedSample(ids, mask)

    # ----------------------------------------------------------------------------------------- self-checks

    def _detect_end_of_turn(self) -> str:
        """The first special token the template writes after the assistant's text in a probe exchange."""
        text, spans = self._probe_turn_region()
        answer_end = text.find(_PROBE_ANSWER, spans[0]) + len(_PROBE_ANSWER)
        tail = text[answer_end:spans[1]]
        specials = _special_tokens(self.tokenizer)
        for token_id in self.tokenizer.encode(tail):
            token = self.tokenizer.id_to_token(token_id)
            if token in specials:
                return token
        raise ConfigError(
            f"template {self.name!r} closes an assistant turn with no special token ({tail!r} follows the answer), "
            "so a fine-tuned model would not know where to stop; use template=chatml or llama3"
        )

    def _probe_turn_region(self) -> tuple[str, tuple[int, int]]:
        """The probe rendered, and where its assistant turn lies: from the end of the generation prompt to where
        renderings with and without the following message part (untagged templates only)."""
        try:
            text = self.render(_PROBE)
            prompt = self.render(_PROBE[:1], add_generation_prompt=True)
            alone = self.render(_PROBE[:2])
        except DataError as e:
            raise ConfigError(f"template {self.name!r} cannot render a plain user/assistant exchange: {e}") from None
        if not (text.startswith(prompt) and _PROBE_ANSWER in text[len(prompt):]):
            raise ConfigError(
                f"template {self.name!r} renders a conversation's start differently when more messages follow, so "
                "the assistant's tokens cannot be located; use template=chatml or llama3"
            )
        return text, (len(prompt), _common_prefix_length(text, alone))

    def _check_probe(self) -> None:
        """Every assistant turn of a probe must end with the end-of-turn token in the mask, or the template and the
        declared end-of-turn token disagree (a tagged model template that leaves it outside the tags)."""
        sample = self.encode(list(_PROBE))
        ids, mask = sample.input_ids, sample.loss_mask
        ends = np.flatnonzero(mask & ~np.append(mask[1:], False))
        if ends.size == 0 or not all(ids[i] == self.end_of_turn_id for i in ends):
            raise ConfigError(
                f"template {self.name!r}: an assistant turn's learned tokens do not end with {self.end_of_turn!r}; "
                "the tokens inside {% generation %} must include the end-of-turn token"
            )


def load_chat_template(tokenizer: Tokenizer, template: str = "auto", *, add_special_tokens: bool = False
                       ) -> ChatTemplate:
    """Resolve ``template`` (see the module doc) for ``tokenizer``.

    A built-in template whose special tokens the tokenizer lacks is refused, unless ``add_special_tokens``: then the
    tokenizer (mutated in place) gets them, and the returned template's ``added_tokens`` names them; the caller must
    resize the model (``resize_token_embeddings(model, tokenizer.vocab_size)``) and save the tokenizer with it.
    """
    if template not in TEMPLATE_NAMES:
        raise ConfigError(f"template must be one of {', '.join(TEMPLATE_NAMES)}, got {template!r}")
    if template == "auto":
        template = "model" if tokenizer.chat_template else "chatml"
    if template == "model":
        if not tokenizer.chat_template:
            raise ConfigError("template=model, but the tokenizer has no chat template (no 'chat_template' in its "
                              "tokenizer_config.json); choose template=chatml or llama3")
        return ChatTemplate(tokenizer, "model", tokenizer.chat_template)
    source, end_of_turn, required = BUILTIN_TEMPLATES[template]
    missing = missing_special_tokens(tokenizer, required)
    added: list[str] = []
    if missing:
        if not add_special_tokens:
            raise ConfigError(
                f"template {template!r} needs the special tokens {', '.join(missing)}, which this tokenizer lacks; "
                "set add_special_tokens=true to add them (the model's embedding and output layer grow to match), "
                "or choose a template the tokenizer has tokens for"
            )
        added = add_special_tokens_to(tokenizer, missing)
    return ChatTemplate(tokenizer, template, source, end_of_turn=end_of_turn, added_tokens=added)


def missing_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> list[str]:
    """The ``tokens`` that do not encode to one token of their own (absent, or present but split into pieces)."""
    missing = []
    for token in tokens:
        token_id = tokenizer.token_to_id(token)
        if token_id is None or tokenizer.encode(token) != [token_id]:
            missing.append(token)
    return missing


def add_special_tokens_to(tokenizer: Tokenizer, tokens: Sequence[str]) -> list[str]:
    """Add the ``tokens`` the tokenizer lacks as special tokens (in place; ``tokenizer.vocab_size`` grows by their
    number and existing ids do not move) and return those added."""
    tokens = missing_special_tokens(tokenizer, tokens)
    if tokens:
        tokenizer.add_special_tokens(tokens)
    return list(tokens)


# ---------------------------------------------------------------------------------------------- helpers


def _special_tokens(tokenizer: Tokenizer) -> set[str]:
    specials = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    if tokenizer.eos_token is not None:
        specials.add(tokenizer.eos_token)
    return specials


def _common_prefix_length(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _mask_overlapping(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """transformers' rule (``apply_chat_template`` with ``return_assistant_tokens_mask``): a token is learned when
    its characters overlap a span. Kept identical, so masks match Hugging Face tooling token for token."""
    mask = np.zeros(len(offsets), dtype=bool)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = True
    return mask


def _mask_starting_inside(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """A token is learned when it starts inside a span; a token that begins in the prompt and only swallows
    whitespace at the span's start (rstrip special tokens) stays prompt."""
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return mask


_TRACKER: contextvars.ContextVar = contextvars.ContextVar("forgeline_generation_tracker", default=None)


def _render_tracked(source: str, messages: list[dict], add_generation_prompt: bool, tokenizer: Tokenizer
                    ) -> tuple[str, list[tuple[int, int]]]:
    import jinja2

    template = _compile_tracking_template(source)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACKER.set((blocks, spans))
    try:
        for block in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **tokenizer.template_variables()):
            blocks.append(block)
    except jinja2.TemplateError as e:
        raise DataError(f"chat template failed: {e}") from None
    finally:
        _TRACKER.reset(token)
    return "".join(blocks), spans


def _record_generation(text: str) -> None:
    """Where a `{% generation %}` body lands in the output, as transformers' AssistantTracker records it: at the
    moment the block renders, everything before it has been yielded already."""
    state = _TRACKER.get()
    if state is not None:
        blocks, spans = state
        start = sum(len(b) for b in blocks)
        spans.append((start, start + len(text)))


def _compile_tracking_template(source: str):
    import jinja2

    try:
        return compile_chat_template(source, on_generation=_record_generation)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from None
