"""Adapter folders: what a method trains, saved as `adapter_config.json` + `adapter_model.safetensors`.

The PEFT layout, never pickle. `adapter_config.json` records the method, its settings and the
base it was trained on, so `load_adapter(path)` rebuilds the whole adapted model. An adapter is
given by a local folder or an MLflow URI (`runs:/<run_id>/adapter`, `models:/<name>/<version>`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from lora_diffusion.config import MethodConfig, ModelConfig
from lora_diffusion.methods import Adaptation, build_method

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "lora-diffusion-adapter"


def save_adapter(adaptation: Adaptation, folder: str | os.PathLike, model_cfg: ModelConfig, method_cfg: MethodConfig,
                 extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in adaptation.adapter_state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT, "method": method_cfg.name})
    config = {
        "format": FORMAT,
        "version": 1,
        "method": method_cfg.name,
        "method_config": method_cfg.model_dump(mode="json", include={"name", method_cfg.name}),
        "base": model_cfg.model_dump(mode="json"),
        "param_counts": adaptation.param_counts(),
        **(extra or {}),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def resolve_adapter_path(path_or_uri: str) -> Path:
    """A local folder for a path or an MLflow artifact URI (runs:/…, models:/…, mlflow-artifacts:/…)."""
    if "://" in path_or_uri or path_or_uri.startswith(("runs:/", "models:/")):
        import mlflow

        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=path_or_uri)
        except Exception as e:  # noqa: BLE001 - MLflow raises many types; the message says what
            raise ValueError(f"adapter {path_or_uri!r}: could not be fetched from MLflow ({e})") from None
        p = Path(local)
        if not (p / CONFIG_NAME).is_file() and (p / "adapter" / CONFIG_NAME).is_file():
            p = p / "adapter"
        return p
    return Path(path_or_uri)


def read_adapter_config(path_or_uri: str) -> tuple[Path, dict]:
    folder = resolve_adapter_path(str(path_or_uri))
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise ValueError(f"adapter {str(path_or_uri)!r}: no {CONFIG_NAME} in {str(folder)!r}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"adapter {str(path_or_uri)!r}: {cfg_file} is not JSON ({e.__class__.__name__}: {e}); "
                         f"an adapter folder holds the {CONFIG_NAME} that save_adapter writes") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        config = config if isinstance(config, dict) else {}
        raise ValueError(f"adapter {str(path_or_uri)!r}: {CONFIG_NAME} has format {config.get('format')!r}, expected {FORMAT!r}")
    if not (folder / WEIGHTS_NAME).is_file():
        raise ValueError(f"adapter {str(path_or_uri)!r}: no {WEIGHTS_NAME} in {str(folder)!r}")
    return folder, config


def load_adapter(path_or_uri: str, denoiser=None, base: str | None = None):
    """(Adaptation, tokenizer, adapter_config) from a folder or MLflow URI.

    The base is the one recorded in the adapter unless `denoiser` (already loaded) or `base`
    (a name or folder to load instead) is given.
    """
    from lora_diffusion.model import load_base

    folder, config = read_adapter_config(path_or_uri)
    try:
        model_cfg = ModelConfig.model_validate(config["base"])
        method_cfg = MethodConfig.model_validate(config["method_config"])
    except (KeyError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"adapter {str(path_or_uri)!r}: {CONFIG_NAME} does not describe a base and a method "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if base is not None:
        model_cfg = model_cfg.model_copy(update={"base": base})
    tokenizer = None
    if denoiser is None:
        denoiser, tokenizer = load_base(model_cfg)
    adaptation = build_method(method_cfg, denoiser)
    adaptation.load_adapter_state_dict(read_weights(folder / WEIGHTS_NAME, str(path_or_uri)))
    adaptation.eval()
    return adaptation, tokenizer, config


def read_weights(file: Path, shown: str) -> dict:
    """The tensors of adapter_model.safetensors; a ValueError naming the file when it is truncated or not safetensors."""
    from safetensors import SafetensorError

    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"adapter {shown!r}: {file} is not a readable safetensors file ({e}); it is truncated or "
                         "corrupt: copy or download the adapter again") from None
