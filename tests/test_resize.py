"""Growing a model's vocabulary for added tokens (forgeline.model.resize)."""

import os

import pytest
import torch

from forgeline.errors import ConfigError
from forgeline.model import ModelConfig, build_model
from forgeline.model.resize import resize_token_embeddings

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny(tie: bool):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32,
                      tie_embeddings=tie)
    return build_model(cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_new_rows_are_the_mean_and_old_tokens_are_unchanged(tie):
    model = _tiny(tie)
    old_embed = model.tok_embeddings.weight.detach().clone()
    old_head = model.output.weight.detach().clone()
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(tokens)
    assert resize_token_embeddings(model, 100) is model
    assert model.cfg.vocab_size == 100
    assert model.tok_embeddings.weight.shape == (100, 32) and model.output.weight.shape == (100, 32)
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    torch.testing.assert_close(model.tok_embeddings.weight[:97], old_embed, rtol=0, atol=0)
    torch.testing.assert_close(model.output.weight[:97], old_head, rtol=0, atol=0)
    for row in range(97, 100):
        torch.testing.assert_close(model.tok_embeddings.weight[row], old_embed.mean(0))
        torch.testing.assert_close(model.output.weight[row], old_head.mean(0))
    with torch.no_grad():
        after = model(tokens)
    assert after.shape == (2, 9, 100)
    torch.testing.assert_close(after[..., :97], before, rtol=0, atol=0)
    # a new token's logit is the mean logit: the model's predictions barely move
    torch.testing.assert_close(after[..., 97], before.mean(-1), rtol=1e-4, atol=1e-5)
    # the new ids are usable and learn
    loss = model(torch.tensor([[98, 99, 5]])).logsumexp(-1).sum()
    loss.backward()
    assert model.tok_embeddings.weight.grad[98:].abs().sum() > 0


def test_same_size_is_a_no_op_and_shrinking_is_refused():
    model = _tiny(False)
    embed = model.tok_embeddings
    resize_token_embeddings(model, 97)
    assert model.tok_embeddings is embed
    with pytest.raises(ConfigError, match="cannot shrink the vocabulary from 97 to 90"):
        resize_token_embeddings(model, 90)
    with pytest.raises(ConfigError, match="new_vocab_size must be a positive integer"):
        resize_token_embeddings(model, 0)


def test_added_chat_tokens_fit_the_resized_model(tmp_path):
    # The flow the SFT recipe follows: add a template's markers to the tokenizer, then grow the model to match.
    from forgeline.data import load_chat_template
    from forgeline.tokenizer import train_bpe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, the answer is five\n" * 50)
    tokenizer = train_bpe([corpus], vocab_size=300, output_dir=tmp_path / "tok", show_progress=False,
                          chat_template=None, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4, ffn_dim=64,
                                    max_seq_len=64))
    chat = load_chat_template(tokenizer, "chatml", add_special_tokens=True)
    assert chat.added_tokens == ("<|im_start|>", "<|im_end|>")
    resize_token_embeddings(model, tokenizer.vocab_size)
    sample = chat.encode([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])
    assert int(sample.input_ids.max()) == chat.end_of_turn_id == tokenizer.vocab_size - 1
    with torch.no_grad():
        assert model(torch.from_numpy(sample.input_ids)[None]).shape[-1] == tokenizer.vocab_size
