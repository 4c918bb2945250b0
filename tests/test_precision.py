"""precision.autocast_for and native_bf16 (our own logic; the hardware checks are torch's)."""

from __future__ import annotations

import pytest
import torch

from lora_diffusion import precision
from lora_diffusion.precision import autocast_for, native_bf16

CPU = torch.device("cpu")


def test_fp32_runs_without_autocast():
    with autocast_for("fp32", CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_on_cpu_autocasts_matrix_products_to_bf16():
    a = torch.randn(4, 8)
    with autocast_for("bf16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (a @ a.T).dtype == torch.bfloat16
    assert (a @ a.T).dtype == torch.float32  # only inside


def test_fp16_on_cpu_falls_back_to_fp32():
    """An fp16-trained (GPU) adapter evaluated on a CPU: no fp16 autocast there."""
    with autocast_for("fp16", CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_unknown_precision_is_refused_naming_the_allowed_values():
    with pytest.raises(ValueError, match="precision: got 'fp8'; allowed: fp32, bf16, fp16"):
        autocast_for("fp8", CPU)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_native_bf16_on_cpu_follows_the_cpu_features(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert native_bf16("cpu") is expected


def test_native_bf16_on_cuda_needs_a_bf16_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert native_bf16("cuda") is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert native_bf16(torch.device("cuda:0")) is True
    assert precision.native_bf16("meta") is False


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_where_native(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert precision.resolve("auto", CPU) == expected
    assert precision.resolve("fp16", CPU) == "fp16"  # explicit values stay as given (train.py refuses fp16 on CPU)
    with autocast_for("auto", CPU):
        assert torch.is_autocast_enabled("cpu") is native


def test_config_takes_auto_and_names_the_allowed_values():
    from lora_diffusion.config import ConfigError, load_config

    assert load_config(None, ["train.precision=auto"]).train.precision == "auto"
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp8"])
