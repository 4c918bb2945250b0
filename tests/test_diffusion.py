"""The absorbing-state forward process, the schedules' ELBO weights, the loss and time sampling."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from lora_diffusion import diffusion
from lora_diffusion.config import PHASE_METRICS, PHASES, DiffusionConfig
from lora_diffusion.diffusion import (
    diffusion_step_loss,
    forward_process,
    get_schedule,
    masked_diffusion_loss,
    phase_of,
    sample_t,
)

SCHEDULES = ("linear", "cosine", "loglinear")
MASK = 4


@pytest.mark.parametrize("name", SCHEDULES)
def test_masked_fraction_matches_the_schedule(name):
    schedule = get_schedule(name)
    g = torch.Generator().manual_seed(0)
    ts = torch.tensor([0.05, 0.2, 0.5, 0.8, 1.0])
    rows, L = 400, 50
    t = ts.repeat_interleave(rows)
    ids = torch.randint(10, 100, (len(t), L), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    _, masked = forward_process(ids, maskable, t, schedule, MASK, generator=g, at_least_one=False)
    for i, tv in enumerate(ts):
        p = float(schedule.mask_prob(tv))
        frac = masked[i * rows : (i + 1) * rows].float().mean().item()
        n = rows * L
        sigma = math.sqrt(max(p * (1 - p), 1e-6) / n)
        assert abs(frac - p) < 5 * sigma + 1e-9, (name, float(tv), frac, p)
    # the schedules themselves
    expected = {"linear": ts, "cosine": 1 - torch.cos(math.pi / 2 * ts), "loglinear": (1 - 1e-3) * ts}[name]
    torch.testing.assert_close(schedule.mask_prob(ts), expected)


def test_prompt_positions_are_never_masked():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 100, (64, 20), generator=g)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 12:] = True  # the target span
    maskable[::2, 18:] = False  # some rows shorter
    for name in SCHEDULES:
        t = torch.rand(64, generator=g) * 0.999 + 0.001
        t[:8] = 1.0
        x_t, masked = forward_process(ids, maskable, t, get_schedule(name), MASK, generator=g)
        assert not (masked & ~maskable).any()
        assert torch.equal(x_t[~maskable], ids[~maskable])
        assert (x_t[masked] == MASK).all() and torch.equal(x_t[~masked], ids[~masked])
    x_t, masked = forward_process(ids, maskable, torch.ones(64), get_schedule("linear"), MASK, generator=g)
    assert torch.equal(masked, maskable)  # t = 1 under the linear schedule: every target token masked


def test_at_least_one_masked_position_per_example():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, 100, (200, 10), generator=g)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 6:] = True
    maskable[0] = False  # an example with nothing maskable stays untouched
    t = torch.full((200,), 1e-3)
    _, masked = forward_process(ids, maskable, t, get_schedule("linear"), MASK, generator=g, at_least_one=True)
    assert (masked[1:].sum(1) >= 1).all() and masked[0].sum() == 0
    assert not (masked & ~maskable).any()
    _, masked = forward_process(ids, maskable, t, get_schedule("linear"), MASK, generator=g, at_least_one=False)
    assert (masked.sum(1) == 0).sum() > 150  # without it, almost every example would have no masked token


@pytest.mark.parametrize("name", SCHEDULES)
def test_elbo_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    schedule = get_schedule(name)
    t = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    h = 1e-6
    derivative = (schedule.mask_prob(t + h) - schedule.mask_prob(t - h)) / (2 * h)  # = -alpha'(t)
    torch.testing.assert_close(schedule.elbo_weight(t), derivative / schedule.mask_prob(t), rtol=1e-5, atol=1e-6)
    if name in ("linear", "loglinear"):
        torch.testing.assert_close(schedule.elbo_weight(t), 1.0 / t)


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_inverse_inverts_the_mask_probability(name):
    schedule = get_schedule(name)
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(schedule.time_for_mask_prob(schedule.mask_prob(t)), t, rtol=0, atol=1e-7)
    top = schedule.mask_prob(torch.ones(1, dtype=torch.float64))  # the most a schedule masks (loglinear: 1 - 1e-3)
    p = torch.linspace(0.0, 1.0, 101, dtype=torch.float64) * top
    torch.testing.assert_close(schedule.mask_prob(schedule.time_for_mask_prob(p)), p, rtol=0, atol=1e-7)
    beyond = schedule.time_for_mask_prob(torch.tensor([top.item() + 1e-4, 1.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(beyond, torch.ones(3, dtype=torch.float64))  # more than it ever masks: t = 1
    assert (schedule.time_for_mask_prob(torch.tensor([-0.5, 0.0])) == 0).all()


def test_the_registry_holds_the_schedules_the_config_allows():
    allowed = get_args(DiffusionConfig.model_fields["schedule"].annotation)
    assert tuple(diffusion.SCHEDULES) == allowed == SCHEDULES
    assert all(cls.name == name and isinstance(get_schedule(name), cls) for name, cls in diffusion.SCHEDULES.items())


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="diffusion.schedule: unknown schedule 'sqrt'; allowed: linear, cosine, loglinear"):
        get_schedule("sqrt").mask_prob(torch.tensor([0.5]))


def test_loss_is_weighted_and_normalised_per_target_token():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2, 1])
    t = torch.tensor([0.5, 0.25, 1.0])
    ce = [math.log(math.exp(2) + 2) - 2, math.log(math.e + 2), math.log(3)]
    loss, per_token = masked_diffusion_loss(logits, targets, t, 10, get_schedule("linear"), "elbo")
    assert loss.item() == pytest.approx((2 * ce[0] + 4 * ce[1] + 1 * ce[2]) / 10, rel=1e-6)
    torch.testing.assert_close(per_token, torch.tensor(ce))
    loss, _ = masked_diffusion_loss(logits, targets, t, 10, get_schedule("linear"), "none")
    assert loss.item() == pytest.approx(sum(ce) / 10, rel=1e-6)


def test_diffusion_step_loss_divides_by_the_number_of_target_tokens():
    V, B, L = 11, 6, 9

    class Uniform(torch.nn.Module):  # zero logits: CE = log V at every masked position
        def forward(self, x_t, t, attention_mask, instruction_mask, positions, target_mask=None):
            self.seen = (x_t, t, positions)
            return torch.zeros(int(positions.sum()), V, requires_grad=True)

    model = Uniform()
    ids = torch.randint(5, V, (B, L))
    target = torch.zeros(B, L, dtype=torch.bool)
    target[:, 4:] = True
    target[0, 7:] = False
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.long), "target_mask": target,
             "instruction_mask": torch.zeros(B, L, dtype=torch.bool)}
    cfg = DiffusionConfig(time="continuous")
    loss, stats = diffusion_step_loss(model, batch, cfg, MASK, generator=torch.Generator().manual_seed(0))
    x_t, t, masked = model.seen
    expected = (masked.sum(1).float() / t).sum().item() * math.log(V) / target.sum().item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert not (masked & ~target).any() and (x_t[masked] == MASK).all()
    assert set(stats) >= {"denoise_loss", "ce_early", "ce_mid", "ce_late", "accuracy_masked"}
    assert PHASES == ("early", "mid", "late") and PHASE_METRICS == ("ce_early", "ce_mid", "ce_late")


def test_sample_t_ranges():
    g = torch.Generator().manual_seed(0)
    t = sample_t(20_000, DiffusionConfig(time="discrete", T=100), generator=g)
    k = t * 100
    torch.testing.assert_close(k, k.round())
    assert t.min().item() == pytest.approx(0.01) and t.max().item() == 1.0
    assert len(k.round().unique()) == 100
    t = sample_t(20_000, DiffusionConfig(time="discrete", T=1), generator=g)
    assert (t == 1.0).all()
    cfg = DiffusionConfig(time="continuous", eps=0.01)
    t = sample_t(20_000, cfg, generator=g)
    assert t.min().item() >= 0.01 and t.max().item() <= 1.0
    assert t.min().item() < 0.02 and t.max().item() > 0.99


def test_phase_boundaries():
    t = torch.tensor([0.01, 1 / 3, 0.34, 2 / 3, 0.67, 1.0])
    assert phase_of(t, 1 / 3, 2 / 3).tolist() == [2, 2, 1, 1, 0, 0]  # late t <= b1, mid b1 < t <= b2, early t > b2
    k = torch.arange(1, 101).float() / 100  # discrete t = k / T lands on the boundaries exactly
    phases = phase_of(k, 0.3, 0.6)
    assert (phases[:30] == 2).all() and (phases[30:60] == 1).all() and (phases[60:] == 0).all()
