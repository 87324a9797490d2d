"""forgeline's model directory (model/formats/model_dir.py), the run's tokenizer and checkpoint readers
(model/formats/checkpoint.py), consolidation with extra end-of-sequence tokens, and which checkpointer reads what."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml

from forgeline.errors import CheckpointError, ConfigError, ForgelineError
from forgeline.model import ModelConfig, build_model, load_model
from forgeline.model.formats.checkpoint import RUN_TOKENIZER_DIR, find_run_tokenizer, read_checkpoint
from forgeline.model.formats.common import LoadedModel
from forgeline.model.formats.hf import export_hf
from forgeline.model.formats.model_dir import read_model_dir, save_imported, save_model_dir
from forgeline.model.inference.generate import default_stop_ids
from forgeline.tokenizer import Tokenizer
from forgeline.train.checkpoint import save_checkpoint

from test_generate import make_tokenizer  # noqa: E402

CFG = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def tokenizer_ending_in_endoftext() -> Tokenizer:
    """A tokenizer whose own EOS is <|endoftext|>, so that <|im_end|> is an extra end-of-sequence token."""
    base = make_tokenizer()
    return Tokenizer(base.backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                     chat_template=base.chat_template, model_max_length=64)


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(CFG).eval()


def leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_generation_eos_joins_the_eos_list_and_reaches_the_hf_export(tmp_path):
    tok = tokenizer_ending_in_endoftext()
    eos, im_end = tok.eos_id, tok.token_to_id("<|im_end|>")
    out = save_model_dir(small_model(), tok, tmp_path / "model", generation_eos=["<|im_end|>"])
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [eos, im_end] and gen["bos_token_id"] == tok.bos_id
    loaded = read_model_dir(out)
    assert loaded.generation_config["eos_token_id"] == [eos, im_end]
    assert default_stop_ids(loaded.tokenizer, loaded.generation_config) == {eos, im_end}
    assert loaded.add_bos is True  # trained by forgeline: plain prompts get BOS, generation config or not
    exported = export_hf(out, tmp_path / "hf")
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == [eos, im_end]


def test_generation_eos_not_in_the_vocabulary_is_a_config_error_and_writes_nothing(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(ConfigError, match="'<\\|eot\\|>' is not in the tokenizer's vocabulary"):
        save_model_dir(small_model(), tokenizer_ending_in_endoftext(), out, generation_eos=["<|eot|>"])
    assert not out.exists() and not leftovers(out)
    with pytest.raises(ConfigError, match="need a tokenizer"):
        save_model_dir(small_model(), None, out, generation_eos=["<|im_end|>"])


def test_an_existing_model_dir_is_replaced_only_with_overwrite(tmp_path):
    out = save_model_dir(small_model(0), None, tmp_path / "model")
    with pytest.raises(ForgelineError, match="exists and is not empty"):
        save_model_dir(small_model(1), None, out)
    assert torch.equal(read_model_dir(out).model.output.weight, small_model(0).output.weight)
    save_model_dir(small_model(1), None, out, overwrite=True)
    assert torch.equal(read_model_dir(out).model.output.weight, small_model(1).output.weight)
    assert not leftovers(out)


def test_an_imported_model_keeps_its_own_bos_rule_and_configs(tmp_path):
    tok = make_tokenizer()
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "sliding_window": None}
    loaded = LoadedModel(model=small_model(), tokenizer=tok, generation_config={"eos_token_id": 2, "top_k": 7},
                         architecture="LlamaForCausalLM", hf_config=hf, source="somewhere/model.gguf")
    out = save_imported(loaded, tmp_path / "imported")
    assert json.loads((out / "import.json").read_text()) == {"source": "somewhere/model.gguf"}
    back = load_model(out, dtype="bfloat16")
    assert back.add_bos is None and back.architecture == "LlamaForCausalLM" and back.hf_config == hf
    assert back.generation_config == {"eos_token_id": 2, "top_k": 7}
    assert next(back.model.parameters()).dtype == torch.bfloat16 and back.model.inv_freq.dtype == torch.float32
    assert back.tokenizer.vocab_size == tok.vocab_size


def _checkpoint(run, model, *, config_tokenizer=None):
    cfg = {"model": model.cfg.model_dump(mode="json")}
    if config_tokenizer is not None:
        cfg["tokenizer"] = str(config_tokenizer)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(run / "checkpoints", 3, model=model, optimizer=opt, trainer_state={},
                           config_yaml=yaml.safe_dump(cfg), keep_last=1)


def test_the_runs_tokenizer_dir_comes_first_then_the_older_places(tmp_path):
    run_tok, config_tok = tokenizer_ending_in_endoftext(), make_tokenizer()
    config_tok.save(tmp_path / "configured")
    ckpt = _checkpoint(tmp_path / "run", small_model(), config_tokenizer=tmp_path / "configured")
    # the config's tokenizer: where a run from before run_dir/tokenizer took it
    assert find_run_tokenizer(ckpt).eos_token == "<|im_end|>"
    run_tok.save(tmp_path / "run" / RUN_TOKENIZER_DIR)
    for where in (ckpt, tmp_path / "run"):  # a checkpoint or its run dir
        assert find_run_tokenizer(where).eos_token == "<|endoftext|>"
    loaded = read_checkpoint(ckpt)
    assert loaded.tokenizer.eos_token == "<|endoftext|>" and loaded.add_bos is True
    assert find_run_tokenizer(_checkpoint(tmp_path / "bare", small_model())) is None


def test_consolidate_writes_the_runs_tokenizer_and_the_extra_eos(tmp_path):
    from forgeline.parallel.checkpoint import consolidate

    model = small_model()
    tok = tokenizer_ending_in_endoftext()
    tok.save(tmp_path / "run" / RUN_TOKENIZER_DIR)
    _checkpoint(tmp_path / "run", model)
    out = consolidate(tmp_path / "run", tmp_path / "model", generation_eos=["<|im_end|>"])
    loaded = read_model_dir(out)
    assert loaded.tokenizer.eos_token == "<|endoftext|>"
    assert loaded.generation_config["eos_token_id"] == [tok.eos_id, tok.token_to_id("<|im_end|>")]
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.parameters(), model.parameters()))
    with pytest.raises(ForgelineError, match="already exists; pass --overwrite"):
        consolidate(tmp_path / "run", out)
    consolidate(tmp_path / "run", out, overwrite=True)  # e.g. a run's final export after a resume


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_whole_model_checkpointers_and_a_sharded_checkpoint(tmp_path):
    """A DCP checkpoint (written here by one process) resumes a whole model through parallel's
    WholeModelCheckpointer; train's FullCheckpointer reads safetensors checkpoints only and says so."""
    from forgeline.parallel.checkpoint import ShardedCheckpointer, WholeModelCheckpointer
    from forgeline.train.checkpoint import FullCheckpointer
    from forgeline.train.distributed import DistInfo

    model = small_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 320, (2, 8))).float().square().mean().backward()
    opt.step()
    path = ShardedCheckpointer("test").save(tmp_path / "ckpts", 1, model=model, optimizer=opt, trainer_state={},
                                            config_yaml=yaml.safe_dump({"model": CFG.model_dump(mode="json")}),
                                            keep_last=1, dist=DistInfo())
    assert (path / "dcp" / ".metadata").is_file() and not leftovers(path)
    fresh = small_model(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with pytest.raises(CheckpointError, match="holds dcp/ shards, not a whole-model checkpoint"):
        FullCheckpointer().load(path, model=fresh, optimizer=fresh_opt, dist=DistInfo())
    state = WholeModelCheckpointer().load(path, model=fresh, optimizer=fresh_opt, dist=DistInfo())
    assert state["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    saved, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg"], restored[i]["exp_avg"]) for i in saved)
