"""Training checkpoints: what trains, the optimizer and scheduler, and where the data stood. No pickle.

    checkpoint_0000040/
      adapter/                   adapter_config.json + adapter_model.safetensors (see adapter.py), and
                                 README.md, its model card (see model_card.py; written by the training loop)
      train_state.safetensors    optimizer tensors (AdamW moments), by parameter index
      train_state.json           step, data position (epoch, batch), optimizer hyper-parameters and
                                 non-tensor state, scheduler and grad-scaler state, parameter names
      config.yaml                the resolved run config

`save_checkpoint` writes one; `load_checkpoint` restores the adapter, optimizer, scheduler and
scaler in place and returns the saved position, so a resumed run continues exactly where it stood.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_diffusion.adapter import WEIGHTS_NAME, save_adapter

ADAPTER_DIR = "adapter"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
CONFIG_FILE = "config.yaml"
FORMAT = "lora-diffusion-train-state"


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or does not fit the run; the message names the folder."""


def save_checkpoint(folder: str | os.PathLike, adaptation, cfg, optimizer: torch.optim.Optimizer, scheduler,
                    scaler, position: dict[str, Any], param_names: list[str]) -> Path:
    """Write a checkpoint of `adaptation` (its trainable part) and the training state into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(adaptation, folder / ADAPTER_DIR, cfg.model, cfg.method, extra={"task": cfg.task.name, "step": int(position["step"])})

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "version": 1,
        **{k: v for k, v in position.items()},
        "param_names": list(param_names),
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars, "indices": sorted(int(i) for i in opt["state"])},
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    (folder / STATE_JSON).write_text(json.dumps(meta, indent=1))
    (folder / CONFIG_FILE).write_text(cfg.to_yaml())
    return folder


def read_train_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The `train_state.json` of a checkpoint folder, after checking every file is there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {str(folder)!r}: folder does not exist")
    for rel in (STATE_JSON, STATE_TENSORS, f"{ADAPTER_DIR}/{WEIGHTS_NAME}"):
        if not (folder / rel).is_file():
            raise CheckpointError(f"checkpoint {str(folder)!r}: {rel} is missing (not a lora-diffusion training checkpoint)")
    try:
        meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(folder)!r}: {STATE_JSON} is not JSON ({e}); the checkpoint is corrupt") from None
    for rel in (STATE_TENSORS, f"{ADAPTER_DIR}/{WEIGHTS_NAME}"):
        check_safetensors(folder / rel, f"checkpoint {str(folder)!r}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise CheckpointError(f"checkpoint {str(folder)!r}: {STATE_JSON} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def check_safetensors(file: Path, what: str) -> None:
    """Raise CheckpointError unless `file` is a complete safetensors file (its header and every tensor's bytes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)  # the header's offsets must lie inside the file
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{what}: {file} is not a readable safetensors file ({e}); it is truncated or corrupt") from None


def load_checkpoint(folder: str | os.PathLike, adaptation, optimizer: torch.optim.Optimizer, scheduler, scaler,
                    param_names: list[str]) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and scaler from `folder`; return the saved state."""
    folder = Path(folder)
    meta = read_train_state(folder)
    if meta["param_names"] != list(param_names):
        theirs, ours = set(meta["param_names"]), set(param_names)
        raise CheckpointError(
            f"checkpoint {str(folder)!r} does not fit this run: its trainable parameters differ "
            f"(only in checkpoint: {sorted(theirs - ours)[:3]}, only in this run: {sorted(ours - theirs)[:3]}); "
            "resume with the config the checkpoint was made with (its config.yaml)"
        )
    adaptation.load_adapter_state_dict(load_file(str(folder / ADAPTER_DIR / WEIGHTS_NAME)))

    tensors = load_file(str(folder / STATE_TENSORS))
    state: dict[int, dict[str, Any]] = {int(i): dict(meta["optimizer"]["scalars"].get(str(i), {})) for i in meta["optimizer"]["indices"]}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and scaler.is_enabled() and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta
