"""Samplers on a fake model forced to a known distribution, and on the tiny real base."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_diffusion.config import DiffusionConfig, SamplingConfig
from lora_diffusion.diffusion import get_schedule
from lora_diffusion.sampling import decode_targets, filter_logits, generate, steps_per_block, time_for_mask_fraction

V, MASK, PAD, CLS, SEP = 40, 4, 0, 2, 3


class Forced(nn.Module):
    """Logits at each masked position: the wanted token with logit `strength[pos]`, the others 0.

    Records every call's x_t and t so tests can check what the sampler did at each step.
    """

    def __init__(self, wanted: torch.Tensor, strength: torch.Tensor, favour_mask: bool = False):
        super().__init__()
        self.wanted, self.strength, self.favour_mask = wanted, strength, favour_mask
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t, attention_mask=None, instruction_mask=None, positions=None, target_mask=None):
        self.calls.append((x_t.clone(), t.clone()))
        logits = torch.zeros(int(positions.sum()), V)
        logits.scatter_(1, self.wanted[positions][:, None], self.strength[positions][:, None])
        if self.favour_mask:
            logits[:, MASK] = 100.0
        return logits


def _batch(span: int = 6, rows: int = 2):
    prompt = [CLS, 10, 11, SEP, 12, 13, 14, SEP]
    L = len(prompt) + span + 1  # one padding column
    ids = torch.full((rows, L), PAD)
    ids[:, : len(prompt)] = torch.tensor(prompt)
    target = torch.zeros(rows, L, dtype=torch.bool)
    target[:, len(prompt) : len(prompt) + span] = True
    ids[target] = 7  # whatever the span holds is ignored
    attn = (torch.arange(L) < len(prompt) + span).long().expand(rows, L).clone()
    instr = torch.zeros_like(target)
    instr[:, 1:3] = True
    wanted = torch.randint(20, 30, (rows, L), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": attn, "target_mask": target, "instruction_mask": instr}, wanted


def _commit_order(model: Forced, out: torch.Tensor, target: torch.Tensor) -> list[list[int]]:
    """For row 0: the span positions committed at each step (from consecutive model inputs and the output)."""
    states = [x_t[0] for x_t, _ in model.calls] + [out[0]]
    return [((a == MASK) & (b != MASK) & target[0]).nonzero().flatten().tolist() for a, b in zip(states, states[1:])]


def test_greedy_low_confidence_fills_expected_tokens_in_confidence_order():
    batch, wanted = _batch(span=6)
    strength = torch.arange(wanted.numel(), dtype=torch.float).reshape(wanted.shape) % 13 + 1.0
    model = Forced(wanted, strength)
    cfg = SamplingConfig(strategy="greedy", remasking="low_confidence", steps=6)
    out = generate(model, batch, cfg, MASK)
    t = batch["target_mask"]
    assert torch.equal(out[t], wanted[t])  # the expected sequence
    assert torch.equal(out[~t], batch["input_ids"][~t])  # prompt and padding untouched
    assert len(model.calls) == 6
    # one position per step, most confident first
    span_pos = t[0].nonzero().flatten().tolist()
    expected = sorted(span_pos, key=lambda p: -float(strength[0, p]))
    order = _commit_order(model, out, t)
    assert all(len(o) == 1 for o in order)
    assert [o[0] for o in order] == expected
    # the model saw the prompt unchanged every step, and t fell with the masked fraction
    for x_t, tt in model.calls:
        assert torch.equal(x_t[~t], batch["input_ids"][~t])
    assert [round(float(c[1][0]), 4) for c in model.calls] == [round(k / 6, 4) for k in range(6, 0, -1)]


def test_steps_fewer_than_positions_commit_evenly_and_fill_everything():
    batch, wanted = _batch(span=7)
    model = Forced(wanted, torch.ones(wanted.shape))
    out = generate(model, batch, SamplingConfig(steps=3), MASK)
    t = batch["target_mask"]
    assert len(model.calls) == 3
    masked_counts = [int((c[0][0] == MASK).sum()) for c in model.calls]
    assert masked_counts == [7, 4, 2]  # 7 = 3 + 2 + 2 (LLaDA: the extra goes first)
    assert not (out == MASK).any() and torch.equal(out[t], wanted[t])


def test_more_steps_than_positions_stops_when_done():
    batch, wanted = _batch(span=3)
    model = Forced(wanted, torch.ones(wanted.shape))
    out = generate(model, batch, SamplingConfig(steps=10), MASK)
    assert len(model.calls) == 3 and not (out == MASK).any()


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_every_target_position_filled_and_prompt_unchanged(strategy, remasking):
    batch, wanted = _batch(span=9, rows=3)
    model = Forced(wanted, torch.rand(wanted.shape) * 3, favour_mask=True)  # [MASK] is never proposed
    cfg = SamplingConfig(strategy=strategy, remasking=remasking, steps=4, block_length=4, temperature=2.0, top_k=5, top_p=0.9)
    out = generate(model, batch, cfg, MASK)
    t = batch["target_mask"]
    assert not (out[t] == MASK).any()
    assert torch.equal(out[~t], batch["input_ids"][~t])


def test_deterministic_under_seed():
    batch, wanted = _batch(span=8)
    flat = torch.zeros(wanted.shape)  # uniform distribution: the draw decides everything
    cfg = SamplingConfig(strategy="sample", remasking="random", steps=4, seed=5)
    a = generate(Forced(wanted, flat), batch, cfg, MASK)
    b = generate(Forced(wanted, flat), batch, cfg, MASK)
    c = generate(Forced(wanted, flat), batch, cfg.model_copy(update={"seed": 6}), MASK)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    batch, wanted = _batch(span=5)
    strength = torch.full(wanted.shape, 2.0)
    greedy = generate(Forced(wanted, strength), batch, SamplingConfig(steps=5), MASK)
    k1 = generate(Forced(wanted, strength), batch, SamplingConfig(strategy="sample", top_k=1, steps=5), MASK)
    p0 = generate(Forced(wanted, strength), batch, SamplingConfig(strategy="sample", top_p=0.01, steps=5), MASK)
    assert torch.equal(greedy, k1) and torch.equal(greedy, p0)


def test_filter_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    p = torch.softmax(logits, -1)[0]  # 0.644, 0.237, 0.087, 0.032
    assert torch.isinf(filter_logits(logits, top_p=float(p[0]) + 0.01)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]


def test_block_mode_fills_blocks_left_to_right():
    batch, wanted = _batch(span=6)
    t = batch["target_mask"]
    pos = t[0].nonzero().flatten()
    strength = torch.ones(wanted.shape)
    strength[:, pos[4:]] = 50.0  # the last block is the most confident, yet must wait
    model = Forced(wanted, strength)
    out = generate(model, batch, SamplingConfig(steps=6, block_length=2), MASK)
    assert torch.equal(out[t], wanted[t])
    assert len(model.calls) == 6
    first_filled = {}
    for step, (x_t, _) in enumerate(model.calls[1:] + [(out, None)]):
        for p in pos.tolist():
            if x_t[0, p] != MASK and p not in first_filled:
                first_filled[p] = step
    steps_by_block = [sorted(first_filled[p] for p in pos[i : i + 2].tolist()) for i in (0, 2, 4)]
    assert steps_by_block == [[0, 1], [2, 3], [4, 5]]
    assert steps_per_block(5, 3) == [2, 2, 1] and steps_per_block(2, 4) == [1, 1, 1, 1]


def test_phase_routing_sees_early_mid_and_late_times():
    batch, wanted = _batch(span=6)
    model = Forced(wanted, torch.ones(wanted.shape))
    generate(model, batch, SamplingConfig(steps=6), MASK, diffusion_cfg=DiffusionConfig(time="continuous"))
    ts = [float(c[1][0]) for c in model.calls]
    assert max(ts) > 2 / 3 and any(1 / 3 < x <= 2 / 3 for x in ts) and min(ts) <= 1 / 3


@pytest.mark.parametrize("schedule", ["linear", "cosine", "loglinear"])
def test_time_inverts_the_schedule(schedule):
    frac = torch.tensor([1.0, 0.75, 0.5, 0.2, 0.01])
    cfg = DiffusionConfig(schedule=schedule, time="continuous")
    t = time_for_mask_fraction(frac, cfg)
    assert torch.allclose(get_schedule(schedule).mask_prob(t), frac.clamp(max=get_schedule(schedule).mask_prob(torch.ones(1))), atol=1e-5)
    discrete = time_for_mask_fraction(frac, DiffusionConfig(schedule=schedule, time="discrete", T=10))
    assert torch.allclose(discrete * 10, torch.round(discrete * 10)) and (discrete >= t - 1e-6).all()


def test_decode_targets_stops_at_sep(tiny_base):
    _, tok = tiny_base
    good, fun = tok.convert_tokens_to_ids(["good", "fun"])
    ids = torch.tensor([[tok.cls_token_id, 9, tok.sep_token_id, good, fun, tok.sep_token_id, good, tok.pad_token_id],
                        [tok.cls_token_id, 9, tok.sep_token_id, tok.sep_token_id, good, good, good, tok.pad_token_id]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 3:7] = True
    assert decode_targets(tok, ids, mask) == ["good fun", ""]


def test_generate_with_lora_diffusion_on_tiny_base(tiny_base, tiny_config):
    from lora_diffusion.collator import Collator
    from lora_diffusion.methods import build_method

    denoiser, tok = tiny_base
    model = build_method(tiny_config.method, denoiser).eval()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    collate = Collator(tok, 48, 5)
    batch = collate([{"instruction_ids": enc("classify"), "context_ids": enc(text), "target_ids": []}
                     for text in ("a good film", "the worst movie of the year")])
    cfg = SamplingConfig(strategy="sample", steps=3, top_k=10)
    out = generate(model, batch, cfg, tok.mask_token_id)
    t = batch["target_mask"]
    assert out.shape == batch["input_ids"].shape
    assert not (out[t] == tok.mask_token_id).any()
    assert torch.equal(out[~t], batch["input_ids"][~t])
    assert torch.equal(out, generate(model, batch, cfg, tok.mask_token_id))
    assert math.isfinite(float(out.float().sum()))
