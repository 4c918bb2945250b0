"""Every adaptation method on the tiny built-in base: what trains, one step, save/load, parameter counts;
then LoRA-Diffusion's own properties (identity at init, phase routing, FiLM, rank, regularisers,
frozen base without a graph, composition) and prefix tuning's parity with the base attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_diffusion.adapter import load_adapter, save_adapter
from lora_diffusion.config import METHOD_NAMES, load_config
from lora_diffusion.methods import build_method, count_parameters
from lora_diffusion.model import load_base, sinusoidal, tiny_vocab

TINY = ["model.base=builtin:tiny", "model.max_length=48"]


def make(method: str, *overrides: str):
    cfg = load_config(None, [*TINY, f"method.name={method}", *overrides])
    denoiser, _ = load_base(cfg.model)
    return cfg, denoiser


def fixed_batch(B: int = 4, L: int = 12, seed: int = 1):
    """A noised batch with fixed t and mask: prompt = first 5 tokens (first 3 instruction), target = the rest."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(5, len(tiny_vocab()), (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[0, L - 2 :] = 0  # one padded row
    instruction = torch.zeros(B, L, dtype=torch.bool)
    instruction[:, 1:4] = True
    positions = torch.zeros(B, L, dtype=torch.bool)
    positions[:, 5:] = torch.rand(B, L - 5, generator=g) < 0.6
    positions[:, 5] = True
    positions &= attn.bool()
    x_t = torch.where(positions, torch.full_like(x0, 4), x0)  # 4 = [MASK] in the tiny vocabulary
    t = torch.tensor([0.9, 0.5, 0.2, 0.7])[:B]
    target = attn.bool() & (torch.arange(L) >= 5)[None, :]
    return x0, x_t, t, attn, instruction, positions, target


def masked_loss(model, batch):
    x0, x_t, t, attn, instruction, positions, target = batch
    logits = model(x_t, t, attn, instruction, positions, target_mask=target)
    return F.cross_entropy(logits, x0[positions])


# --------------------------------------------------------------------------- hand counts on builtin:tiny

V, D, N_LAYERS, FFN, MAX_POS, TYPES, TIME_DIM = len(tiny_vocab()), 64, 2, 128, 512, 2, 128


def base_total() -> int:
    embeddings = V * D + MAX_POS * D + TYPES * D + 2 * D
    layer = 4 * (D * D + D) + 2 * D + (D * FFN + FFN) + (FFN * D + D) + 2 * D
    head = (D * D + D) + 2 * D + V  # transform dense + LayerNorm + decoder bias (decoder weight tied to embeddings)
    time = (TIME_DIM * D + D) + (D * D + D)
    return embeddings + N_LAYERS * layer + head + time


def lora_diffusion_count(ranks=(64, 32, 8), k=2, dt=64, dc=64, film=True, span_positions=64) -> int:
    encoder = (D * dc + dc) + (dc * dc + dc) + span_positions * D  # condition MLP + span-offset embedding
    module = lambda r: (D + dt) * r + r * D + ((dc * r + r) + (dc * D + D) if film else 0)  # noqa: E731
    return encoder + k * sum(module(r) for r in ranks)


HAND_TRAINABLE = {
    "lora_diffusion": lora_diffusion_count(),
    "weight_lora": N_LAYERS * 2 * (8 * D + D * 8),  # r=8 on query and value: A (r x d) + B (d x r)
    "adapters": N_LAYERS * (2 * ((D * 64 + 64) + (64 * D + D)) + 2 * 2 * D),  # 2 bottlenecks + 2 LayerNorms per layer
    "prefix_tuning": 16 * N_LAYERS * 2 * D,  # 16 keys + 16 values per layer
    "bitfit": D + N_LAYERS * (4 * D + D + FFN + D + D),  # embedding LN bias; q,k,v,o, LN, FFN in/out, LN biases
    "full_ft": base_total(),
}
# parameters a method adds to the base (the rest of what it trains are base parameters: LayerNorms, biases, all)
ADDED = {**HAND_TRAINABLE, "adapters": HAND_TRAINABLE["adapters"] - N_LAYERS * 2 * 2 * D, "bitfit": 0, "full_ft": 0}


def intended(method: str, name: str) -> bool:
    """Should parameter `name` of an Adaptation train under `method`?"""
    if method == "lora_diffusion":
        return name.startswith(("encoder.", "banks.", "span_offset."))
    if method == "weight_lora":
        return ".lora_A.default." in name or ".lora_B.default." in name
    if method == "adapters":
        return ".adapter." in name or (
            ".encoder.layer." in name and name.endswith(("output.LayerNorm.weight", "output.LayerNorm.bias"))
        )
    if method == "prefix_tuning":
        return name.startswith("prefix.")
    if method == "bitfit":
        return name.startswith("denoiser.mlm.bert.") and name.endswith(".bias")
    return True  # full_ft


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_trains_exactly_what_it_should_and_counts_match_by_hand(method):
    cfg, denoiser = make(method)
    assert count_parameters(denoiser) == base_total()
    a = build_method(cfg.method, denoiser)
    names = [n for n, _ in a.named_parameters()]
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    expected = {n for n in names if intended(method, n)}
    assert expected and trainable == expected
    if method == "weight_lora":
        assert all(".attention.self.query." in n or ".attention.self.value." in n for n in trainable)
    if method == "adapters":
        assert not any("embeddings.LayerNorm" in n or n.startswith("denoiser.mlm.cls") for n in trainable)

    counts = a.param_counts()
    assert counts["trainable"] == HAND_TRAINABLE[method]
    assert counts["total"] == base_total() + ADDED[method]
    if method == "lora_diffusion":
        assert counts["encoder"] == (D * 64 + 64) + (64 * 64 + 64)
        assert counts["span_offset"] == 64 * D
        assert counts["adapters"] + counts["encoder"] + counts["span_offset"] == counts["trainable"]
        assert [counts[f"adapters_{p}"] for p in ("early", "mid", "late")] == [
            2 * ((D + 64) * r + r * D + (64 * r + r) + (64 * D + D)) for r in (64, 32, 8)
        ]


@pytest.mark.parametrize(
    "method,overrides,trainable",
    [
        ("lora_diffusion", ["method.lora_diffusion.film=false", "method.lora_diffusion.k=1",
                            "method.lora_diffusion.rank_early=4", "method.lora_diffusion.rank_mid=3",
                            "method.lora_diffusion.rank_late=2", "method.lora_diffusion.time_dim=16",
                            "method.lora_diffusion.instruction_dim=8", "method.lora_diffusion.span_positions=0"],
         lora_diffusion_count((4, 3, 2), k=1, dt=16, dc=8, film=False, span_positions=0)),
        ("weight_lora", ["method.weight_lora.r=4", "method.weight_lora.target_modules=[query,key,value,dense]"],
         # q, k, v, attention.output.dense, intermediate.dense, output.dense per layer + the head's transform.dense
         N_LAYERS * (3 * (4 * D + D * 4) + (4 * D + D * 4) + (4 * D + FFN * 4) + (4 * FFN + D * 4)) + (4 * D + D * 4)),
        ("adapters", ["method.adapters.bottleneck=8", "method.adapters.train_layernorm=false"],
         N_LAYERS * 2 * ((D * 8 + 8) + (8 * D + D))),
        ("prefix_tuning", ["method.prefix_tuning.num_prefix=5", "method.prefix_tuning.reparam_hidden=32"],
         5 * D + (D * 32 + 32) + (32 * N_LAYERS * 2 * D + N_LAYERS * 2 * D)),
    ],
)
def test_non_default_settings_counts(method, overrides, trainable):
    cfg, denoiser = make(method, *overrides)
    a = build_method(cfg.method, denoiser)
    assert a.param_counts()["trainable"] == trainable
    assert a.param_counts()["total"] == base_total() + trainable


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_one_step_lowers_loss_and_save_load_is_bit_identical(method, tmp_path):
    cfg, denoiser = make(method)
    torch.manual_seed(0)
    a = build_method(cfg.method, denoiser).train()
    batch = fixed_batch()
    opt = torch.optim.Adam([p for p in a.parameters() if p.requires_grad], lr=1e-3)
    before = masked_loss(a, batch)
    before.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        after = masked_loss(a, batch)
    assert after.item() < before.item()

    a.eval()
    x0, x_t, t, attn, instruction, positions, target = batch
    with torch.no_grad():
        ref_pos = a(x_t, t, attn, instruction, positions, target_mask=target)
        ref_all = a(x_t, t, attn, instruction, None, target_mask=target)
    save_adapter(a, tmp_path / "adapter", cfg.model, cfg.method)
    loaded, _, meta = load_adapter(str(tmp_path / "adapter"))  # a fresh base from the recorded config
    assert meta["method"] == method and meta["param_counts"] == a.param_counts()
    with torch.no_grad():
        assert torch.equal(loaded(x_t, t, attn, instruction, positions, target_mask=target), ref_pos)
        assert torch.equal(loaded(x_t, t, attn, instruction, None, target_mask=target), ref_all)


def test_unsupported_architectures_and_bad_targets_are_refused():
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from lora_diffusion.model import Denoiser

    mlm = DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    cfg = load_config(None, TINY)
    for method in ("adapters", "prefix_tuning"):
        cfg.method.name = method
        with pytest.raises(ValueError, match=f"method {method}: DistilBertForMaskedLM is not supported"):
            build_method(cfg.method, Denoiser(mlm, 16))

    cfg, denoiser = make("weight_lora", "method.weight_lora.target_modules=[query,qkv_proj]")
    with pytest.raises(ValueError, match=r"method.weight_lora.target_modules: \['qkv_proj'\].*allowed.*query"):
        build_method(cfg.method, denoiser)

    cfg, denoiser = make("adapters")
    build_method(cfg.method, denoiser)
    with pytest.raises(ValueError, match="already carries"):
        build_method(cfg.method, denoiser)


# --------------------------------------------------------------------------- prefix tuning


@pytest.mark.parametrize("mask", ["padded", "none"])
def test_prefix_tuning_with_prefixes_masked_out_equals_the_base(mask):
    cfg, denoiser = make("prefix_tuning", "method.prefix_tuning.reparam_hidden=16")
    _, x_t, t, attn, instruction, _, target = fixed_batch()
    attn = attn if mask == "padded" else None
    with torch.no_grad():
        base = denoiser(x_t, t, attn)
        a = build_method(cfg.method, denoiser).eval()
        a.set_prefix_enabled(False)
        off = a(x_t, t, attn, instruction, target_mask=target)
        a.set_prefix_enabled(True)
        on = a(x_t, t, attn, instruction, target_mask=target)
    torch.testing.assert_close(off, base, rtol=0, atol=1e-5)
    assert (on - base).abs().max() > 1e-3  # the prefixes do act when visible


# --------------------------------------------------------------------------- LoRA-Diffusion


def lora_diffusion(*overrides: str, denoiser=None):
    cfg = load_config(None, [*TINY, "method.name=lora_diffusion", *overrides])
    if denoiser is None:
        denoiser, _ = load_base(cfg.model)
    return build_method(cfg.method, denoiser), denoiser


def perturb(module, std: float = 0.1, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_untrained_lora_diffusion_is_bit_for_bit_the_base():
    cfg = load_config(None, TINY)
    denoiser, _ = load_base(cfg.model)
    _, x_t, t, attn, instruction, positions, target = fixed_batch()
    with torch.no_grad():
        base_all = denoiser(x_t, t, attn)
        base_pos = denoiser(x_t, t, attn, positions=positions)
        a, _ = lora_diffusion(denoiser=denoiser)
        assert torch.equal(a(x_t, t, attn, instruction, None, target_mask=target), base_all)
        assert torch.equal(a(x_t, t, attn, instruction, positions, target_mask=target), base_pos)


@pytest.mark.parametrize("b1,b2", [(1 / 3, 2 / 3), (0.1, 0.9), (0.5, 0.6), (0.25, 0.3)])
@pytest.mark.parametrize("with_positions", [False, True])
def test_phase_routing_sends_every_t_to_its_bank(b1, b2, with_positions):
    a, _ = lora_diffusion(f"method.lora_diffusion.b1={b1}", f"method.lora_diffusion.b2={b2}",
                          "method.lora_diffusion.rank_early=4", "method.lora_diffusion.rank_mid=4",
                          "method.lora_diffusion.rank_late=4")
    ts = torch.tensor([0.01, b1, min(b1 + 0.01, (b1 + b2) / 2), (b1 + b2) / 2, b2, b2 + 0.01, 0.95, 1.0], dtype=torch.float32)
    B, L = len(ts), 6
    x_t = torch.randint(5, 100, (B, L))
    positions = torch.zeros(B, L, dtype=torch.bool)
    positions[:, 2:] = True
    target = positions.clone()
    positions[0, 2] = False  # rows with different numbers of positions
    seen = {(p, i): [] for p in range(3) for i in range(2)}
    hooks = [
        g.register_forward_hook(lambda m, args, out, key=(p, i): seen[key].append(args[1].detach().clone()))
        for p, bank in enumerate(a.banks) for i, g in enumerate(bank)
    ]
    with torch.no_grad():
        a(x_t, ts, None, None, positions if with_positions else None, target_mask=target)
    for h in hooks:
        h.remove()
    candidates = sinusoidal(ts, a.settings.time_dim)
    rows_per_example = positions.sum(1) if with_positions else torch.full((B,), L)
    for p in range(3):
        expected = sorted(
            float(tv) for tv, n in zip(ts, rows_per_example)
            for _ in range(int(n)) if (tv > b2 if p == 0 else (b1 < tv <= b2) if p == 1 else tv <= b1)
        )
        for i in range(2):  # both modules of the bank see exactly the same rows
            got_emb = torch.cat(seen[(p, i)]) if seen[(p, i)] else torch.zeros(0, candidates.shape[1])
            got = sorted(float(ts[(candidates - row).abs().amax(-1).argmin()]) for row in got_emb)  # t of each row
            assert got == expected, (p, i)


def test_film_gamma_and_beta_follow_the_instruction():
    a, _ = lora_diffusion("method.lora_diffusion.rank_early=4", "method.lora_diffusion.condition=instruction")
    perturb(a)
    x = torch.randint(60, 200, (2, 10))
    instruction = torch.zeros(2, 10, dtype=torch.bool)
    instruction[:, 1:4] = True
    x[1, 1:4] = x[0, 1:4] + 1  # a different instruction in row 1
    x[1, 4:] = x[0, 4:]
    c = a.encoder(a.mean_instruction_embedding(x, instruction))
    g = a.banks[0][0]
    assert not torch.allclose(g.gamma(c[0]), g.gamma(c[1]))
    assert not torch.allclose(g.beta(c[0]), g.beta(c[1]))
    h = torch.randn(1, a.denoiser.hidden_size).expand(2, -1)
    t = torch.tensor([0.9, 0.9])
    delta = a.delta(h, t, c)
    assert not torch.allclose(delta[0], delta[1])
    # tokens outside the instruction do not move c
    y = x.clone()
    y[:, 5:] = 7
    torch.testing.assert_close(a.encoder(a.mean_instruction_embedding(y, instruction)), c)


def two_prompts_differing_in_the_input():
    """Two rows: the same instruction (positions 1-3) and target span (7-9), different input tokens (5)."""
    x = torch.randint(60, 200, (2, 10))
    x[:, 0], x[:, 4], x[:, 6] = 2, 3, 3  # [CLS] instruction [SEP] input [SEP] span
    x[1] = x[0]
    x[1, 5] = x[0, 5] + 1  # only the input differs
    x[:, 7:] = 4  # the target span, all [MASK]
    instruction = torch.zeros(2, 10, dtype=torch.bool)
    instruction[:, 1:4] = True
    target = torch.zeros(2, 10, dtype=torch.bool)
    target[:, 7:] = True
    return x, instruction, target


@pytest.mark.parametrize("condition", ["prompt", "instruction"])
def test_condition_sees_the_input_only_when_it_encodes_the_prompt(condition):
    a, _ = lora_diffusion("method.lora_diffusion.rank_early=4", f"method.lora_diffusion.condition={condition}")
    perturb(a)
    x, instruction, target = two_prompts_differing_in_the_input()
    t = torch.tensor([1.0, 1.0])
    with torch.no_grad():
        h = a.denoiser.hidden(x, t, None)
        c = a.encoder(a.condition_input(x, h, None, instruction, target))
        g = a.banks[0][0]
        gamma, beta = g.gamma(c), g.beta(c)
        logits = a(x, t, None, instruction, target, target_mask=target)
    if condition == "prompt":  # gamma, beta and the label position's output follow the input
        assert not torch.allclose(gamma[0], gamma[1]) and not torch.allclose(beta[0], beta[1])
        assert not torch.allclose(logits[0], logits[3])
    else:  # one instruction string: one c for both rows, whatever the input says
        torch.testing.assert_close(gamma[0], gamma[1], rtol=0, atol=0)
        torch.testing.assert_close(beta[0], beta[1], rtol=0, atol=0)


def test_adjacent_target_positions_get_different_adapter_inputs():
    a, _ = lora_diffusion("method.lora_diffusion.rank_early=4", "method.lora_diffusion.span_positions=8")
    perturb(a)
    x, instruction, target = two_prompts_differing_in_the_input()
    offsets = a.span_offsets(target, x.shape[1], x.device)
    assert offsets[0, 7:].tolist() == [0, 1, 2] and offsets[0, :7].tolist() == [0] * 7
    seen = []
    a.banks[0][0].register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    h = torch.randn(1, a.denoiser.hidden_size).expand(3, -1)  # the same hidden state at three span positions
    with torch.no_grad():
        a.delta(h, torch.ones(3), a.encoder(torch.zeros(1, a.denoiser.hidden_size)).expand(3, -1), offsets[0, 7:])
    g_in = seen[0]
    assert not torch.allclose(g_in[0], g_in[1]) and not torch.allclose(g_in[1], g_in[2])
    # the offset enters g_i's input only: with it off, identical hidden states give identical inputs
    b, _ = lora_diffusion("method.lora_diffusion.rank_early=4", "method.lora_diffusion.span_positions=0")
    assert b.span_offsets(target, x.shape[1], x.device) is None
    with pytest.raises(ValueError, match="target_mask"):
        a(x, torch.ones(2), None, instruction, target)  # no target_mask: a clear error, not a silent default


@pytest.mark.parametrize("film", [True, False])
def test_effective_rank_of_one_phase_is_at_most_r(film):
    r = 3
    a, _ = lora_diffusion(f"method.lora_diffusion.film={str(film).lower()}", "method.lora_diffusion.k=1",
                          f"method.lora_diffusion.rank_early={r}")
    a = a.double()
    perturb(a, std=0.3)
    n, d = 200, a.denoiser.hidden_size
    h = torch.randn(n, d, dtype=torch.float64)
    t = torch.full((n,), 0.9, dtype=torch.float64)  # early phase
    c = a.encoder(torch.randn(1, d, dtype=torch.float64)).expand(n, -1)  # one fixed instruction
    with torch.no_grad():
        delta = a.delta(h, t, c)
    rank = int(torch.linalg.matrix_rank(delta))
    bound = r + 1 if film else r  # beta(c) adds one constant direction
    assert 0 < rank <= bound
    assert rank >= r  # and the bound is reached (random weights): the test is not vacuous


def test_regularisers_equal_hand_computed_values():
    a, _ = lora_diffusion("method.lora_diffusion.rank_early=2", "method.lora_diffusion.rank_mid=2",
                          "method.lora_diffusion.rank_late=2", "method.lora_diffusion.lambda_rank=0.01",
                          "method.lora_diffusion.lambda_orth=0.1")
    with torch.no_grad():
        for bank in a.banks:
            for g in bank:
                g.up.weight.zero_()
                g.down.weight.zero_()
        A0, A1 = a.banks[0][0].up.weight, a.banks[0][1].up.weight  # W_A: (d, r)
        A0[0, 0], A0[1, 1] = 3.0, 4.0  # singular values 3, 4
        A1[0, 0], A1[1, 0], A1[1, 1] = 1.0, 2.0, 1.0  # [[1, 0], [2, 1]]: singular values sqrt(2) +- 1
        a.banks[1][0].down.weight[0, 0] = -2.0
    # A0^T A1 = [[3, 0], [8, 4]] -> ||.||_F^2 = 89, both ordered pairs
    r = a.regularizers()
    assert r["reg_rank"].item() == pytest.approx(7.0 + 2 * math.sqrt(2) + 2.0, abs=1e-5)
    assert r["reg_orth"].item() == pytest.approx(178.0, abs=1e-4)
    assert a.regularization_loss().item() == pytest.approx(0.01 * (9 + 2 * math.sqrt(2)) + 0.1 * 178.0, rel=1e-6)

    a.settings.rank_norm = "frobenius"
    n_matrices = 3 * 2 * 2
    assert a.regularizers()["reg_rank"].item() == pytest.approx(5.0 + math.sqrt(6) + 2.0, abs=1e-6 * n_matrices + 1e-6)

    # random matrices against an SVD and loops by hand (numpy)
    perturb(a, std=0.5)
    ups = [[g.up.weight.detach().double().numpy() for g in bank] for bank in a.banks]
    downs = [[g.down.weight.detach().double().numpy() for g in bank] for bank in a.banks]
    nuc = lambda w: np.linalg.svd(w, compute_uv=False).sum()  # noqa: E731
    fro = lambda w: math.sqrt((w**2).sum())  # noqa: E731
    orth = sum(((ui.T @ uj) ** 2).sum() for bank in ups for i, ui in enumerate(bank) for j, uj in enumerate(bank) if i != j)
    for norm, fn in (("nuclear", nuc), ("frobenius", fro)):
        a.settings.rank_norm = norm
        want = sum(fn(w) for bank in ups + downs for w in bank)
        assert a.regularizers()["reg_rank"].item() == pytest.approx(want, rel=1e-5)
    assert a.regularizers()["reg_orth"].item() == pytest.approx(orth, rel=1e-5)


def test_base_gets_no_gradient_and_no_autograd_graph():
    a, denoiser = lora_diffusion()
    perturb(a)
    seen = []
    denoiser.backbone.register_forward_hook(lambda m, args, out: seen.append(out.last_hidden_state.requires_grad))
    original_hidden = denoiser.hidden

    def hidden(*args, **kwargs):
        h = original_hidden(*args, **kwargs)
        seen.append(h.requires_grad)
        return h

    denoiser.hidden = hidden
    a.train()
    loss = masked_loss(a, fixed_batch()) + a.regularization_loss()
    loss.backward()
    assert seen == [False, False]
    assert all(not p.requires_grad and p.grad is None for p in denoiser.parameters())
    assert all(p.grad is not None for n, p in a.named_parameters() if n.startswith("banks.") and ".up." in n)
    assert not denoiser.training  # a.train() keeps the frozen base in eval mode (no dropout)


def test_composed_with_one_adapter_equals_that_adapter_and_router_weights_sum_to_one():
    from lora_diffusion.methods.lora_diffusion import ComposedLoRADiffusion

    a, denoiser = lora_diffusion()
    perturb(a)
    a.eval()
    _, x_t, t, attn, instruction, positions, target = fixed_batch()
    composed = ComposedLoRADiffusion([a]).eval()
    with torch.no_grad():
        torch.testing.assert_close(composed(x_t, t, attn, instruction, positions, target_mask=target), a(x_t, t, attn, instruction, positions, target_mask=target),
                                   rtol=0, atol=0)
        torch.testing.assert_close(composed(x_t, t, attn, instruction, None, target_mask=target), a(x_t, t, attn, instruction, None, target_mask=target),
                                   rtol=0, atol=0)

    others = [lora_diffusion(denoiser=denoiser)[0] for _ in range(2)]
    three = ComposedLoRADiffusion([a, *others])
    mean = a.mean_instruction_embedding(x_t, instruction)
    torch.testing.assert_close(three.weights(mean), torch.full((4, 3), 1 / 3))  # uniform at start
    perturb(three.router, std=1.0)
    w = three.weights(mean)
    assert (w > 0).all() and not torch.allclose(w, torch.full_like(w, 1 / 3))
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    assert [n for n, p in three.named_parameters() if p.requires_grad] == ["router.weight", "router.bias"]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_under_bf16_autocast(method):
    """train.precision=bf16 runs the step under torch.autocast: mixed dtypes must not break any method."""
    cfg, denoiser = make(method, "method.prefix_tuning.reparam_hidden=16")
    a = build_method(cfg.method, denoiser).train()
    x0, x_t, t, attn, instruction, positions, target = fixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = a(x_t, t, attn, instruction, positions, target_mask=target)
        everywhere = a(x_t, t, attn, instruction, None, target_mask=target)
    loss = F.cross_entropy(logits.float(), x0[positions]) + everywhere.float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in a.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_a_method_registration_is_checked():
    from lora_diffusion.methods import METHODS, MethodSettings, get_method, register_method

    class Empty(MethodSettings):
        pass

    with pytest.raises(ValueError, match="method name 'bitfit' is registered twice"):
        register_method("bitfit", Empty, "lora_diffusion.methods.bitfit:build", 1e-3)
    with pytest.raises(ValueError, match="build 'nowhere' must be 'module:function'"):
        register_method("x", Empty, "nowhere", 1e-3)
    with pytest.raises(ValueError, match="default_lr 0 must be > 0"):
        register_method("x", Empty, "m:f", 0)
    with pytest.raises(ValueError, match="settings must be a MethodSettings class"):
        register_method("x", dict, "m:f", 1e-3)
    assert "x" not in METHODS
    with pytest.raises(ValueError, match="method.name: unknown method 'lora'; allowed: lora_diffusion, weight_lora, adapters"):
        get_method("lora")
    assert {n: m.default_lr for n, m in METHODS.items()} == {
        "lora_diffusion": 5e-3, "weight_lora": 2e-3, "adapters": 1e-3, "prefix_tuning": 5e-3, "bitfit": 3e-3, "full_ft": 1e-4}


def test_the_registry_and_the_config_import_no_torch():
    """Every method's settings are read without torch: the sweep driver and its checks stay light."""
    import subprocess
    import sys

    code = ("import sys, lora_diffusion.config, lora_diffusion.search_space; "
            "print(len(lora_diffusion.config.METHOD_NAMES), 'torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["6", "False"]


# --------------------------------------------------------------------------- a new method is one file plus its settings

LAYERNORM_SETTINGS = '''
"""A throw-away method's settings: only the LayerNorms train."""
from pydantic import Field

from lora_diffusion.methods import MethodSettings, register_method


class LayerNormOnlyConfig(MethodSettings):
    include_embeddings: bool = True  # also the embeddings' LayerNorm
    init_scale: float = Field(1.0, gt=0)


register_method(name="layernorm_only", settings=LayerNormOnlyConfig, build="lora_diffusion.methods.layernorm_only:build",
                default_lr=4e-3)
'''

LAYERNORM_METHOD = '''
"""A throw-away method: only the LayerNorms of the base train."""
import torch
from torch import nn

from lora_diffusion.methods.core import Adaptation, freeze


class LayerNormOnly(Adaptation):
    method_name = "layernorm_only"


def build(denoiser, settings):
    freeze(denoiser)
    for name, module in denoiser.mlm.named_modules():
        if isinstance(module, nn.LayerNorm) and (settings.include_embeddings or "embeddings" not in name):
            with torch.no_grad():
                module.weight.mul_(settings.init_scale)
            for p in module.parameters():
                p.requires_grad_(True)
    return LayerNormOnly(denoiser, settings)
'''

# Run in a fresh process: the config's `method:` section is built from the registry when config.py is first imported.
LAYERNORM_RUN = '''
import json, sys
from pathlib import Path

import lora_diffusion.methods as methods

methods.__path__.append(sys.argv[1])  # a folder read the way methods/ is
methods.discover()
from lora_diffusion.config import METHOD_NAMES, ConfigError, load_config

out = {"names": list(METHOD_NAMES), "errors": []}
for bad in ("method.layernorm_only.init_scale=0", "method.layernorm_only.bogus=1", "method.name=layernorm"):
    try:
        load_config(None, [bad])
    except ConfigError as e:
        out["errors"].append(str(e))

from lora_diffusion.search_space import load_space

space = load_space(text="""
name: t
overrides: {model.base: "builtin:tiny", method.name: layernorm_only}
params:
  method.layernorm_only.include_embeddings: {type: categorical, choices: [true, false]}
metric: loss
scheduler: {name: none}
""")
out["space_keys"] = [p.key for p in space.params]

from lora_diffusion.adapter import load_adapter
from lora_diffusion.train import train_loop
from lora_diffusion.train_reporters import LocalReporter

cfg = load_config(None, ["model.base=builtin:tiny", "model.max_length=40", f"task.data_dir={sys.argv[2]}",
                         "method.name=layernorm_only", "method.layernorm_only.include_embeddings=false",
                         "train.batch_size=4", "train.max_steps=3", "train.report_every=3", "train.warmup_steps=1",
                         "train.torch_threads=1", "train.eval_at_end=false", "tracking.enabled=false"])
rep = LocalReporter(Path(sys.argv[3]))
res = train_loop({"config": cfg.to_dict(), "mlflow": None, "resume_from": None, "trial_name": "t"}, rep)
adaptation, _, saved = load_adapter(str(rep.checkpoints[-1] / "adapter"))
out.update(step=res["step"], loss=res["loss"], trainable_params=res["trainable_params"], saved_method=saved["method"],
           trainable=sorted(n for n, p in adaptation.named_parameters() if p.requires_grad))

from lora_diffusion.bench.quality import LR

out["lr"] = LR["layernorm_only"]
print("RESULT " + json.dumps(out))
'''


def test_a_new_method_is_one_file_plus_its_settings(tmp_path):
    import json
    import subprocess
    import sys

    folder = tmp_path / "more_methods"
    folder.mkdir()
    (folder / "layernorm_only_settings.py").write_text(LAYERNORM_SETTINGS)
    (folder / "layernorm_only.py").write_text(LAYERNORM_METHOD)
    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"sentence": s, "label": y, "idx": i}) + "\n"
            for i, (s, y) in enumerate([("a great film", 1), ("a dull film", 0)] * 4)))
    run = subprocess.run([sys.executable, "-c", LAYERNORM_RUN, str(folder), str(tmp_path / "data"), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("RESULT ", 1)[1])

    assert out["names"] == [*METHOD_NAMES, "layernorm_only"]  # the built-in ones keep their order, the new one last
    assert out["errors"][0] == "method.layernorm_only.init_scale: got 0; Input should be greater than 0"
    assert out["errors"][1] == ("method.layernorm_only.bogus: unknown key; allowed here: include_embeddings, init_scale")
    assert out["errors"][2] == f"method.name: unknown method 'layernorm'; allowed: {', '.join(out['names'])}"
    assert out["space_keys"] == ["method.layernorm_only.include_embeddings"]
    # it trained: only the encoder layers' LayerNorms (include_embeddings=false), saved and reloaded as itself
    assert out["step"] == 3 and math.isfinite(out["loss"]) and out["saved_method"] == "layernorm_only"
    assert out["trainable"] and all("LayerNorm" in n and "embeddings" not in n for n in out["trainable"])
    assert out["trainable_params"] == N_LAYERS * 2 * 2 * D + 2 * D  # 2 LayerNorms per layer + the head's transform
    assert out["lr"] == 4e-3  # bench quality's learning rate comes from the method's registration
