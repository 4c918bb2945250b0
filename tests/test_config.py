"""Typed configuration: every invalid value is refused with an error naming the key; YAML round trip; overrides."""

from __future__ import annotations

import pytest

from lora_diffusion.config import Config, ConfigError, config_from_dict, load_config, save_config


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("method.name=lora", "method.name", "allowed: lora_diffusion, weight_lora, adapters, prefix_tuning, bitfit, full_ft"),
        ("method.lora_diffusion.rank_early=0", "method.lora_diffusion.rank_early", "greater than 0"),
        ("method.lora_diffusion.rank_mid=-3", "method.lora_diffusion.rank_mid", "greater than 0"),
        ("method.lora_diffusion.rank_late=0", "method.lora_diffusion.rank_late", "greater than 0"),
        ("method.weight_lora.r=0", "method.weight_lora.r", "greater than 0"),
        ("method.adapters.bottleneck=0", "method.adapters.bottleneck", "greater than 0"),
        ("method.prefix_tuning.num_prefix=0", "method.prefix_tuning.num_prefix", "greater than 0"),
        ("method.lora_diffusion.b1=0", "method.lora_diffusion", "0 < b1 < b2 < 1"),
        ("method.lora_diffusion.b1=0.8", "method.lora_diffusion", "0 < b1 < b2 < 1"),
        ("method.lora_diffusion.b2=1.0", "method.lora_diffusion", "0 < b1 < b2 < 1"),
        ("method.lora_diffusion.b2=0.3333333333333333", "method.lora_diffusion", "0 < b1 < b2 < 1"),
        ("method.lora_diffusion.k=0", "method.lora_diffusion.k", "greater than or equal to 1"),
        ("method.lora_diffusion.lambda_rank=-0.1", "method.lora_diffusion.lambda_rank", "greater than or equal to 0"),
        ("method.lora_diffusion.lambda_orth=-1", "method.lora_diffusion.lambda_orth", "greater than or equal to 0"),
        ("method.lora_diffusion.rank_norm=l1", "method.lora_diffusion.rank_norm", "'nuclear' or 'frobenius'"),
        ("diffusion.schedule=sqrt", "diffusion.schedule", "'linear', 'cosine' or 'loglinear'"),
        ("diffusion.time=both", "diffusion.time", "'discrete' or 'continuous'"),
        ("diffusion.T=0", "diffusion.T", "greater than or equal to 1"),
        ("train.lr=0", "train.lr", "greater than 0"),
        ("train.controller_poll_s=0", "train.controller_poll_s", "greater than 0"),
        ("train.foo=1", "train.foo", "unknown key; allowed here: seed, lr"),
        ("bogus=1", "bogus", "unknown key; allowed here: model, diffusion, method, task, train, sampling, tracking"),
        ("method.lora_diffusion.rank=4", "method.lora_diffusion.rank", "unknown key; allowed here: b1, b2, rank_early"),
        ("method.lora_diffusion.rank_early=abc", "method.lora_diffusion.rank_early", "valid integer"),
        ("task.name=mnli", "task.name", "allowed: "),
    ],
)
def test_invalid_values_name_the_key(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert message.startswith(f"{key}:") and allowed in message
    value = override.split("=", 1)[1]
    if "unknown key" not in allowed and key != "method.lora_diffusion":
        assert repr(value) in message or value in message  # the bad value is shown


def test_boundary_error_shows_both_boundaries():
    with pytest.raises(ConfigError, match=r"method.lora_diffusion: b1=0.8, b2=0.6666666666666666"):
        load_config(None, ["method.lora_diffusion.b1=0.8"])


def test_several_errors_are_all_reported():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.lora_diffusion.k=0", "diffusion.schedule=sqrt"])
    assert "method.lora_diffusion.k" in str(e.value) and "diffusion.schedule" in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: [lora_diffusion\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad.yaml' is not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"top level must be a mapping, got list"):
        load_config(listed)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("method:\n  lora_diffusion:\n    rank_mid: 0\n")
    with pytest.raises(ConfigError, match=r"method.lora_diffusion.rank_mid: got 0"):
        load_config(wrong)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["method.name"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, ["=3"])
    with pytest.raises(ConfigError, match="method.name.x: method.name is a value, not a section"):
        load_config(None, ["method.name=adapters", "method.name.x=1"])
    with pytest.raises(ConfigError, match=r"method.name: got \{'x': 1\}"):
        load_config(None, ["method.name.x=1"])


def test_yaml_dump_reloads_to_an_equal_config(tmp_path):
    cfg = load_config(None, [
        "method.name=weight_lora", "method.weight_lora.target_modules=[query,key,value]", "method.weight_lora.r=4",
        "method.lora_diffusion.b1=0.2", "method.lora_diffusion.film=false", "diffusion.schedule=cosine",
        "diffusion.time=continuous", "train.lr=3e-4", "task.subset_size=100", "model.base=builtin:tiny",
    ])
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()) == cfg
    assert load_config(None) == Config()


def test_overrides_apply_on_top_of_the_file_and_parse_types(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text("# a commented config\nmethod:\n  name: lora_diffusion\n  lora_diffusion:\n    rank_early: 16\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["method.lora_diffusion.rank_early=32", "train.lr=1e-4", "method.lora_diffusion.film=false",
                             "diffusion.T=50", "method.lora_diffusion.scale_mid=0.75", "task.data_dir=/data/x"])
    assert cfg.method.lora_diffusion.rank_early == 32
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.method.lora_diffusion.film is False
    assert cfg.diffusion.T == 50 and cfg.method.lora_diffusion.scale_mid == 0.75
    assert cfg.task.data_dir == "/data/x"
    assert cfg.method.lora_diffusion.rank_mid == 32  # untouched default


def test_flat_keys_hold_only_the_active_method():
    flat = load_config(None, ["method.name=adapters"]).flat()
    assert flat["method.name"] == "adapters" and flat["method.adapters.bottleneck"] == 64
    assert flat["method.adapters.train_layernorm"] is True
    assert not any(k.startswith("method.lora_diffusion.") for k in flat)
    assert flat["diffusion.schedule"] == "linear" and "train.lr" in flat
