"""Batched KV-cache generation: padding invariance, log-probs, sampling controls, stops, streaming."""

from __future__ import annotations

import pytest
import torch

from forgeline.errors import ConfigError, ForgelineError
from forgeline.model import ModelConfig, build_model
from forgeline.model.inference.generate import GenerationConfig, generate, iter_generate, process_logits, sample



def make_tokenizer():
    """A small byte-level BPE with ChatML specials, built in memory (a few ms)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from forgeline.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "a b c d e f g"] * 20
    backend.train_from_iterator(text, trainer=trainer)
    return Tokenizer(backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     chat_template=DEFAULT_CHAT_TEMPLATE, model_max_length=256)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                      init_std=0.2)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]


def full_forward_logprobs(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).float(), -1)[0, len(prompt) - 1:-1]
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_batched_left_padded_greedy_equals_unbatched(model):
    batched = generate(model, PROMPTS, max_new_tokens=12)
    for prompt, completion in zip(PROMPTS, batched):
        alone = generate(model, [prompt], max_new_tokens=12)[0]
        assert completion.tokens == alone.tokens
        assert completion.finish_reason == "length" and completion.prompt_tokens == len(prompt)
        # Per-token log-probs equal a full forward pass's log-softmax at the chosen tokens.
        ref = full_forward_logprobs(model, prompt, completion.tokens)
        assert torch.allclose(torch.tensor(completion.logprobs), ref, atol=1e-5)


@pytest.mark.parametrize("suffixes", [[[30, 31, 32], [40], [50, 51, 52, 53, 54]], [[30, 31], [40, 41]]],
                         ids=["padded", "same-length"])
def test_prompts_with_a_shared_prefix_compute_it_once_and_generate_as_alone(model, suffixes, monkeypatch):
    from forgeline.model.inference import generate as generate_module

    shared = [int(t) for t in torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(1))]
    prompts = [shared + s for s in suffixes]
    assert generate_module.shared_prefix_length(prompts) == 20
    calls = []
    real = generate_module.fill_shared_prefix
    monkeypatch.setattr(generate_module, "fill_shared_prefix", lambda *a: calls.append(a[2].shape) or real(*a))
    batched = generate(model, prompts, max_new_tokens=10)
    assert calls == [torch.Size([1, 20])]
    for prompt, completion in zip(prompts, batched):
        alone = generate(model, [prompt], max_new_tokens=10)[0]
        assert completion.tokens == alone.tokens
        ref = full_forward_logprobs(model, prompt, completion.tokens)
        assert torch.allclose(torch.tensor(completion.logprobs), ref, atol=1e-5)


def test_shared_prefix_length_leaves_every_row_a_token_and_skips_short_ones():
    from forgeline.model.inference.generate import shared_prefix_length

    assert shared_prefix_length([list(range(30)), list(range(30))]) == 29
    assert shared_prefix_length([list(range(30)), list(range(10)) + [99] * 20]) == 0  # 10 < the minimum
    assert shared_prefix_length([list(range(30)), list(range(10)) + [99] * 20], minimum=4) == 10
    assert shared_prefix_length([list(range(30))]) == 0


def test_sampling_is_seeded_and_logprobs_are_the_raw_distribution(model):
    cfg = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=50, top_p=0.9,
                           repetition_penalty=1.2, seed=123)
    a = generate(model, PROMPTS, cfg)
    b = generate(model, PROMPTS, cfg)
    c = generate(model, PROMPTS, cfg, seed=124)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]
    for prompt, completion in zip(PROMPTS, a):
        ref = full_forward_logprobs(model, prompt, completion.tokens)
        assert torch.allclose(torch.tensor(completion.logprobs), ref, atol=1e-5)


def test_logits_processing_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[0, [1, 5, 7]] = True
    seen[2, [0, 49]] = True
    ids = [[1, 5, 7], [], [0, 49]]
    cfg = GenerationConfig(do_sample=True, temperature=0.8, top_k=20, top_p=0.7, repetition_penalty=1.3)
    ours = process_logits(logits.clone(), cfg, seen)
    ref = logits.clone()
    for i, row in enumerate(ids):  # transformers' penalty takes input_ids; apply it row by row
        if row:
            proc = transformers.RepetitionPenaltyLogitsProcessor(1.3)
            ref[i:i + 1] = proc(torch.tensor([row]), ref[i:i + 1].clone())
    for warper in (transformers.TemperatureLogitsWarper(0.8), transformers.TopKLogitsWarper(20),
                   transformers.TopPLogitsWarper(0.7)):
        ref = warper(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-5)


def test_stop_tokens_stop_strings_and_max_new_tokens(model, tok):
    free = generate(model, PROMPTS, max_new_tokens=8, stop_token_ids=[])
    stop_tok = free[0].tokens[3]
    out = generate(model, PROMPTS, max_new_tokens=8, stop_token_ids=[stop_tok])
    first = free[0].tokens.index(stop_tok)
    assert out[0].tokens == free[0].tokens[: first + 1] and out[0].finish_reason == "stop"
    assert out[0].stop == stop_tok
    for o, f in zip(out[1:], free[1:]):  # the other rows continue after row 0 leaves the batch
        cut = f.tokens.index(stop_tok) + 1 if stop_tok in f.tokens else len(f.tokens)
        assert o.tokens == f.tokens[:cut]

    # Stop strings: the text is cut just before the string; the tokens end with the one that completed it.
    text = generate(model, ["hello world"], tokenizer=tok, max_new_tokens=20, stop_token_ids=[])[0]
    assert len(text.text) > 4
    stop = text.text[2:4]
    cut = generate(model, ["hello world"], tokenizer=tok, max_new_tokens=20, stop_token_ids=[],
                   stop_strings=[stop])[0]
    assert cut.finish_reason == "stop" and cut.stop == stop
    assert cut.text == text.text[: text.text.index(stop)]
    assert tok.decode(cut.tokens).startswith(cut.text + stop)
    assert len(generate(model, PROMPTS, max_new_tokens=3)[1].tokens) == 3


def test_streaming_text_adds_up_to_the_final_text(model, tok):
    pieces: dict[int, list[str]] = {0: [], 1: []}
    prompts = ["hello world", "the quick brown fox"]
    results = generate(model, prompts, tokenizer=tok, max_new_tokens=15, stop_token_ids=[],
                       on_text=lambda row, t: pieces[row].append(t))
    for row, r in enumerate(results):
        assert "".join(pieces[row]) == r.text == tok.decode(r.tokens)
    events = list(iter_generate(model, ["hello"], tokenizer=tok, max_new_tokens=4, stop_token_ids=[]))
    assert len(events) == 4 and events[-1].completion is not None and events[0].completion is None


def test_sample_keeps_its_old_contract(model):
    out = sample(model, [1, 2, 3], max_new_tokens=5, temperature=0)
    assert out == generate(model, [[1, 2, 3]], max_new_tokens=5)[0].tokens
    seeded = sample(model, [1, 2, 3], max_new_tokens=5, temperature=0.8, top_k=10, seed=0)
    assert seeded == sample(model, [1, 2, 3], max_new_tokens=5, temperature=0.8, top_k=10, seed=0)
    assert len(sample(model, list(range(1, 80)), max_new_tokens=5)) == 1  # context of 64: cropped, one token fits


def test_context_limit_and_bad_settings(model):
    assert len(generate(model, [list(range(1, 60))], max_new_tokens=50)[0].tokens) == 5
    with pytest.raises(ForgelineError, match="context"):
        generate(model, [list(range(1, 65))], max_new_tokens=5)
    with pytest.raises(ForgelineError, match="vocabulary"):
        generate(model, [[1, 999]], max_new_tokens=5)
    with pytest.raises(ConfigError):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ConfigError):
        generate(model, ["text"], max_new_tokens=2)  # text without a tokenizer
