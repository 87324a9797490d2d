"""The DeepSpeed ZeRO-3 backend on CPU (gloo, DS_ACCELERATOR=cpu): the same losses as one process, resume (also past a
damaged newest checkpoint), export.

The first run on a machine JIT-compiles DeepSpeed's CPU communication op (about a minute); the build is cached in
the repository's .cache/torch_extensions (git-ignored), so later runs take about 10 s per launch.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from forgeline.cli import main
from forgeline.model.formats.checkpoint import verify_checkpoint

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_parallel import ENV, REPO, TOL, assert_close_losses, launch, read_metrics, write_base  # noqa: E402

pytest.importorskip("deepspeed", reason="the optional DeepSpeed backend is not installed (pip install "
                                        "'forgeline[deepspeed]')")

DS = ["parallel.backend=deepspeed", "train.micro_batch_size=4"]


@pytest.mark.slow
def test_deepspeed_zero3_matches_one_process_resumes_and_exports(tmp_path, story_dataset, monkeypatch, capsys):
    monkeypatch.setitem(ENV, "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    base = write_base(tmp_path / "base.yaml", story_dataset)
    assert main(["pretrain", str(base), f"run_dir={tmp_path / 'single'}"]) == 0
    launch(2, base, tmp_path, [{"name": "ds", "overrides": DS},
                               {"name": "ds_resumed", "overrides": DS, "resume_from": "ds"},
                               {"name": "ds_damaged", "overrides": DS, "resume_from": "ds", "damage_latest": True}],
           timeout=1200)
    want, want_val = read_metrics(tmp_path / "single")
    for name in ("ds", "ds_resumed", "ds_damaged"):
        got, got_val = read_metrics(tmp_path / name)
        assert_close_losses(got, want, name)
        assert_close_losses(got_val, want_val, name + " (validation)")
    ckpt = tmp_path / "ds" / "checkpoints" / "step_00000004"
    assert (ckpt / "deepspeed").is_dir() and json.loads((ckpt / "meta.json").read_text())["format"] == "deepspeed"
    # the manifest covers DeepSpeed's own files; the damaged step 4 was set aside and redone from step 2
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert any(name.startswith("deepspeed/") for name in manifest) and "rng/rank_00001.safetensors" in manifest
    assert (tmp_path / "ds_damaged" / "checkpoints" / "step_00000004.corrupt").is_dir()
    verify_checkpoint(tmp_path / "ds_damaged" / "checkpoints" / "step_00000004")

    # the run's final model is the consolidated ZeRO-3 checkpoint: the single process's weights
    from safetensors.torch import load_file

    single = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    exported = load_file(str(tmp_path / "ds" / "model" / "model.safetensors"))
    assert sorted(exported) == sorted(single)
    for key in single:
        torch.testing.assert_close(exported[key], single[key], atol=TOL, rtol=0, msg=key)

    # a DeepSpeed checkpoint does not resume under the native backend: one clear error
    shutil.copytree(tmp_path / "ds", tmp_path / "native")
    shutil.rmtree(tmp_path / "native" / "checkpoints" / "step_00000004")
    capsys.readouterr()
    assert main(["pretrain", str(base), f"run_dir={tmp_path / 'native'}", "--resume"]) == 2
    assert "was written by the DeepSpeed backend" in capsys.readouterr().err
