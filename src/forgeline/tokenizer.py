"""Tokenizers: load any Hugging Face ``tokenizer.json``, train a byte-level BPE, render chat templates.

forgeline wraps the Rust ``tokenizers`` library rather than ``transformers`` so that training and data preparation
do not depend on transformers, while everything saved here still loads with
``transformers.AutoTokenizer.from_pretrained`` and gives the same ids.

Policies, stated once so that every caller can rely on them:

* Special tokens never appear by accident. :meth:`Tokenizer.encode` always encodes with
  ``add_special_tokens=False``, so a tokenizer's own post-processor cannot slip in a hidden BOS; BOS and EOS are added
  only when the caller asks, and never twice (if the text already begins with BOS, e.g. because it started with the
  literal ``<s>`` string or a chat template rendered it, no second one is added; likewise for a trailing EOS).
  Special-token strings that occur in the text are encoded as those special tokens, as Hugging Face does.
* Which token is BOS, EOS and PAD comes from ``tokenizer_config.json`` (then ``special_tokens_map.json``) where the
  key is present, even when its value is null; otherwise from a short list of well-known names found in the
  vocabulary (see ``_BOS_NAMES``, ``_EOS_NAMES``, ``_PAD_NAMES``). ``pad_token`` reports what the tokenizer declares;
  ``pad_id`` is the id to pad batches with and falls back to ``eos_id`` when no pad token is declared (padding
  positions are masked out of the loss, so reusing EOS is harmless and avoids growing the vocabulary).
* Training input must be valid UTF-8. A file with an invalid byte sequence is rejected with a ``DataError`` that
  names the file and the line of the first bad line; bytes are never silently replaced, because a replaced byte
  becomes a U+FFFD token that the model then learns as if it were text.
* Outputs are written atomically: into a temporary path beside the target, then renamed, so a crash never leaves a
  half-written tokenizer that looks complete, and a failed training run leaves no output directory behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from forgeline.errors import ConfigError, DataError, ForgelineError
from forgeline.files import atomic_directory, atomic_write_text

__all__ = ["DEFAULT_CHAT_TEMPLATE", "DEFAULT_SPECIAL_TOKENS", "Tokenizer", "train_bpe"]

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Searched in order when the config does not name the token. `<|endoftext|>` is both BOS and EOS in GPT-2 style
# vocabularies, which is why it appears in both lists.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "<|im_end|>", "<|eot_id|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")

# ChatML, as used by Qwen and SmolLM. Its two markers become special tokens whenever train_bpe uses this template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# Files in a save directory that would contradict the tokenizer_config.json written by save(); transformers reads
# them in preference to (or on top of) the config, so stale copies from an earlier tokenizer must go.
_STALE_FILES = (CHAT_TEMPLATE_FILE, "chat_template.json", SPECIAL_TOKENS_MAP_FILE, "added_tokens.json")

_RECORDS_PER_BATCH = 1000


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token roles and chat template that training code needs.

    Construct with :meth:`load` or :func:`train_bpe`; the constructor is for wrapping an in-memory tokenizer.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ):
        self._tok = backend
        self._ids: dict[str, int | None] = {}
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token is not None:
                if not isinstance(token, str):
                    raise ConfigError(f"{role}_token must be a string, got {type(token).__name__}")
                if backend.token_to_id(token) is None:
                    raise ConfigError(f"{role}_token {token!r} is not in the tokenizer's vocabulary")
            self._ids[role] = None if token is None else backend.token_to_id(token)
        self._bos_token, self._eos_token, self._pad_token, self._unk_token = bos_token, eos_token, pad_token, unk_token
        if chat_template is not None and not isinstance(chat_template, str):
            raise ConfigError(f"chat_template must be a string, got {type(chat_template).__name__}")
        self._chat_template = chat_template
        self.model_max_length = model_max_length
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory holding ``tokenizer.json`` (plus optional configs), or a ``tokenizer.json`` file itself.

        Configs are looked up in the file's directory. Every problem with the files is a ``DataError`` naming the
        file, because a tokenizer that silently loads with the wrong special tokens corrupts all data made with it.
        """
        path = Path(path)
        if path.is_dir():
            directory, file = path, path / TOKENIZER_FILE
            if not file.is_file():
                hint = ""
                if (path / "tokenizer.model").is_file():
                    hint = (
                        " (it has a SentencePiece tokenizer.model; convert it once with transformers: "
                        "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
                    )
                raise DataError(f"no {TOKENIZER_FILE} in this tokenizer directory{hint}", path)
        elif path.is_file():
            directory, file = path.parent, path
        else:
            raise DataError("no such tokenizer file or directory", path)

        backend = _load_backend(file)
        config = _read_json_object(directory / CONFIG_FILE)
        special_map = _read_json_object(directory / SPECIAL_TOKENS_MAP_FILE)

        def special(key: str, names: Sequence[str]) -> str | None:
            sources = ((config, directory / CONFIG_FILE), (special_map, directory / SPECIAL_TOKENS_MAP_FILE))
            for source, where in sources:
                if source is not None and key in source:
                    token = _token_content(source[key], key, where)
                    if token is not None and backend.token_to_id(token) is None:
                        raise DataError(f"{key} {token!r} is not in the vocabulary of {file}", where)
                    return token
            return next((name for name in names if backend.token_to_id(name) is not None), None)

        unk_token = special("unk_token", ())
        if unk_token is None:
            unk_token = getattr(backend.model, "unk_token", None)
            if unk_token is not None and backend.token_to_id(unk_token) is None:
                unk_token = None

        return cls(
            backend,
            bos_token=special("bos_token", _BOS_NAMES),
            eos_token=special("eos_token", _EOS_NAMES),
            pad_token=special("pad_token", _PAD_NAMES),
            unk_token=unk_token,
            chat_template=_load_chat_template(directory, config),
            model_max_length=_model_max_length(config, directory / CONFIG_FILE),
        )

    # --------------------------------------------------------------- properties

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped Rust tokenizer, for what this class does not cover (offsets, truncation)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def pad_token(self) -> str | None:
        """The declared pad token; None when the tokenizer has none (``pad_id`` then falls back to EOS)."""
        return self._pad_token

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def pad_id(self) -> int | None:
        """The id to pad with: the pad token's, else EOS's (padded positions are masked, so EOS is harmless)."""
        return self._ids["pad"] if self._ids["pad"] is not None else self._ids["eos"]

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source: str | None) -> None:
        """The template a fine-tuning run trained with replaces the one loaded, so that it is saved with the run's
        tokenizer and every model exported from it."""
        if source is not None and not isinstance(source, str):
            raise ConfigError(f"chat_template must be a string, got {type(source).__name__}")
        self._chat_template = source

    @property
    def unk_token(self) -> str | None:
        return self._unk_token

    def template_variables(self) -> dict[str, Any]:
        """What transformers passes every chat template besides the messages."""
        return dict(tools=None, documents=None, bos_token=self._bos_token, eos_token=self._eos_token,
                    pad_token=self._pad_token, unk_token=self._unk_token)

    def add_special_tokens(self, tokens: Sequence[str]) -> None:
        """Add `tokens` as special tokens (matched whole in any text, never normalized) at the next free ids;
        existing ids do not move."""
        from tokenizers import AddedToken

        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        self._fingerprint = None  # it covers the vocabulary

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json plus the BOS/EOS/PAD roles.

        Prepared datasets record it so that ids are never mixed with a different tokenizer. The JSON is parsed and
        re-dumped with sorted keys so formatting does not matter; the roles are included because the same vocabulary
        with a different EOS produces different training data.
        """
        if self._fingerprint is None:
            canonical = {
                "tokenizer": json.loads(self._tok.to_str()),
                "bos_token": self._bos_token,
                "eos_token": self._eos_token,
                "pad_token": self._pad_token,
            }
            text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self._fingerprint

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(int(id))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos_token!r}, eos={self._eos_token!r}, "
            f"pad={self._pad_token!r}, chat_template={'yes' if self._chat_template else 'no'})"
        )

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encode without the tokenizer's own special tokens, then add BOS/EOS only if asked and not already there."""
        self._check_specials(add_bos, add_eos)
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Like :meth:`encode` for many texts, encoded in parallel by the Rust batch encoder."""
        self._check_specials(add_bos, add_eos)
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not a single string")
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(encoding.ids, add_bos, add_eos) for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _check_specials(self, add_bos: bool, add_eos: bool) -> None:
        if add_bos and self.bos_id is None:
            raise ConfigError("add_bos=True, but this tokenizer has no BOS token")
        if add_eos and self.eos_id is None:
            raise ConfigError("add_eos=True, but this tokenizer has no EOS token")

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        # Checked on the text's own ids, before adding anything: with GPT-2 style BOS == EOS, an empty text asked for
        # both must still get both.
        prefix = [self.bos_id] if add_bos and not (ids and ids[0] == self.bos_id) else []
        suffix = [self.eos_id] if add_eos and not (ids and ids[-1] == self.eos_id) else []
        return prefix + ids + suffix if prefix or suffix else ids

    # ------------------------------------------------------------ chat template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render ``messages`` exactly as ``transformers``' ``apply_chat_template`` does.

        With ``tokenize=True`` the rendered string is encoded without adding BOS: a template that wants BOS renders
        it as text, and adding one here would double it.
        """
        if self._chat_template is None:
            raise ForgelineError(
                "this tokenizer has no chat template; set one in tokenizer_config.json ('chat_template') "
                "or train with train_bpe(chat_template=...)"
            )
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            kind = type(messages).__name__
            raise DataError(f"messages must be a list of dicts with 'role' and 'content', got {kind}")
        plain = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise DataError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
            plain.append(dict(message))

        import jinja2

        try:
            template = compile_chat_template(self._chat_template)
            rendered = template.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                       **self.template_variables())
        except jinja2.TemplateError as e:
            raise ForgelineError(f"chat template failed: {e}") from None
        return self.encode(rendered) if tokenize else rendered

    # ------------------------------------------------------------------- saving

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that transformers' AutoTokenizer understands.

        A new directory is built beside the target and renamed into place. Saving into an existing directory (e.g.
        a model checkpoint) replaces the two files one by one, each atomically, and removes stale tokenizer side
        files (special_tokens_map.json, chat_template.jinja, ...) that transformers would read over our config.
        """
        directory = Path(directory)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._bos_token,
            "eos_token": self._eos_token,
            "pad_token": self._pad_token,
            "clean_up_tokenization_spaces": False,
        }
        if self._unk_token is not None:
            config["unk_token"] = self._unk_token
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        files = {
            TOKENIZER_FILE: self._tok.to_str(pretty=True),
            CONFIG_FILE: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        }

        try:
            if directory.exists():
                if not directory.is_dir():
                    raise DataError("cannot save a tokenizer here: it is a file, not a directory", directory)
                for name in _STALE_FILES:
                    (directory / name).unlink(missing_ok=True)
                for name, text in files.items():
                    atomic_write_text(directory / name, text)
            else:
                with atomic_directory(directory) as tmp:
                    for name, text in files.items():
                        (tmp / name).write_text(text, encoding="utf-8")
        except OSError as e:
            raise DataError(f"cannot save tokenizer: {e.strerror or e}", directory) from None
        return directory


# ---------------------------------------------------------------------- training


def train_bpe(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    vocab_size: int,
    output_dir: str | os.PathLike,
    text_field: str = "text",
    text_separator: str = "\n\n",
    min_frequency: int = 2,
    special_tokens: Sequence[str] | None = None,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int = 2048,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE, save it to ``output_dir`` and return it.

    ``files`` are read exactly as ``forgeline data prepare`` reads them (:func:`forgeline.data.sources.
    iter_documents`): plain text split into documents on ``text_separator``, JSONL, JSON arrays and Parquet with the
    text under ``text_field``; directories and glob patterns expand to their files. The same reader on both sides
    means the tokenizer is trained on exactly the documents it will later encode. Input is streamed (a ``.json``
    file is read whole).

    Byte-level with the full 256-byte initial alphabet means every string is encodable and decodes back exactly, so
    no UNK token is needed.

    ``special_tokens`` get the first ids in order; the first is used as both BOS and EOS (as in GPT-2) and the
    second, if any, as PAD. The default is ``<|endoftext|>`` and ``<|pad|>``. With the default ChatML template its
    ``<|im_start|>`` and ``<|im_end|>`` markers are added as special tokens too; a custom template's markers must be
    listed in ``special_tokens`` by the caller.
    """
    from forgeline.data.sources import iter_documents, resolve_inputs

    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not items:
        raise ConfigError("train_bpe needs at least one training file")
    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if chat_template == DEFAULT_CHAT_TEMPLATE:
        specials += [t for t in _CHATML_TOKENS if t not in specials]
    _validate_training_args(specials, vocab_size, min_frequency, model_max_length, text_field, chat_template)
    paths = resolve_inputs(items)  # a missing input fails here, before the trainer starts

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    documents = iter_documents(paths, text_field=text_field, text_separator=text_separator)

    # Nothing is written before training succeeds, so a bad line anywhere leaves no output behind.
    backend.train_from_iterator(_batched(documents, _RECORDS_PER_BATCH), trainer=trainer)
    if backend.get_vocab_size() < vocab_size:
        logger.warning(
            "the corpus only supports %d tokens (asked for vocab_size=%d at min_frequency=%d); "
            "the tokenizer is smaller than requested",
            backend.get_vocab_size(),
            vocab_size,
            min_frequency,
        )

    tokenizer = Tokenizer(
        backend,
        bos_token=specials[0] if specials else None,
        eos_token=specials[0] if specials else None,
        pad_token=specials[1] if len(specials) > 1 else None,
        chat_template=chat_template,
        model_max_length=model_max_length,
    )
    tokenizer.save(output_dir)
    return Tokenizer.load(output_dir)


def _validate_training_args(
    specials: list[str],
    vocab_size: Any,
    min_frequency: Any,
    model_max_length: Any,
    text_field: Any,
    chat_template: Any,
) -> None:
    for token in specials:
        if not isinstance(token, str) or not token:
            raise ConfigError(f"special_tokens must be non-empty strings, got {token!r}")
    if len(set(specials)) != len(specials):
        raise ConfigError(f"special_tokens has duplicates: {specials}")
    smallest = 256 + len(specials)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ConfigError(
            f"vocab_size must be an integer >= {smallest} (256 byte tokens + {len(specials)} special tokens), "
            f"got {vocab_size!r}"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise ConfigError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length <= 0:
        raise ConfigError(f"model_max_length must be a positive integer, got {model_max_length!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"text_field must be a non-empty string, got {text_field!r}")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ConfigError(f"chat_template must be a string or None, got {type(chat_template).__name__}")


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------- helpers


def _load_backend(file: Path) -> tokenizers.Tokenizer:
    text = _read_text(file)
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a plain Exception for every malformed file
        raise DataError(f"not a valid Hugging Face tokenizer.json: {e}", file) from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 at byte {e.start}", path) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path) from None


def _read_json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", path, e.lineno) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", path)
    return data


def _token_content(value: Any, key: str, where: Path) -> str | None:
    """transformers stores a special token as a string or as a serialized AddedToken dict with its ``content``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise DataError(f"{key} must be a string or an object with 'content', got {value!r}", where)


def _load_chat_template(directory: Path, config: dict[str, Any] | None) -> str | None:
    """Newer transformers saves the template to chat_template.jinja, which then wins over the config's copy."""
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return _read_text(jinja_file)
    if config is None or config.get("chat_template") is None:
        return None
    template = config["chat_template"]
    if isinstance(template, str):
        return template
    # Several named templates: transformers uses "default" unless told otherwise; we take it, else the first.
    if isinstance(template, list) and template and all(
        isinstance(t, dict) and isinstance(t.get("template"), str) for t in template
    ):
        named = {t.get("name"): t["template"] for t in template}
        return named.get("default", template[0]["template"])
    raise DataError("chat_template must be a string or a list of {'name', 'template'} objects", directory / CONFIG_FILE)


def _model_max_length(config: dict[str, Any] | None, where: Path) -> int | None:
    # transformers writes int(1e30) for "no limit"; treat anything absurd the same way.
    value = None if config is None else config.get("model_max_length")
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"model_max_length must be a positive integer, got {value!r}", where)
    return value if value < 10**12 else None


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str, on_generation=None):
    """Build the template the way transformers does, so that Hub templates render byte-identically.

    The environment is sandboxed because chat templates ship inside downloaded tokenizers and are untrusted code.
    `on_generation(text)` is called with the output of every `{% generation %}` block as it renders (assistant
    masks are built from where those blocks land); rendering alone ignores the tag.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        # Templates mark assistant turns with {% generation %}...{% endgeneration %} for transformers' assistant
        # masks; rendering just emits the body, but the tag must parse.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            text = caller()
            if on_generation is not None:
                on_generation(text)
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the rendered prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
