"""Live training metrics in Ray's Prometheus export (and so in Grafana and the Ray dashboard).

`publish(metrics, labels)` sets one `ray.util.metrics.Gauge` per known training metric,
tagged by trial, task and method. Gauges are created lazily, once per process. Outside Ray
(`ray.is_initialized()` false) it does nothing, so the same training loop runs in a plain process.

Ray prefixes custom metrics with `ray_`: the metric `loss` is exported as
`ray_lora_diffusion_loss{trial=..., task=..., method=...}` (see `exported_name`).
"""

from __future__ import annotations

import math
import threading
from typing import Mapping

from lora_diffusion.config import PHASE_METRICS, PHASE_RANGES, PHASES

PREFIX = "lora_diffusion_"
TAG_KEYS: tuple[str, ...] = ("trial", "task", "method")
UNKNOWN = "unknown"  # tag value used when a label is missing

# report metric name -> gauge description (names follow the shared naming contract)
METRICS: dict[str, str] = {
    "loss": "Total training loss (denoising loss + regularisers)",
    "denoise_loss": "Masked-diffusion denoising loss",
    "reg_rank": "Rank regulariser (LoRA-Diffusion)",
    "reg_orth": "Orthogonality regulariser (LoRA-Diffusion)",
    **{m: f"Masked cross-entropy on {p}-phase timesteps ({r})" for p, m, r in zip(PHASES, PHASE_METRICS, PHASE_RANGES)},
    "lr": "Learning rate",
    "tokens_per_s": "Training throughput in tokens per second",
    "samples_per_s": "Training throughput in samples per second",
    "peak_mem_mb": "Peak memory of the training process in MB",
    "trainable_params": "Trainable parameter count",
    "total_params": "Total parameter count",
    "step": "Optimizer step",
    "epoch": "Epoch",
    "val_loss": "Validation denoising loss",
    "val_denoise_acc": "Validation token-level denoising accuracy",
    "objective": "The sweep's objective metric",
}

_lock = threading.Lock()
_gauges: dict[str, object] = {}


def gauge_name(metric: str) -> str:
    """The name given to `ray.util.metrics.Gauge` for a report metric."""
    return PREFIX + metric


def exported_name(metric: str) -> str:
    """The name Prometheus sees for a report metric (Ray adds the `ray_` prefix)."""
    return "ray_" + gauge_name(metric)


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


def _gauge(metric: str):
    with _lock:
        g = _gauges.get(metric)
        if g is None:
            from ray.util.metrics import Gauge

            g = Gauge(gauge_name(metric), description=METRICS[metric], tag_keys=TAG_KEYS)
            _gauges[metric] = g
        return g


def tags_from(labels: Mapping[str, object]) -> dict[str, str]:
    """The tag values for `labels`: only the tag keys, as strings, missing ones as 'unknown'."""
    out = {}
    for key in TAG_KEYS:
        value = labels.get(key)
        out[key] = UNKNOWN if value is None or str(value) == "" else str(value)
    return out


def publish(metrics: Mapping[str, object], labels: Mapping[str, object]) -> None:
    """Set the gauge of every known, finite numeric metric in `metrics`; no-op outside Ray.

    `labels` gives the tags `trial`, `task` and `method`; other keys are ignored. Metric names
    not in `METRICS` (e.g. `eval_*`) and non-numeric or non-finite values are skipped.
    """
    if not _ray_ready():
        return
    tags = tags_from(labels)
    for name, value in metrics.items():
        if name not in METRICS or isinstance(value, bool):
            continue
        try:
            number = float(value)  # accepts python numbers and 0-d tensors / numpy scalars
        except (TypeError, ValueError):
            continue
        if not math.isfinite(number):
            continue
        _gauge(name).set(number, tags=tags)
