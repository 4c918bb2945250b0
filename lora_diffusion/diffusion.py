"""Absorbing-state (masked) diffusion: noise schedules, the forward process and the training loss.

Time is a float t in (0, 1] for every example: discrete time uses t = k / T with k in {1..T},
continuous time draws t ~ U(eps, 1). A position that may be noised (the target span; the
instruction and input never are) is replaced by [MASK] with probability mask_prob(t).

Schedules are classes (`NoiseSchedule`: the mask probability, the ELBO weight, and the inverse, the
time at which a given fraction is masked, which sampling.py uses), registered by name in `SCHEDULES`:
`get_schedule(cfg.diffusion.schedule)`. Linear, cosine and MDLM's log-linear are built in.

Loss (as in LLaDA's SFT / MDLM): cross-entropy on the masked target positions, each weighted
by the schedule's ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) (1/t for the linear schedule)
or unweighted, summed and divided by the number of target tokens in the batch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from lora_diffusion.config import PHASE_METRICS, DiffusionConfig


class NoiseSchedule(ABC):
    """One noise schedule: alpha(t) = probability that a maskable token is still clean at time t.

    Everything a schedule means lives in its class: the mask probability 1 - alpha(t) (the forward
    process), the ELBO weight (the loss) and the inverse, the time at which a given fraction is masked
    (the reverse process). A new schedule is one subclass with `@register`, and its name in
    config.DiffusionConfig.schedule (the config validates without torch; a test checks the two agree).
    """

    name: ClassVar[str]

    @abstractmethod
    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha(t): the probability that a maskable token is [MASK] at time t."""

    @abstractmethod
    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)): the continuous-time ELBO weight of a masked position."""

    @abstractmethod
    def time_for_mask_prob(self, p: torch.Tensor) -> torch.Tensor:
        """The inverse of `mask_prob`: t in [0, 1] with mask_prob(t) = p; p above mask_prob(1) gives t = 1."""


SCHEDULES: dict[str, type[NoiseSchedule]] = {}


def register(cls: type[NoiseSchedule]) -> type[NoiseSchedule]:
    """Class decorator: makes the schedule available as `diffusion.schedule: <cls.name>`."""
    SCHEDULES[cls.name] = cls
    return cls


def get_schedule(name: str) -> NoiseSchedule:
    """The schedule called `name` (the value of `diffusion.schedule`)."""
    if name not in SCHEDULES:
        raise ValueError(f"diffusion.schedule: unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()


@register
class LinearSchedule(NoiseSchedule):
    """alpha(t) = 1 - t (LLaDA): the mask probability is t, the ELBO weight 1/t."""

    name = "linear"

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t

    def time_for_mask_prob(self, p: torch.Tensor) -> torch.Tensor:
        return p.clamp(0.0, 1.0)


@register
class CosineSchedule(NoiseSchedule):
    """alpha(t) = cos(pi/2 t): slow masking early in t, fast late."""

    name = "cosine"

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.cos(0.5 * math.pi * t)

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        half = 0.5 * math.pi
        return half * torch.sin(half * t) / (1.0 - torch.cos(half * t)).clamp_min(1e-8)

    def time_for_mask_prob(self, p: torch.Tensor) -> torch.Tensor:
        return torch.arccos(1.0 - p.clamp(0.0, 1.0)) * (2.0 / math.pi)


@register
class LogLinearSchedule(NoiseSchedule):
    """MDLM's: sigma(t) = -log(1 - (1 - eps) t), so alpha(t) = 1 - (1 - eps) t; the ELBO weight is 1/t."""

    name = "loglinear"
    eps: ClassVar[float] = 1e-3

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * t

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t

    def time_for_mask_prob(self, p: torch.Tensor) -> torch.Tensor:
        return (p.clamp(0.0, 1.0) / (1.0 - self.eps)).clamp(max=1.0)


def sample_t(batch: int, cfg: DiffusionConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """One time per example, as a float in (0, 1]."""
    if cfg.time == "discrete":
        k = torch.randint(1, cfg.T + 1, (batch,), generator=generator, device=device)
        return k.float() / cfg.T
    u = torch.rand(batch, generator=generator, device=device)
    return cfg.eps + (1.0 - cfg.eps) * u


def forward_process(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    mask_id: int,
    generator: torch.Generator | None = None,
    at_least_one: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise `input_ids` to time t. Returns (x_t, masked) where masked marks the [MASK]ed positions.

    Only `maskable` positions can be masked. With `at_least_one`, an example whose draw masked
    none of its maskable positions gets one (uniformly chosen) masked, so every example trains.
    """
    p = schedule.mask_prob(t).unsqueeze(1)  # (B, 1)
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = (u < p) & maskable
    if at_least_one:
        empty = (masked.sum(1) == 0) & (maskable.sum(1) > 0)
        if empty.any():
            # the maskable position with the smallest u is masked
            score = torch.where(maskable, u, torch.full_like(u, 2.0))
            first = score.argmin(1)
            rows = empty.nonzero(as_tuple=True)[0]
            masked[rows, first[rows]] = True
    x_t = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return x_t, masked


def phase_of(t: torch.Tensor, b1: float, b2: float) -> torch.Tensor:
    """The index into PHASES of each t: 0 = early (t > b2), 1 = mid (b1 < t <= b2), 2 = late (t <= b1)."""
    return torch.where(t > b2, 0, torch.where(t > b1, 1, 2))


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    t_per_token: torch.Tensor,
    n_target_tokens: int | torch.Tensor,
    schedule: NoiseSchedule,
    weighting: str = "elbo",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss over masked positions. logits (N, V), targets (N,), t_per_token (N,).

    Returns (loss, per-token CE) where loss = sum(w(t) * CE) / n_target_tokens.
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    w = schedule.elbo_weight(t_per_token) if weighting == "elbo" else torch.ones_like(ce)
    denom = torch.as_tensor(n_target_tokens, dtype=ce.dtype, device=ce.device).clamp_min(1)
    return (w * ce).sum() / denom, ce.detach()


def diffusion_step_loss(model, batch: dict, cfg: DiffusionConfig, mask_id: int, generator=None, b1b2=(1 / 3, 2 / 3)):
    """Noise a batch, run the adapted denoiser on the masked positions, return (loss, stats).

    `model` is a `methods.Adaptation`; stats holds the denoising loss and its per-phase means
    (phases by the given boundaries, so every method reports comparable per-phase losses).
    """
    input_ids = batch["input_ids"]
    maskable = batch["target_mask"].bool()
    schedule = get_schedule(cfg.schedule)
    t = sample_t(input_ids.shape[0], cfg, generator=generator, device=input_ids.device)
    x_t, masked = forward_process(input_ids, maskable, t, schedule, mask_id, generator=generator)
    logits = model(x_t, t, batch["attention_mask"], batch["instruction_mask"], positions=masked, target_mask=maskable)
    rows = masked.nonzero(as_tuple=True)[0]
    t_tok = t[rows]
    loss, ce = masked_diffusion_loss(logits, input_ids[masked], t_tok, maskable.sum(), schedule, cfg.loss_weighting)
    stats = {"denoise_loss": loss.detach(), "masked_ce": ce.mean() if ce.numel() else ce.sum()}
    phase = phase_of(t_tok, *b1b2)
    for i, name in enumerate(PHASE_METRICS):
        sel = phase == i
        stats[name] = ce[sel].mean() if sel.any() else torch.tensor(float("nan"))
    stats["accuracy_masked"] = (logits.argmax(-1) == input_ids[masked]).float().mean() if ce.numel() else torch.tensor(float("nan"))
    return loss, stats
