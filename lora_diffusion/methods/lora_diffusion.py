"""LoRA-Diffusion: step-adaptive low-rank perturbations of the hidden states along the trajectory.

    h'_t = h_t + delta_t,   delta_t = sum_{i=1..k} sigma(t) * g_i(h_t, t, c),   logits = Head(h'_t)
    g_i(h, t, c) = A_i(c) ReLU(W_B^(i) [h ; Emb(t)])           W_B^(i): (d + d_t) -> r(t)
    A_i(c) v    = W_A^(i) (gamma_i(c) * v) + beta_i(c)          W_A^(i): r(t) -> d, FiLM from c

Three phases by t in (0, 1]: early t > b2, mid b1 < t <= b2, late t <= b1, each with its own bank
of k modules, rank r and scale sigma.

The condition c (`condition`):
    prompt       c = MLP(mean of the frozen base's final hidden states h_t over the prompt tokens,
                 i.e. [CLS] instruction [SEP] input [SEP]): the default. The hidden states are
                 computed anyway, so c costs one masked mean and a small MLP.
    instruction  c = MLP(mean of the frozen word embeddings over the instruction tokens only), as
                 the paper's wording reads. For a task with one instruction string (SST-2) this c is
                 the same for every example and the adapter cannot see the input (measured: chance).

Where in the target span a position is (`span_positions`): a frozen base's hidden states at
adjacent [MASK]s are nearly identical, so g_i's input gets a learned offset embedding of the
position within the target span (0 = first target token, clipped at span_positions - 1):
    g_i(h, t, c) = A_i(c) ReLU(W_B^(i) [h + P(offset) ; Emb(t)])
P enters only g_i's input, never the head's, so it cannot change the base's output on its own.
span_positions = 0 turns it off.

W_A, gamma's and beta's last layers start at zero (gamma = 1 + ...), so an untrained adapter leaves
the base's logits bit for bit unchanged.

The base is frozen and delta enters after its last layer: the base forward runs under
`torch.no_grad()`, and delta and the head are computed only at the requested positions.

Regularisers: R_rank = sum_i ||W_A^(i)|| + ||W_B^(i)|| (nuclear or Frobenius norm) and
R_orth = sum over each phase bank of sum_{i != j} ||W_A^(i)^T W_A^(j)||_F^2 (ordered pairs).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_diffusion.config import PHASES
from lora_diffusion.diffusion import phase_of
from lora_diffusion.methods.core import Adaptation, count_parameters, freeze
from lora_diffusion.methods.lora_diffusion_settings import LoRADiffusionConfig
from lora_diffusion.model import sinusoidal


class ConditionEncoder(nn.Module):
    """c = MLP(a pooled (B, d) summary of the prompt or the instruction, from the frozen base)."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, mean_embedding: torch.Tensor) -> torch.Tensor:
        return self.mlp(mean_embedding)


class TrajectoryModule(nn.Module):
    """One g_i: down-projection of [h ; Emb(t)] to rank r, ReLU, FiLM-conditioned up-projection."""

    def __init__(self, hidden: int, time_dim: int, cond_dim: int, rank: int, film: bool):
        super().__init__()
        self.rank = rank
        self.film = film
        self.down = nn.Linear(hidden + time_dim, rank, bias=False)  # W_B
        self.up = nn.Linear(rank, hidden, bias=False)  # W_A
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)
        if film:
            self.gamma = nn.Linear(cond_dim, rank)
            self.beta = nn.Linear(cond_dim, hidden)
            for layer in (self.gamma, self.beta):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        v = torch.relu(self.down(torch.cat([h, t_emb], dim=-1)))
        if not self.film:
            return self.up(v)
        return self.up((1.0 + self.gamma(c)) * v) + self.beta(c)


class LoRADiffusion(Adaptation):
    method_name = "lora_diffusion"
    frozen_base_forward = True

    def __init__(self, denoiser, settings: LoRADiffusionConfig):
        super().__init__(denoiser, settings)
        freeze(denoiser)
        d, s = denoiser.hidden_size, settings
        self.encoder = ConditionEncoder(d, s.instruction_dim)
        # position within the target span, fed to g_i's input (see the module docstring)
        self.span_offset = nn.Embedding(s.span_positions, d) if s.span_positions > 0 else None
        if self.span_offset is not None:
            nn.init.normal_(self.span_offset.weight, std=0.5)
        ranks = (s.rank_early, s.rank_mid, s.rank_late)
        self.scales = (s.scale_early, s.scale_mid, s.scale_late)
        self.banks = nn.ModuleList(
            nn.ModuleList(TrajectoryModule(d, s.time_dim, s.instruction_dim, r, s.film) for _ in range(s.k)) for r in ranks
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.denoiser.eval()  # frozen base: no dropout, h_t is a deterministic function of (x_t, t)
        return self

    # -- pieces -------------------------------------------------------------------------------
    def mean_instruction_embedding(self, x_t: torch.Tensor, instruction_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean frozen word embedding over the instruction tokens (never masked), (B, d)."""
        with torch.no_grad():
            emb = self.denoiser.embed_tokens(x_t).float()
            if instruction_mask is None:
                return torch.zeros(emb.shape[0], emb.shape[-1], device=emb.device)
            m = instruction_mask.float().unsqueeze(-1)
            return (emb * m).sum(1) / m.sum(1).clamp_min(1.0)

    def condition_input(self, x_t, h, attention_mask, instruction_mask, target_mask) -> torch.Tensor:
        """What c is computed from, (B, d): see `condition` in the module docstring."""
        if self.settings.condition == "instruction":
            return self.mean_instruction_embedding(x_t, instruction_mask)
        if target_mask is None:
            raise ValueError("lora_diffusion with condition=prompt needs the batch's target_mask "
                             "(pass target_mask=...); condition=instruction does not")
        prompt = ~target_mask.bool()
        if attention_mask is not None:
            prompt = prompt & attention_mask.bool()
        m = prompt.to(h.dtype).unsqueeze(-1)
        return ((h * m).sum(1) / m.sum(1).clamp_min(1.0)).float()

    def span_offsets(self, target_mask: torch.Tensor | None, L: int, device) -> torch.Tensor | None:
        """(B, L) offset of each position from the first target position, clipped to [0, span_positions)."""
        if self.span_offset is None:
            return None
        if target_mask is None:
            raise ValueError("lora_diffusion with span_positions > 0 needs the batch's target_mask "
                             "(pass target_mask=..., or set method.lora_diffusion.span_positions=0)")
        start = target_mask.to(torch.int8).argmax(1)  # first target position of each row
        offsets = torch.arange(L, device=device)[None, :] - start[:, None]
        return offsets.clamp(0, self.span_offset.num_embeddings - 1)

    def delta(self, h: torch.Tensor, t: torch.Tensor, c: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """delta for rows h (N, d) at times t (N,) with condition encodings c (N, d_c) and span offsets (N,)."""
        t_emb = sinusoidal(t, self.settings.time_dim).to(h.dtype)
        phase = phase_of(t, self.settings.b1, self.settings.b2)
        g_in = h if offsets is None else h + self.span_offset(offsets).to(h.dtype)
        out = torch.zeros_like(h)
        for p, bank in enumerate(self.banks):
            rows = (phase == p).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            hp, tp, cp = g_in[rows], t_emb[rows], c[rows].to(h.dtype)
            dp = sum(g(hp, tp, cp) for g in bank)
            out = out.index_put((rows,), (self.scales[p] * dp).to(out.dtype))  # autocast: dp may be bf16/fp16
        return out

    def select(self, h, t, c, offsets, positions):
        """Rows at `positions` (or all B*L rows): (h, t, c, offsets), each with N rows."""
        B, L, d = h.shape
        if positions is not None:
            rows = positions.nonzero(as_tuple=True)[0]
            return h[positions], t[rows], c[rows], (offsets[positions] if offsets is not None else None)
        return (h.reshape(B * L, d), t.repeat_interleave(L), c.repeat_interleave(L, dim=0),
                offsets.reshape(B * L) if offsets is not None else None)

    def forward(self, x_t, t, attention_mask=None, instruction_mask=None, positions=None, target_mask=None):
        with torch.no_grad():
            h = self.denoiser.hidden(x_t, t, attention_mask)
        c = self.encoder(self.condition_input(x_t, h, attention_mask, instruction_mask, target_mask))  # (B, d_c)
        offsets = self.span_offsets(target_mask, h.shape[1], h.device)
        hs, ts, cs, os_ = self.select(h, t, c, offsets, positions)
        logits = self.denoiser.head(hs + self.delta(hs, ts, cs, os_))
        return logits if positions is not None else logits.reshape(h.shape[0], h.shape[1], -1)

    # -- regularisers ---------------------------------------------------------------------------
    def _norm(self, w: torch.Tensor) -> torch.Tensor:
        if self.settings.rank_norm == "nuclear":
            return torch.linalg.svdvals(w.float()).sum()  # svdvals' gradient is stable at repeated/zero values
        return torch.sqrt((w.float() ** 2).sum() + 1e-12)

    def regularizers(self) -> dict[str, torch.Tensor]:
        rank = sum(self._norm(g.up.weight) + self._norm(g.down.weight) for bank in self.banks for g in bank)
        orth = torch.zeros((), device=self.banks[0][0].up.weight.device)
        for bank in self.banks:
            for i, gi in enumerate(bank):
                for j, gj in enumerate(bank):
                    if i != j:
                        orth = orth + (gi.up.weight.float().T @ gj.up.weight.float()).pow(2).sum()
        return {"reg_rank": rank, "reg_orth": orth}

    def regularization_loss(self):
        r = self.regularizers()
        return self.settings.lambda_rank * r["reg_rank"] + self.settings.lambda_orth * r["reg_orth"]

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()
        counts["adapters"] = count_parameters(self.banks)
        counts["encoder"] = count_parameters(self.encoder)
        if self.span_offset is not None:
            counts["span_offset"] = count_parameters(self.span_offset)
        for name, bank in zip(PHASES, self.banks):
            counts[f"adapters_{name}"] = count_parameters(bank)
        return counts


def build(denoiser, settings: LoRADiffusionConfig) -> LoRADiffusion:
    return LoRADiffusion(denoiser, settings)


# --------------------------------------------------------------------------- multi-task composition


class ComposedLoRADiffusion(Adaptation):
    """Several task adapters on one frozen base, mixed per example by a router over the instruction.

        delta = sum_j w_j(c) * delta_j(h, t, c_j),   w = softmax(Router(mean instruction embedding))

    The router is the only trainable part (train it on a mixture of the tasks' data with the
    usual diffusion loss); with `router=None` the weights are uniform.
    """

    method_name = "lora_diffusion_composed"
    frozen_base_forward = True

    def __init__(self, adapters: list[LoRADiffusion], learn_router: bool = True):
        if not adapters:
            raise ValueError("compose: at least one lora_diffusion adapter is needed")
        base = adapters[0].denoiser
        if any(a.denoiser is not base for a in adapters):
            raise ValueError("compose: all adapters must share the same Denoiser object")
        super().__init__(base, None)
        self.adapters = nn.ModuleList(adapters)
        for a in adapters:
            freeze(a)
        self.router = nn.Linear(base.hidden_size, len(adapters)) if learn_router else None
        if self.router is not None:
            nn.init.zeros_(self.router.weight)  # starts uniform
            nn.init.zeros_(self.router.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.denoiser.eval()
        return self

    def weights(self, mean_embedding: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return torch.full((mean_embedding.shape[0], len(self.adapters)), 1.0 / len(self.adapters), device=mean_embedding.device)
        return torch.softmax(self.router(mean_embedding), dim=-1)

    def forward(self, x_t, t, attention_mask=None, instruction_mask=None, positions=None, target_mask=None):
        with torch.no_grad():
            h = self.denoiser.hidden(x_t, t, attention_mask)
        first = self.adapters[0]
        w = self.weights(first.mean_instruction_embedding(x_t, instruction_mask))  # routing: on the instruction, (B, n)
        B, L, d = h.shape
        delta = None
        for j, a in enumerate(self.adapters):
            c = a.encoder(a.condition_input(x_t, h, attention_mask, instruction_mask, target_mask))
            hs, ts, cs, os_ = a.select(h, t, c, a.span_offsets(target_mask, L, h.device), positions)
            wj = w[positions.nonzero(as_tuple=True)[0]] if positions is not None else w.repeat_interleave(L, dim=0)
            dj = wj[:, j : j + 1].to(hs.dtype) * a.delta(hs, ts, cs, os_)
            delta = dj if delta is None else delta + dj
        logits = self.denoiser.head(hs + delta)
        return logits if positions is not None else logits.reshape(B, L, -1)
