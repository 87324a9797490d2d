"""The shared run set-up: a frozen model (a reference or reward model) is evaluated only — eval mode, no gradients,
outside the optimizer and the checkpoints — on one process and sharded under FSDP2."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

CHECK = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    from safetensors import safe_open
    from forgeline.config import SFTConfig, validate_config
    from forgeline.objectives import causal_lm_loss
    from forgeline.recipes.setup import initial_model, run_stage
    from forgeline.train.optim import resolve_schedule

    model_dir, run_dir, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = validate_config(SFTConfig, {"run_dir": run_dir, "init": model_dir, "data": {"train": ["unused.jsonl"]},
                                      "train": {"precision": "fp32", "max_steps": 1, "epochs": None},
                                      "parallel": {"dp_shard": -1} if "fsdp" in extra else {}})

    class NoBatches:  # the check saves a checkpoint without training, so no batch is ever read
        def state_dict(self):
            return {}

    def body(run):
        model, tokenizer = initial_model(cfg, run.dist.device)
        run.place(model, tokenizer)
        reference = run.frozen(model_dir)
        trainer = run.trainer(loss_fn=causal_lm_loss, loader=NoBatches(), train_cfg=resolve_schedule(run.cfg.train, None),
                              grad_accum=1, flops_per_token=None)
        in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert not reference.training
        assert not any(p.requires_grad or id(p) in in_optimizer for p in reference.parameters())
        ids = torch.arange(12).reshape(2, 6) % 97
        with torch.no_grad():
            torch.testing.assert_close(reference(ids), run.wrapped(ids), atol=1e-6, rtol=0)
        path = trainer.save()
        if run.dist.is_main and (Path(path) / "model.safetensors").is_file():
            from forgeline.model.formats.model_dir import model_state_dict

            with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
                assert set(f.keys()) == set(model_state_dict(model))  # the trained model's weights, nothing else
        # one write per line: two ranks share the pipe, and print() writes its pieces separately
        sys.stdout.write(f"frozen ok {type(reference).__name__}\\n")
        sys.stdout.flush()

    run_stage(cfg, False, body)
''')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, story_dataset):
    from forgeline.model import ModelConfig, build_model
    from forgeline.model.formats.model_dir import save_model_dir
    from forgeline.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("frozen") / "model"
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                    max_seq_len=64))
    save_model_dir(model, Tokenizer.load(story_dataset / "tokenizer"), out)
    return out


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "check_frozen.py"
    path.write_text(CHECK)
    return path


def test_frozen_model_on_one_process(tmp_path, model_dir):
    result = subprocess.run([sys.executable, _script(tmp_path), model_dir, tmp_path / "run"], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "frozen ok Transformer" in result.stdout


@pytest.mark.slow
def test_frozen_model_sharded_under_fsdp2(tmp_path, model_dir):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             _script(tmp_path), model_dir, tmp_path / "run", "fsdp"], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("frozen ok FSDPTransformer") == 2
