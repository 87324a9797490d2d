"""Adapters after training: generate / chat decode an adapted model as the merged model does (merged for the native
kernels, or the PyTorch forward for bottleneck adapters, said in one line); `forgeline merge` writes the merged whole
model; `export hf` writes it in Hugging Face format, `--adapter-only` the adapter in PEFT's format that PEFT puts on
the exported base; `import peft` takes a PEFT adapter onto a local base; peft checkpoints (full and sharded) and
runs read as adapter directories do; mistakes are one clear error with exit status 2."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from forgeline.cli import main
from forgeline.config import PeftConfig
from forgeline.model import ModelConfig, build_model
from forgeline.model.formats import load_model
from forgeline.model.formats.model_dir import save_model_dir, trainable_state_dict
from forgeline.model.inference.generate import generate
from forgeline.peft.apply import BaseReference, apply_peft, save_adapter
from forgeline.recipes.adapted import decoding_model, load_trained_model

from test_generate import make_tokenizer

CFG = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                  init_std=0.2)
LORA = PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
DORA = PeftConfig(method="dora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "w2"],
                  use_rslora=True)
QLORA = PeftConfig(method="qlora", r=4, alpha=8, dropout=0.0, target_modules=["attention"])
BOTTLENECK = PeftConfig(method="adapter", adapter_size=8, dropout=0.0)
IDS = torch.randint(0, 290, (2, 12), generator=torch.Generator().manual_seed(7))
MERGED_LINE = "adapter merged into the weights for decoding"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("adapter-cli") / "base"
    save_model_dir(build_model(CFG).eval(), tok, path)
    return path


def adapted_model(base, cfg: PeftConfig, seed: int = 1):
    """The base with `cfg`'s adapters applied, their zero-initialised halves randomised, in eval mode."""
    model = load_model(base).model
    report = apply_peft(model, cfg, precision="fp32")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith("lora_B") or ".up." in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.requires_grad and name.endswith("lora_magnitude"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval(), report


def write_adapter(base, out, cfg: PeftConfig, tok, seed: int = 1):
    model, report = adapted_model(base, cfg, seed)
    ref = BaseReference(path=str(base), sha256=report.base_sha256, method=cfg.method,
                        peft=cfg.model_dump(mode="json"))
    save_adapter(model, cfg, out, base=ref, tokenizer=tok)
    return model


@pytest.fixture(scope="module")
def lora_dir(base, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    return write_adapter(base, out, LORA, tok), out


@pytest.fixture(scope="module")
def bottleneck_dir(base, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("bottleneck") / "adapter"
    return write_adapter(base, out, BOTTLENECK, tok), out


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def assert_clean_failure(argv, capsys, *words):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("forgeline: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forwards, no KV cache, no kernels: the plain PyTorch path."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------


def test_generation_with_an_unmerged_lora_adapter_equals_the_merged_model(lora_dir, tmp_path, capsys):
    from forgeline.model.decode import NativeDecoder

    model, directory = lora_dir
    lines = []
    merged = decoding_model(model, report=lines.append)
    assert len(lines) == 1 and MERGED_LINE in lines[0]
    assert merged is not model and any(type(m).__name__ == "LoraLinear" for m in model.modules())  # a copy
    assert NativeDecoder.for_model(model) is None  # the kernels never run the wrappers
    from forgeline import kernels

    if kernels.available():
        assert NativeDecoder.for_model(merged) is not None  # ... and do run the merged model
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20]]
    unmerged = generate(model, prompts, max_new_tokens=16)
    assert [c.tokens for c in generate(merged, prompts, max_new_tokens=16)] == [c.tokens for c in unmerged]
    assert unmerged[0].tokens == greedy_reference(model, prompts[0], 16)

    # the command line: the adapter directory and its merged model directory give the same text
    assert main(["generate", str(directory), "--prompt", "hello there", "--max-new-tokens", "12"]) == 0
    adapted = capsys.readouterr()
    assert MERGED_LINE in adapted.err and adapted.err.count("\n") == 2  # the note, then the speed line
    assert main(["merge", str(directory), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "merged"), "--prompt", "hello there", "--max-new-tokens", "12"]) == 0
    plain = capsys.readouterr()
    assert plain.out == adapted.out and MERGED_LINE not in plain.err
    assert main(["generate", str(directory), "--prompt", "hello there", "--max-new-tokens", "12", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_generation_with_bottleneck_adapters_runs_the_pytorch_forward(bottleneck_dir, capsys):
    from forgeline.model.decode import NativeDecoder

    model, directory = bottleneck_dir
    lines = []
    assert decoding_model(model, report=lines.append) is model  # nothing to merge: the model as it is
    assert len(lines) == 1 and "cannot be merged" in lines[0] and "PyTorch forward" in lines[0]
    assert NativeDecoder.for_model(model) is None
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    completions = generate(model, prompts, max_new_tokens=16)
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == greedy_reference(model, prompt, 16)
    # the adapters change the tokens: a decoder that skipped them would be caught above
    base_tokens = generate(load_model(json.loads((directory / "forgeline_base.json").read_text())["path"]).model,
                           prompts, max_new_tokens=16)
    assert [c.tokens for c in base_tokens] != [c.tokens for c in completions]
    assert main(["generate", str(directory), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert "cannot be merged" in capsys.readouterr().err


def test_chat_reads_an_adapter_directory(lora_dir):
    import io

    from forgeline.chat import main_chat
    from forgeline.cli import parse_args
    from forgeline.cli.commands.generate import load

    args = parse_args(["chat", str(lora_dir[1]), "--max-new-tokens", "3"])
    stdout, stderr = io.StringIO(), io.StringIO()
    assert main_chat(args, stdin=io.StringIO("hello\n/exit\n"), stdout=stdout, stderr=stderr, load=load) == 0
    assert stdout.getvalue().startswith("forgeline chat:")


# ---------------------------------------------------------------------------------------------------------------
# merge and export
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [LORA, DORA], ids=["lora", "dora"])
def test_merge_writes_a_model_dir_with_the_adapted_logits(base, tok, cfg, tmp_path, capsys):
    model = write_adapter(base, tmp_path / "adapter", cfg, tok)
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert f"{cfg.method} adapter merged into {base}" in capsys.readouterr().out
    merged = load_model(tmp_path / "merged")
    torch.testing.assert_close(logits(merged.model), logits(model), atol=1e-5, rtol=0)
    assert merged.tokenizer.chat_template == tok.chat_template
    # the chat template's end of turn stops generation, as in an SFT run's model
    eos = merged.generation_config["eos_token_id"]
    assert tok.token_to_id("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    # an existing output is kept unless --overwrite
    assert_clean_failure(["merge", tmp_path / "adapter", "--out", tmp_path / "merged"], capsys, "--overwrite")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--overwrite"]) == 0


def test_export_hf_of_an_adapter_merged_and_adapter_only_load_in_transformers_and_peft(lora_dir, base, tmp_path,
                                                                                      capsys):
    pytest.importorskip("peft", reason="the PEFT comparison needs the peft package (a test extra)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, directory = lora_dir
    expected = logits(model)
    assert main(["export", "hf", str(base), str(tmp_path / "base-hf")]) == 0
    assert main(["export", "hf", str(directory), str(tmp_path / "merged-hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-hf", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf).logits, expected, atol=1e-4, rtol=0)

    assert main(["export", "hf", str(directory), str(tmp_path / "peft"), "--adapter-only"]) == 0
    assert "PEFT's format" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base)
    hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model).logits, expected, atol=1e-4, rtol=0)


def save_peft_adapter(hf_dir, out, **lora_config):
    """An adapter made and saved by PEFT itself on the Hugging Face base, its B randomised."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(**lora_config))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(out)
    return peft_model.eval()


def test_import_peft_then_generate_and_merge_without_base(base, tmp_path, capsys):
    pytest.importorskip("peft", reason="the PEFT comparison needs the peft package (a test extra)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assert main(["export", "hf", str(base), str(tmp_path / "base-hf")]) == 0
    peft_model = save_peft_adapter(tmp_path / "base-hf", tmp_path / "peft", r=4, lora_alpha=8,
                                   target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    expected = logits(peft_model).logits
    capsys.readouterr()
    assert main(["import", "peft", str(tmp_path / "peft"), "--base", str(base), "--out",
                 str(tmp_path / "imported")]) == 0
    assert "dora adapter" in capsys.readouterr().out
    reference = json.loads((tmp_path / "imported" / "forgeline_base.json").read_text())
    assert reference["path"] == str(base.resolve()) and reference["method"] == "dora"
    assert (tmp_path / "imported" / "tokenizer" / "tokenizer.json").is_file()

    model, tokenizer, info = load_trained_model(tmp_path / "imported")  # no --base: the recorded one
    assert info.method == "dora" and tokenizer is not None
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=0)
    assert main(["generate", str(tmp_path / "imported"), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert MERGED_LINE in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "imported"), "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(logits(load_model(tmp_path / "merged").model), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and runs of peft training
# ---------------------------------------------------------------------------------------------------------------


def write_peft_checkpoint(run, model, base, cfg: PeftConfig, sha256: str, *, sharded: bool):
    """A checkpoint as a peft run writes it: the trainable weights only (model.safetensors, or dcp/ as FSDP2 writes
    them), trainer_state.json naming the base, config.yaml with init: and peft:."""
    from safetensors.torch import save_file

    from forgeline.files import write_manifest

    ckpt = run / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    state = trainable_state_dict(model)
    if sharded:
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": state}, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    else:
        save_file(state, str(ckpt / "model.safetensors"))
    trainer_state = {"step": 2, "base": {"path": str(base), "sha256": sha256, "method": cfg.method}}
    if not sharded:
        trainer_state["weights"] = "trainable"
    (ckpt / "trainer_state.json").write_text(json.dumps(trainer_state))
    config = {"run_dir": str(run), "init": str(base), "model": model.cfg.model_dump(mode="json"),
              "peft": cfg.model_dump(mode="json")}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    write_manifest(ckpt)
    return ckpt


@pytest.mark.parametrize("cfg, sharded", [(DORA, False), (DORA, True), (QLORA, False)],
                         ids=["dora-full", "dora-dcp", "qlora-full"])
def test_a_peft_checkpoint_and_its_run_read_as_adapters(base, tmp_path, capsys, cfg, sharded):
    model, report = adapted_model(base, cfg)
    run = tmp_path / "run"
    ckpt = write_peft_checkpoint(run, model, base, cfg, report.base_sha256, sharded=sharded)
    for source in (ckpt, run):
        adapted, _, info = load_trained_model(source)
        assert info.method == cfg.method and info.base.sha256 == report.base_sha256
        torch.testing.assert_close(logits(adapted), logits(model), atol=1e-6, rtol=0)
    # a plain reader says what the checkpoint is, and what reads it
    from forgeline.errors import CheckpointError

    with pytest.raises(CheckpointError, match="adapter weights only.*forgeline merge"):
        load_model(ckpt)
    assert_clean_failure(["export", "consolidate", ckpt, tmp_path / "c"], capsys, "adapter weights only")
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(logits(load_model(tmp_path / "merged").model), logits(model), atol=1e-5, rtol=0)
    assert main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert MERGED_LINE in capsys.readouterr().err
    # another base of the same shape: its hash differs, named in one line
    other = load_model(base)
    with torch.no_grad():
        other.model.tok_embeddings.weight.mul_(1.01)
    save_model_dir(other.model, other.tokenizer, tmp_path / "other")
    assert_clean_failure(["merge", ckpt, "--out", tmp_path / "m2", "--base", tmp_path / "other"], capsys,
                         "another base", report.base_sha256[:12])


def test_sft_with_peft_then_merge_end_to_end(base, tmp_path, capsys):
    records = [{"messages": [{"role": "user", "content": f"the fox {i}"},
                             {"role": "assistant", "content": "hello world"}]} for i in range(16)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    cfg = {"run_dir": str(run), "init": str(base),
           "data": {"train": [str(data)], "max_length": 32, "template": "model"},
           "train": {"epochs": None, "max_steps": 2, "micro_batch_size": 4, "global_batch_samples": 8,
                     "lr": 1e-2, "precision": "fp32"},
           "checkpoint": {"every": 2}, "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "monitor": {"val_every": 100, "progress": False, "tensorboard": False, "peak_flops": 1e11}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["sft", str(tmp_path / "sft.yaml")]) == 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    from_adapter, _, info = load_trained_model(run)  # the run's adapter/
    assert info.source == str(run / "adapter")
    from_checkpoint, _, _ = load_trained_model(sorted((run / "checkpoints").glob("step_*"))[-1])
    merged = load_model(tmp_path / "merged")
    expected = logits(from_adapter)
    assert not torch.allclose(expected, logits(load_model(base).model), atol=1e-4)  # it trained
    torch.testing.assert_close(logits(from_checkpoint), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(merged.model), expected, atol=1e-5, rtol=0)
    assert merged.tokenizer.chat_template


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_mistakes_are_one_clear_error(base, lora_dir, tmp_path, capsys, tok):
    directory = lora_dir[1]
    other = load_model(base)
    with torch.no_grad():
        other.model.output.weight.add_(0.01)
    save_model_dir(other.model, tok, tmp_path / "other")
    # an adapter on a --base other than its own: both hashes named
    err = assert_clean_failure(["generate", directory, "--base", tmp_path / "other", "--prompt", "hi"], capsys,
                               "another base", str(tmp_path / "other"))
    assert json.loads((directory / "forgeline_base.json").read_text())["sha256"][:12] in err
    assert_clean_failure(["export", "hf", directory, tmp_path / "x", "--base", tmp_path / "other"], capsys,
                         "another base")
    # --adapter-only, merge and --base on a whole model
    assert_clean_failure(["export", "hf", base, tmp_path / "x", "--adapter-only"], capsys, "holds no adapters",
                         "--adapter-only")
    assert_clean_failure(["merge", base, "--out", tmp_path / "x"], capsys, "holds no adapters")
    assert_clean_failure(["generate", base, "--base", base, "--prompt", "hi"], capsys, "--base", "whole model")
    assert_clean_failure(["merge", directory], capsys, "--out")
    # import peft of a directory that is no adapter, or without --base
    (tmp_path / "empty").mkdir()
    assert_clean_failure(["import", "peft", tmp_path / "empty", "--base", base, "--out", tmp_path / "x"], capsys,
                         "adapter_config.json")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["import", "peft", str(directory), "--out", str(tmp_path / "x")])
    assert "--base" in capsys.readouterr().err
    # a pickled adapter: the loader's refusal
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((directory / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    assert_clean_failure(["import", "peft", pickled, "--base", base, "--out", tmp_path / "x"], capsys,
                         "adapter_model.bin")
    # an option forgeline's LoRA does not model
    patterned = tmp_path / "patterned"
    patterned.mkdir()
    config = json.loads((directory / "adapter_config.json").read_text())
    (patterned / "adapter_config.json").write_text(json.dumps(dict(config, rank_pattern={"q_proj": 2})))
    (patterned / "adapter_model.safetensors").write_bytes((directory / "adapter_model.safetensors").read_bytes())
    assert_clean_failure(["import", "peft", patterned, "--base", base, "--out", tmp_path / "x"], capsys,
                         "rank_pattern")
    # load_model on an adapter directory points to what reads it
    from forgeline.errors import CheckpointError

    with pytest.raises(CheckpointError, match="adapter directory.*forgeline merge"):
        load_model(directory)
    assert not (tmp_path / "x").exists()


def test_bottleneck_adapters_are_not_merged_nor_exported_to_peft(bottleneck_dir, tmp_path, capsys):
    directory = bottleneck_dir[1]
    assert_clean_failure(["merge", directory, "--out", tmp_path / "m"], capsys, "cannot be merged")
    assert_clean_failure(["export", "hf", directory, tmp_path / "h"], capsys, "cannot be merged")
    assert_clean_failure(["export", "hf", directory, tmp_path / "p", "--adapter-only"], capsys, "bottleneck")
    assert_clean_failure(["import", "peft", directory, "--base", "x", "--out", tmp_path / "i"], capsys,
                         "bottleneck")
    assert not any((tmp_path / name).exists() for name in ("m", "h", "p", "i"))
