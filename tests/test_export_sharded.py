"""`forgeline export hf` / `export consolidate` of sharded (DCP) checkpoints written by the FSDP2 / TP / PP path.

The checkpoints are real: two gloo processes shard a small model with FSDP2, take one AdamW step and save with
ShardedCheckpointer (tests/sharded_checkpoint_writer.py, ~5 s); the reference is the whole model gathered from the
ranks. A broken or foreign directory is one `forgeline: error:` line naming the path, exit status 2, and nothing is
left behind in the output's parent. Damage is found by the checkpoint's manifest before DCP reads a byte; cases that
rewrite the manifest after the damage reach DCP's own reader and its error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgeline.cli import main
from forgeline.files import write_manifest
from forgeline.model.formats import load_model
from forgeline.model.formats.hf import forgeline_to_hf_name

from test_generate import make_tokenizer  # noqa: E402

WRITER = Path(__file__).with_name("sharded_checkpoint_writer.py")
MODEL = {"vocab_size": 320, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96,
         "max_seq_len": 128}
RUNS = {"untied": MODEL, "tied": dict(MODEL, tie_embeddings=True)}
STEP = "step_00000001"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    make_tokenizer().save(root / "tokenizer")
    spec = root / "spec.json"
    spec.write_text(json.dumps({"root": str(root), "tokenizer": str(root / "tokenizer"), "runs": RUNS}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(WRITER), str(spec)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for name in RUNS:
        dcp = root / name / "checkpoints" / STEP / "dcp"
        assert (dcp / ".metadata").is_file() and len(list(dcp.glob("*.distcp"))) == 2  # one file per rank
        assert not (root / name / "checkpoints" / STEP / "model.safetensors").exists()
    return root


def _no_leftovers(out: Path) -> None:
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p.name.startswith(".tmp-")]


@pytest.mark.parametrize("name", list(RUNS))
def test_export_hf_of_a_sharded_checkpoint_has_the_consolidated_weights(sharded, tmp_path, name, capsys):
    ckpt = sharded / name / "checkpoints" / STEP
    reference = load_file(str(sharded / name / "reference.safetensors"))
    tied = RUNS[name].get("tie_embeddings", False)
    # The checkpoint dir, and the run dir (whose newest checkpoint is sharded and which has no model/ yet); the
    # tokenizer is the run's own (config.yaml names it).
    for source in (ckpt, sharded / name):
        out = tmp_path / f"hf-{source.name}"
        assert main(["export", "hf", str(source), str(out)]) == 0
        assert f"written to {out}" in capsys.readouterr().out
        _no_leftovers(out)
        got = load_file(str(out / "model.safetensors"))
        want = {forgeline_to_hf_name(k): v for k, v in reference.items() if not (tied and k == "output.weight")}
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), key
        hf_cfg = json.loads((out / "config.json").read_text())
        assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["tie_word_embeddings"] is tied
        assert hf_cfg["num_hidden_layers"] == 2 and (out / "tokenizer.json").is_file()
    # The same weights as `export consolidate` and as loading the checkpoint for inference.
    consolidated = tmp_path / "consolidated"
    assert main(["export", "consolidate", str(ckpt), str(consolidated)]) == 0
    flat = load_file(str(consolidated / "model.safetensors"))
    model = load_model(ckpt).model
    assert model.cfg.tie_embeddings is tied
    for key, value in reference.items():
        if key in flat:
            assert torch.equal(flat[key], value), key
        assert torch.equal(model.state_dict()[key], value), key
    # --dtype converts the consolidated weights.
    out = tmp_path / "hf-bf16"
    assert main(["export", "hf", str(ckpt), str(out), "--dtype", "bfloat16"]) == 0
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got["model.norm.weight"], reference["norm.weight"].to(torch.bfloat16))


def _break_metadata(ckpt: Path) -> None:
    (ckpt / "dcp" / ".metadata").write_bytes(b"garbage")
    write_manifest(ckpt)  # past the manifest check: the DCP reader's own error


def _damage_metadata(ckpt: Path) -> None:
    (ckpt / "dcp" / ".metadata").write_bytes(b"garbage")


def _drop_metadata(ckpt: Path) -> None:
    (ckpt / "dcp" / ".metadata").unlink()


def _drop_a_shard(ckpt: Path) -> None:
    (ckpt / "dcp" / "__1_0.distcp").unlink()


def _truncate_a_shard(ckpt: Path) -> None:
    shard = ckpt / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    write_manifest(ckpt)


def _cut_a_shard(ckpt: Path) -> None:
    shard = ckpt / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])


def _flip_a_byte_in_a_shard(ckpt: Path) -> None:
    shard = ckpt / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def _drop_the_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()


def _drop_the_weights(ckpt: Path) -> None:
    shutil.rmtree(ckpt / "dcp")


def _another_model(ckpt: Path) -> None:
    config = ckpt / "config.yaml"
    config.write_text(config.read_text().replace("n_layers: 2", "n_layers: 3"))
    write_manifest(ckpt)


def _bad_config(ckpt: Path) -> None:
    (ckpt / "config.yaml").write_text("model: [\n")


def _not_a_checkpoint(ckpt: Path) -> None:
    shutil.rmtree(ckpt)
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("not a checkpoint")


BREAKAGES = {
    "corrupt-metadata": (_break_metadata, "cannot read the sharded checkpoint"),
    "missing-metadata": (_drop_metadata, "dcp/.metadata is missing"),
    "missing-shard": (_drop_a_shard, "__1_0.distcp"),
    "truncated-shard": (_truncate_a_shard, "cannot read the sharded checkpoint"),
    # the same damage caught by the manifest (size, sha256) before DCP reads anything
    "damaged-metadata": (_damage_metadata, "dcp/.metadata has 7 bytes; the manifest says"),
    "cut-shard": (_cut_a_shard, "dcp/__0_0.distcp has 100 bytes; the manifest says"),
    "flipped-byte": (_flip_a_byte_in_a_shard, "dcp/__1_0.distcp has changed since it was written"),
    "missing-manifest": (_drop_the_manifest, "manifest.json is missing"),
    "no-weights": (_drop_the_weights, "dcp/"),
    "another-model": (_another_model, "does not fit"),
    "bad-config": (_bad_config, "config.yaml"),
    "not-a-checkpoint": (_not_a_checkpoint, "not a"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_sharded_checkpoint_is_one_line_error(sharded, tmp_path, breakage, capsys):
    ckpt = tmp_path / "broken" / STEP
    shutil.copytree(sharded / "untied" / "checkpoints" / STEP, ckpt)
    damage, mention = BREAKAGES[breakage]
    damage(ckpt)
    for argv in (["export", "hf", str(ckpt), str(tmp_path / "hf"), "--tokenizer", str(sharded / "tokenizer")],
                 ["export", "consolidate", str(ckpt), str(tmp_path / "consolidated")]):
        out = Path(argv[3])
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"forgeline: error: {ckpt}") and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err and mention in err, err
        assert not out.exists()
        _no_leftovers(out)
