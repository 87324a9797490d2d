import pytest

from forgeline.config import PretrainConfig, load_config, parse_overrides
from forgeline.errors import ConfigError


def test_overrides_parse_yaml_scalars_and_nesting():
    tree = parse_overrides(["train.lr=3e-4", "model.tie_embeddings=true", "data.dataset=d", "a.b.c=[1,2]"])
    assert tree == {"train": {"lr": 3e-4}, "model": {"tie_embeddings": True}, "data": {"dataset": "d"},
                    "a": {"b": {"c": [1, 2]}}}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["train.lr"])


def test_unknown_key_gets_did_you_mean(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  dataset: d\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path)
    assert "train.lrr: unknown key; did you mean 'lr'?" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("train.max_steps=ten", "train.max_steps: Input should be a valid integer"),
        ("model.preset=13q", "unknown preset '13q'"),
        ("train.precision=fp16", "train.precision: Input should be 'fp32' or 'bf16'"),
        ("train.warmup_steps=5000", "warmup_steps=5000 must be smaller than max_steps=1000"),
        ("stability.spike_factor=0.5", "stability.spike_factor: Input should be greater than 1"),
    ],
)
def test_bad_values_name_the_field(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(PretrainConfig, None, ["data.dataset=d", override])


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="data: required but not given"):
        load_config(PretrainConfig, None, ["train.lr=1e-3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(PretrainConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")


def test_seed_hyperparameter_presets_apply_under_explicit_values():
    cfg = load_config(PretrainConfig, None, ["data.dataset=d", "train.preset=7b", "train.max_steps=10000"])
    assert (cfg.train.lr, cfg.train.global_batch_tokens, cfg.train.warmup_steps) == (3e-4, 4 * 2**20, 2000)
    assert (cfg.train.weight_decay, cfg.train.grad_clip) == (0.1, 1.0)
    cfg = load_config(PretrainConfig, None, ["data.dataset=d", "train.preset=70b", "train.max_steps=10000",
                                             "train.lr=1e-4"])
    assert cfg.train.lr == 1e-4 and cfg.train.global_batch_tokens == 8 * 2**20


def test_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("pretrain*.yaml"))
    assert recipes, "recipes/ ships pre-training configs"
    for recipe in recipes:
        load_config(PretrainConfig, recipe)
