"""Absorbing-state (masked) diffusion: noise schedules, the forward process and the training loss.

Time is a float t in (0, 1] for every example: discrete time uses t = k / T with k in {1..T},
continuous time draws t ~ U(eps, 1). A position that may be noised (the target span; the
instruction and input never are) is replaced by [MASK] with probability mask_prob(t).

Loss (as in LLaDA's SFT / MDLM): cross-entropy on the masked target positions, each weighted
by the schedule's ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) (1/t for the linear schedule)
or unweighted, summed and divided by the number of target tokens in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_diffusion.config import DiffusionConfig


@dataclass(frozen=True)
class Schedule:
    """alpha(t) = probability that a maskable token is still clean at time t."""

    name: str

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        if self.name == "linear":
            return t
        if self.name == "cosine":
            return 1.0 - torch.cos(0.5 * math.pi * t)
        if self.name == "loglinear":  # MDLM: sigma(t) = -log(1 - (1 - 1e-3) t)
            return (1.0 - 1e-3) * t
        raise ValueError(f"diffusion.schedule: unknown schedule {self.name!r}; allowed: linear, cosine, loglinear")

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)): the continuous-time ELBO weight of a masked position."""
        if self.name in ("linear", "loglinear"):
            return 1.0 / t
        if self.name == "cosine":
            half = 0.5 * math.pi
            return half * torch.sin(half * t) / (1.0 - torch.cos(half * t)).clamp_min(1e-8)
        raise ValueError(f"diffusion.schedule: unknown schedule {self.name!r}")


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
    schedule: Schedule,
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
    """0 = early (t > b2), 1 = mid (b1 < t <= b2), 2 = late (t <= b1)."""
    return torch.where(t > b2, 0, torch.where(t > b1, 1, 2))


PHASES = ("early", "mid", "late")


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    t_per_token: torch.Tensor,
    n_target_tokens: int | torch.Tensor,
    schedule: Schedule,
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
    schedule = Schedule(cfg.schedule)
    t = sample_t(input_ids.shape[0], cfg, generator=generator, device=input_ids.device)
    x_t, masked = forward_process(input_ids, maskable, t, schedule, mask_id, generator=generator)
    logits = model(x_t, t, batch["attention_mask"], batch["instruction_mask"], positions=masked, target_mask=maskable)
    rows = masked.nonzero(as_tuple=True)[0]
    t_tok = t[rows]
    loss, ce = masked_diffusion_loss(logits, input_ids[masked], t_tok, maskable.sum(), schedule, cfg.loss_weighting)
    stats = {"denoise_loss": loss.detach(), "masked_ce": ce.mean() if ce.numel() else ce.sum()}
    phase = phase_of(t_tok, *b1b2)
    for i, name in enumerate(PHASES):
        sel = phase == i
        stats[f"ce_{name}"] = ce[sel].mean() if sel.any() else torch.tensor(float("nan"))
    stats["accuracy_masked"] = (logits.argmax(-1) == input_ids[masked]).float().mean() if ce.numel() else torch.tensor(float("nan"))
    return loss, stats
