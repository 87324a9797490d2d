"""First-run UX of the command line: argument order, --resume modes, quiet pretrain output, help that lists each
command's config keys, sampling flags checked alike, speed on stderr, the --chat hint, tokenizer training from
JSON/Parquet, truncated GGUF files and `export consolidate --overwrite`."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from forgeline.cli import main, parse_args, torchrun_command
from forgeline.config import (DataPrepareConfig, PretrainConfig, TokenizerTrainConfig, describe_keys, load_config,
                              parse_overrides)
from forgeline.errors import ConfigError
from forgeline.model import ModelConfig, build_model
from forgeline.model.formats.model_dir import save_model_dir

from test_generate import make_tokenizer

# ---------------------------------------------------------------------------------------------------------------
# Parsing: any order, --resume modes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, items, resume", [
    (["pretrain", "run.yaml", "--resume", "train.lr=1e-3"], ["run.yaml", "train.lr=1e-3"], True),
    (["pretrain", "--resume", "run.yaml", "train.lr=1e-3"], ["run.yaml", "train.lr=1e-3"], True),
    (["pretrain", "train.lr=1e-3", "--resume=auto", "run.yaml"], ["train.lr=1e-3", "run.yaml"], "auto"),
    (["pretrain", "run.yaml", "--resume", "auto", "a.b=1"], ["run.yaml", "a.b=1"], "auto"),
    (["pretrain", "run.yaml", "a.b=1"], ["run.yaml", "a.b=1"], False),
    (["pretrain", "--nproc", "2", "a.b=1", "--print-config", "run.yaml"], ["a.b=1", "run.yaml"], False),
])
def test_pretrain_options_and_overrides_in_any_order(argv, items, resume):
    args = parse_args(argv)
    assert args.items == items and args.resume == resume and args.command_words == ["pretrain"]


def test_every_config_command_takes_options_anywhere():
    args = parse_args(["plan", "memory", "--world", "8", "model.preset=7b", "--json", "parallel.dp_shard=-1"])
    assert (args.world, args.json, args.items) == (8, True, ["model.preset=7b", "parallel.dp_shard=-1"])
    args = parse_args(["import", "gguf", "m.gguf", "--overwrite", "out", "--dtype", "bfloat16"])
    assert (args.format, args.source, args.out, args.overwrite, args.dtype) == ("gguf", "m.gguf", "out", True,
                                                                                 "bfloat16")
    args = parse_args(["generate", "--max-new-tokens", "3", "model", "--prompt", "hi", "--quiet"])
    assert (args.model, args.prompt, args.max_new_tokens, args.quiet) == ("model", ["hi"], 3, True)


def test_bad_resume_value_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["pretrain", "run.yaml", "--resume=always"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --resume" in err and "'always'" in err and "=auto" in err and "Traceback" not in err


@pytest.mark.parametrize("command_name", ["pretrain", "sft"])
@pytest.mark.parametrize("flags", [[], ["--resume"], ["--resume=auto"], ["--print-config", "--resume=auto"]])
def test_torchrun_relaunch_forwards_the_same_flags(flags, command_name):
    args = parse_args([command_name, "run.yaml", "train.lr=1e-3", "--nproc", "2", *flags])
    command = torchrun_command(args)
    assert command[command.index("--nproc_per_node") + 1] == "2"
    forwarded = command[command.index("forgeline") + 1:]
    assert forwarded[:3] == [command_name, "run.yaml", "train.lr=1e-3"] and "--nproc" not in forwarded
    again = parse_args(forwarded)  # what each rank parses
    assert (again.items, again.resume, again.print_config) == (args.items, args.resume, args.print_config)


def test_two_configs_are_refused(capsys):
    assert main(["pretrain", "a.yaml", "train.lr=1e-3", "b.yaml"]) == 2
    assert "'b.yaml'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# pretrain: resume is passed through, the config is not dumped unless asked
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_pretrain(monkeypatch, tmp_path):
    import forgeline.recipes.pretrain as module

    calls = []

    def pretrain(cfg, *, resume=False):
        calls.append((cfg, resume))
        return SimpleNamespace(model_dir=Path(cfg.run_dir) / "model")

    monkeypatch.setattr(module, "pretrain", pretrain)
    monkeypatch.delenv("RANK", raising=False)
    return calls


@pytest.mark.parametrize("flag, resume", [(None, False), ("--resume", True), ("--resume=auto", "auto")])
def test_pretrain_gets_the_resume_mode_and_prints_one_config_line(fake_pretrain, tmp_path, capsys, flag, resume):
    run_dir = tmp_path / "run"
    argv = ["pretrain", "data.dataset=d", f"run_dir={run_dir}", *([flag] if flag else [])]
    assert main(argv) == 0
    assert fake_pretrain[-1][1] == resume
    out = capsys.readouterr().out
    assert f"resolved config: {run_dir / 'config.yaml'} (--print-config prints it)" in out
    assert "max_steps" not in out and len(out.splitlines()) == 2  # that line and "model saved to ..."


def test_print_config_prints_the_resolved_config(fake_pretrain, tmp_path, capsys):
    assert main(["pretrain", "--print-config", "data.dataset=d", f"run_dir={tmp_path}", "train.max_steps=700"]) == 0
    out = capsys.readouterr().out
    dumped = yaml.safe_load(out.split("resolved config:\n", 1)[1].rsplit("model saved to", 1)[0])
    assert dumped["train"]["max_steps"] == 700 and dumped["run_dir"] == str(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Config errors and help
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, meant", [("train.lr_rate", "lr"), ("train.max_step", "max_steps"),
                                        ("train.warmup", "warmup_steps"), ("train.lrr", "lr"),
                                        ("monitor.val_evry", "val_every")])
def test_did_you_mean_prefers_a_shared_prefix(key, meant):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: unknown key; did you mean '{meant}'\?"):
        load_config(PretrainConfig, None, ["data.dataset=d", f"{key}=1"])


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        parse_args([*argv, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("argv, schema, example", [
    (["pretrain"], PretrainConfig, "train.lr=3e-4"),
    (["tokenizer", "train"], TokenizerTrainConfig, "vocab_size=8192"),
    (["data", "prepare"], DataPrepareConfig, "val_fraction=0.01"),
    (["plan", "memory"], PretrainConfig, "parallel.tp=8"),
])
def test_help_lists_the_commands_own_keys(argv, schema, example, capsys):
    text = _help(argv, capsys)
    sections = ("model", "data", "train", "parallel") if argv[0] == "plan" else None
    keys = describe_keys(schema, sections=sections)
    for line in keys:
        key = line.split(" (", 1)[0]
        assert re.search(rf"^  {re.escape(key)} \(", text, re.M), f"{key} missing from `{' '.join(argv)} --help`"
    assert example in text
    # the example is a key of this command: listed, and it validates against the command's schema
    assert any(line.startswith(example.split("=")[0] + " (") for line in keys)
    if schema is not PretrainConfig:
        assert "train.lr" not in text
    required = {"inputs": ["a.txt"], "output": "o", "tokenizer": "t", "data": {"dataset": "d"}}
    schema.model_validate({**{k: v for k, v in required.items() if k in schema.model_fields},
                           **parse_overrides([example])})


def test_help_shows_types_and_defaults():
    lines = describe_keys(PretrainConfig)
    assert "train.lr (float, default 0.0003)" in lines
    assert any(line.startswith("data.dataset (path, required)") for line in lines)
    assert any(line.startswith("model.dim (int, default 256; 128 when no model.* key is given)") for line in lines)
    assert any(line.startswith("train.precision ('fp32'|'bf16', default 'bf16')") for line in lines)
    assert any(line.startswith("parallel.deepspeed.offload_optimizer (bool, default False)") for line in lines)


def test_every_generation_flag_has_help(capsys):
    for command in ("generate", "chat"):
        text = _help([command, "m"], capsys)
        for flag in ("--top-k", "--top-p", "--repetition-penalty", "--max-new-tokens", "--temperature", "--quiet",
                     *(["--batch-size"] if command == "generate" else [])):
            match = re.search(rf"^  {flag}(?: \S+)?\s*(\S.*)?$", text, re.M)
            assert match, f"{command} --help has no {flag}"
            following = text[match.end():].split("\n", 1)[0] if match.group(1) is None else match.group(1)
            assert following.strip(), f"{command} {flag} has no help text"


# ---------------------------------------------------------------------------------------------------------------
# generate and chat
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "5"),
                                         ("--top-p", "0"), ("--top-k", "-1"), ("--repetition-penalty", "0"),
                                         ("--max-new-tokens", "0"), ("--batch-size", "0")])
def test_bad_sampling_flags_are_rejected_alike(flag, value, tmp_path, capsys):
    # the model does not exist: the flag must be checked first
    assert main(["generate", str(tmp_path / "no-model"), "--prompt", "hi", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"forgeline: error: {flag} must be ") and len(err.strip().splitlines()) == 1
    if flag != "--batch-size":
        assert main(["chat", str(tmp_path / "no-model"), flag, value]) == 2
        assert capsys.readouterr().err.startswith(f"forgeline: error: {flag} must be ")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256,
                      init_std=0.2)
    path = tmp_path_factory.mktemp("ux") / "model"
    save_model_dir(build_model(cfg).eval(), make_tokenizer(), path)
    return path


@pytest.fixture(scope="module")
def mute_model_dir(tmp_path_factory):
    """A model whose first token is always its EOS (<|im_end|>, id 2): what a chat model does to raw text."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for layer in model.layers.values():  # blocks add nothing: the residual stream is the embedding
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.zero_()
        model.tok_embeddings.weight[:, 0] = 1.0
        model.output.weight.zero_()
        model.output.weight[2, 0] = 1.0
    path = tmp_path_factory.mktemp("mute") / "model"
    save_model_dir(model, make_tokenizer(), path)
    return path


def test_generate_prints_speed_on_stderr_unless_quiet(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "hello", "--max-new-tokens", "5", "--top-k", "0"]) == 0
    captured = capsys.readouterr()
    assert re.fullmatch(r"\[\d new tokens? in \d+\.\d\d s, \d+\.\d tokens/s\]\n", captured.err), captured.err
    assert main(["generate", str(model_dir), "--prompt", "a", "--prompt", "b", "--prompt", "c", "--batch-size", "2",
                 "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().err.splitlines()  # one line per generate call: a batch of two, then one prompt
    assert len(lines) == 2, lines
    assert re.fullmatch(r"\[2 prompts: \d new tokens? in .* tokens/s\]", lines[0]), lines
    assert re.fullmatch(r"\[\d new tokens? in .* tokens/s\]", lines[1]), lines
    assert main(["generate", str(model_dir), "--prompt", "hello", "--max-new-tokens", "5", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.strip()


def test_chat_prints_speed_after_each_reply(model_dir):
    args = parse_args(["chat", str(model_dir), "--max-new-tokens", "3"])
    from forgeline.chat import main_chat

    stdout, stderr = io.StringIO(), io.StringIO()
    assert main_chat(args, stdin=io.StringIO("hello\nthe fox\n/exit\n"), stdout=stdout, stderr=stderr) == 0
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2 and all(re.fullmatch(r"\[\d new tokens? in .* tokens/s\]", line) for line in lines)
    args = parse_args(["chat", str(model_dir), "--max-new-tokens", "3", "--quiet"])
    stderr = io.StringIO()
    assert main_chat(args, stdin=io.StringIO("hello\n"), stdout=io.StringIO(), stderr=stderr) == 0
    assert stderr.getvalue() == ""


def test_empty_reply_to_plain_text_suggests_chat(mute_model_dir, tmp_path, capsys):
    assert main(["generate", str(mute_model_dir), "--prompt", "hello", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "\n" and "try --chat" in captured.err
    assert main(["generate", str(mute_model_dir), "--prompt", "hello", "--quiet", "--chat"]) == 0
    assert "--chat" not in capsys.readouterr().err  # chat prompts: an empty reply is the model's answer
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["generate", str(mute_model_dir), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--quiet"]) == 0
    assert "try --chat" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# tokenizer train
# ---------------------------------------------------------------------------------------------------------------


def test_tokenizer_train_cli_is_quiet_and_reads_json_and_parquet(tmp_path, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(300)]
    (corpus / "a.json").write_text(json.dumps({"data": [{"text": d} for d in docs[:150]]}), encoding="utf-8")
    pq.write_table(pa.table({"text": docs[150:]}), corpus / "b.parquet")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", f"inputs=[{corpus}]", f"output={out}", "vocab_size=300"]) == 0
    captured = capfd.readouterr()  # file descriptors: the tokenizers progress bar writes from Rust
    assert captured.out == f"tokenizer with 300 tokens saved to {out}\n"
    assert "\n\n" not in captured.err and not captured.err.strip(), repr(captured.err)
    # and the same directory is what data prepare reads
    assert main(["data", "prepare", f"inputs=[{corpus}]", f"tokenizer={out}", f"output={tmp_path / 'data'}",
                 "val_fraction=0"]) == 0
    assert "300 documents" in capfd.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# GGUF: a truncated file is called truncated
# ---------------------------------------------------------------------------------------------------------------


def test_truncated_gguf_says_so(tmp_path, capsys):
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    from forgeline.model.formats.gguf import write_gguf

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
    good = write_gguf(build_model(cfg).eval(), make_tokenizer(), tmp_path / "good.gguf")
    data = good.read_bytes()
    for cut in (2, 13, 100, 3000, len(data) // 2, len(data) - 1):
        cut_file = tmp_path / f"cut{cut}.gguf"
        cut_file.write_bytes(data[:cut])
        assert main(["import", "gguf", str(cut_file), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"{cut_file}: truncated" in err and len(err.strip().splitlines()) == 1, err
        assert "index" not in err and "reshape" not in err and "Traceback" not in err
    (tmp_path / "text.gguf").write_text("hello, not a model\n")
    assert main(["import", "gguf", str(tmp_path / "text.gguf"), str(tmp_path / "out")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# export consolidate
# ---------------------------------------------------------------------------------------------------------------


def test_resume_modes_then_export_consolidate_run_dir_and_overwrite(story_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    config = {
        "run_dir": str(run),
        "model": {"vocab_size": 512, "dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 64},
        "data": {"dataset": str(story_dataset), "seq_len": 32},
        "train": {"max_steps": 2, "micro_batch_size": 2, "warmup_steps": 0, "precision": "fp32"},
        "checkpoint": {"every": 2},
        "monitor": {"val_every": 2, "val_batches": 1, "peak_flops": 1e11, "progress": False, "tensorboard": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    # the resume modes reach the trainer: must-resume with nothing to resume is an error, auto starts fresh
    assert main(["pretrain", str(tmp_path / "run.yaml"), "--resume"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["pretrain", "--resume=auto", str(tmp_path / "run.yaml")]) == 0
    out = tmp_path / "consolidated"
    assert main(["export", "consolidate", str(run), str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["export", "consolidate", str(run), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "consolidate", "--overwrite", str(run), str(out)]) == 0
    assert (out / "model.safetensors").is_file()
