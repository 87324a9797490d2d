"""Hugging Face import/export: parity with transformers on tiny random models of each family, lossless round
trips, sharding, slice selection, the CLI, and clear errors for bad input."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from forgeline.cli import main
from forgeline.errors import CheckpointError, ForgelineError
from forgeline.model.formats import load_model
from forgeline.model.formats.hf import export_hf, import_hf, load_hf, read_hf_state
from forgeline.model.inference.generate import generate

transformers = pytest.importorskip("transformers")

VOCAB = 320
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer():
    """A small byte-level BPE with ChatML specials, built in memory (a few ms)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from forgeline.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "a b c d e f g"] * 20
    backend.train_from_iterator(text, trainer=trainer)
    return Tokenizer(backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     chat_template=CHATML, model_max_length=256)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama-rope-scaling": ("LlamaConfig", {"rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0}),
    "qwen2-bias-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {}),
}


def make_hf_model(family: str, directory: Path, tokenizer=None, *, seed: int = 0):
    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # perturb everything, norms and biases included, so that no weight is trivially 1 or 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def hf_load_quietly(directory: Path, caplog):
    """AutoModelForCausalLM.from_pretrained + its loading info; fails on any warning transformers logs."""
    transformers.logging.enable_propagation()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    transformers.logging.disable_propagation()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_and_lossless_round_trip(family, tmp_path, tok, caplog):
    src = tmp_path / "hf"
    hf_model = make_hf_model(family, src, tok)
    loaded = load_hf(src)
    model = loaded.model
    assert loaded.architecture == hf_model.config.architectures[0]
    assert loaded.tokenizer.chat_template == CHATML

    # Logits agree with transformers (fp32, max abs).
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ref = hf_model(x).logits
        ours = model(x)
    assert (ref - ours).abs().max().item() < 1e-4

    # Greedy generation: identical tokens, batched and left-padded on our side, one prompt at a time on theirs.
    prompts = [[5, 17, 33, 2, 99, 41], [7, 8], [250, 12, 64, 3]]
    ours_gen = generate(model, prompts, max_new_tokens=10, stop_token_ids=[])
    for p, c in zip(prompts, ours_gen):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
        assert out[0, len(p):].tolist() == c.tokens

    # Export: transformers loads it with no warnings, same logits; the tokenizer and chat template survive.
    out_dir = tmp_path / "exported"
    export_hf(loaded, out_dir)
    reloaded_hf = hf_load_quietly(out_dir, caplog)
    assert type(reloaded_hf).__name__ == hf_model.config.architectures[0]
    with torch.no_grad():
        assert (reloaded_hf(x).logits - ours).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    text = "hello world, the quick fox"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    messages = [{"role": "user", "content": "hello"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, add_generation_prompt=True)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] == hf_model.config.tie_word_embeddings

    # import -> export -> import is lossless: bitwise equal tensors.
    again = load_hf(out_dir).model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again[name]), name


def test_sharded_export_and_import(tmp_path, tok, caplog):
    src = tmp_path / "hf"
    make_hf_model("llama", src, tok)
    loaded = load_hf(src)
    out = export_hf(loaded, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    hf_load_quietly(out, caplog)
    again = load_hf(out, dtype="bfloat16").model
    assert next(again.parameters()).dtype == torch.bfloat16
    assert again.inv_freq.dtype == torch.float32
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor.to(torch.bfloat16), again.state_dict()[name]), name


def test_slice_selector_reads_only_this_ranks_rows(tmp_path):
    src = tmp_path / "hf"
    make_hf_model("llama", src)
    full = dict(read_hf_state(src))
    rank, world = 1, 2

    def select(name, shape):  # column-parallel q/k/v/gate/up: each rank owns a contiguous block of output rows
        if any(k in name for k in ("wq", "wk", "wv", "w1", "w3")):
            n = shape[0] // world
            return (slice(rank * n, (rank + 1) * n),)
        return None

    part = dict(read_hf_state(src, select=select))
    assert part.keys() == full.keys()
    assert part["layers.0.attention.wq.weight"].shape == (32, 64)
    assert torch.equal(part["layers.1.feed_forward.w1.weight"], full["layers.1.feed_forward.w1.weight"][48:])
    assert torch.equal(part["norm.weight"], full["norm.weight"])


def test_cli_import_export_and_checkpoint_sources(tmp_path, tok, caplog, capsys):
    src = tmp_path / "hf"
    make_hf_model("qwen2-bias-tied", src, tok)
    fl_dir = tmp_path / "fl"
    assert main(["import", "hf", str(src), str(fl_dir)]) == 0
    assert (fl_dir / "forgeline_config.json").is_file() and (fl_dir / "hf_config.json").is_file()
    out = tmp_path / "back"
    assert main(["export", "hf", str(fl_dir), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    hf_load_quietly(out, caplog)

    # A training checkpoint (run_dir/checkpoints/step_N: model.safetensors + config.yaml), tokenizer from the run.
    from safetensors.torch import save_file

    from forgeline.files import write_manifest
    from forgeline.model.formats.model_dir import model_state_dict

    model = load_model(fl_dir).model
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    save_file(model_state_dict(model), str(ckpt / "model.safetensors"))
    tok.save(tmp_path / "tokdir")
    model_yaml = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in model.cfg.model_dump(mode="json").items())
    (ckpt / "config.yaml").write_text(f"tokenizer: {tmp_path / 'tokdir'}\nmodel:\n{model_yaml}\n")
    (ckpt / "trainer_state.json").write_text("{}")
    write_manifest(ckpt)  # a save's last step: without it the checkpoint counts as damaged
    for source in (ckpt, run):
        out = tmp_path / f"from-{source.name}"
        assert main(["export", "hf", str(source), str(out), "--dtype", "bfloat16"]) == 0
        hf = hf_load_quietly(out, caplog)
        assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def _assert_clean_failure(argv, capsys, *, must_mention: str, not_created: Path | None = None):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("forgeline: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert must_mention in err, err
    if not_created is not None:
        assert not not_created.exists()
        assert not [p for p in not_created.parent.iterdir() if p.name.startswith(f".{not_created.name}")]


def test_bad_inputs_give_one_clear_error(tmp_path, tok, capsys):
    out = tmp_path / "out"
    # Not a checkpoint.
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(["import", "hf", str(tmp_path / "empty"), str(out)], capsys,
                          must_mention="config.json is missing", not_created=out)
    _assert_clean_failure(["generate", str(tmp_path / "empty"), "--prompt", "hi"], capsys,
                          must_mention="is not a checkpoint")
    # Unsupported architecture: says which are supported.
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _assert_clean_failure(["import", "hf", str(gpt2), str(out)], capsys,
                          must_mention="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM", not_created=out)
    # Shapes that do not match the config.
    src = tmp_path / "hf"
    make_hf_model("llama", src, tok)
    cfg = json.loads((src / "config.json").read_text())
    bad = tmp_path / "bad-shape"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    _assert_clean_failure(["import", "hf", str(bad), str(out)], capsys, must_mention="shape", not_created=out)
    # A truncated safetensors file.
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in src.iterdir():
        (trunc / f.name).write_bytes(f.read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    _assert_clean_failure(["import", "hf", str(trunc), str(out)], capsys, must_mention="model.safetensors",
                          not_created=out)
    # Unsupported rope scaling and an existing output directory.
    yarn = tmp_path / "yarn"
    yarn.mkdir()
    (yarn / "config.json").write_text(json.dumps(dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(CheckpointError, match="yarn"):
        load_hf(yarn)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ForgelineError, match="not empty"):
        import_hf(src, out)
    assert os.listdir(out) == ["keep.txt"]


def test_streaming_safetensors_writer_matches_the_library(tmp_path):
    from safetensors.torch import load_file

    from forgeline.model.formats.common import save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, 6).to(torch.bfloat16).t(), "c": torch.zeros(0),
               "d": torch.arange(7, dtype=torch.int64), "e": torch.randn(2, 2).half()}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
