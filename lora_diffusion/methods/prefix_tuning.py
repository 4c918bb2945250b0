"""Prefix tuning (Li & Liang, 2021) for a masked LM: learned key/value prefixes in every self-attention.

Each layer's attention sees `num_prefix` extra keys and values in front of the sequence's own:

    K_l = [P^K_l ; W_K h],   V_l = [P^V_l ; W_V h],   attention(Q, K_l, V_l) over every token + prefix

`peft`'s prefix tuning does not support *ForMaskedLM models, so this is our own: each BERT-family
self-attention is replaced by `PrefixSelfAttention`, which reuses the layer's query/key/value
Parameters (same names), computes q, k, v itself, prepends the prefixes, extends the attention
mask and calls `scaled_dot_product_attention`. With every prefix masked out it computes exactly
what the original attention computes (a test checks this).

The prefixes come from a `PrefixEncoder`: a direct table (num_prefix, n_layers * 2 * d), or with
`reparam_hidden > 0` the MLP reparameterisation of the paper (num_prefix, d) -> Tanh MLP ->
(num_prefix, n_layers * 2 * d), which trains more stably. Only the prefix encoder trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion.methods.core import Adaptation, freeze
from lora_diffusion.methods.prefix_tuning_settings import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """Learned prefixes for every layer: forward() -> (n_layers, 2, num_prefix, d) keys and values."""

    def __init__(self, num_prefix: int, n_layers: int, hidden: int, reparam_hidden: int = 0):
        super().__init__()
        self.num_prefix, self.n_layers, self.hidden = num_prefix, n_layers, hidden
        out = n_layers * 2 * hidden
        if reparam_hidden > 0:
            self.embedding = nn.Parameter(torch.randn(num_prefix, hidden))
            self.mlp = nn.Sequential(nn.Linear(hidden, reparam_hidden), nn.Tanh(), nn.Linear(reparam_hidden, out))
        else:
            self.embedding = nn.Parameter(0.02 * torch.randn(num_prefix, out))
            self.mlp = None

    def forward(self) -> torch.Tensor:
        kv = self.embedding if self.mlp is None else self.mlp(self.embedding)
        return kv.view(self.num_prefix, self.n_layers, 2, self.hidden).permute(1, 2, 0, 3)


def extend_mask(mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, num_prefix: int, enabled: bool,
                device) -> torch.Tensor | None:
    """The attention mask with `num_prefix` key columns in front: visible when `enabled`, else masked out.

    Accepts what transformers passes to an attention module: None (attend everywhere), a boolean
    mask (True = attend) or an additive float mask, each (B or 1, 1 or heads, q_len, k_len).
    """
    if mask is None:
        if enabled:
            return None
        mask = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    shape = (*mask.shape[:-1], num_prefix)
    if mask.dtype == torch.bool:
        prefix = torch.full(shape, enabled, dtype=torch.bool, device=mask.device)
    else:
        prefix = torch.full(shape, 0.0 if enabled else torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
    return torch.cat([prefix, mask], dim=-1)


class PrefixSelfAttention(nn.Module):
    """A BERT-family self-attention with key/value prefixes (set per call in `prefix_kv`)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.query, self.key, self.value = attn.query, attn.key, attn.value  # the frozen Parameters, same names
        self.dropout = attn.dropout
        self.num_attention_heads = attn.num_attention_heads
        self.attention_head_size = attn.attention_head_size
        self.scaling = getattr(attn, "scaling", self.attention_head_size**-0.5)
        self.prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (P, d) keys and values
        self.prefix_enabled = True

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, cache=None, **kwargs):
        if encoder_hidden_states is not None or cache is not None:
            raise ValueError("prefix_tuning: cross-attention and key/value caches are not supported (encoder-only masked LMs)")
        if self.prefix_kv is None:
            raise RuntimeError("prefix_tuning: PrefixSelfAttention called outside PrefixTuning.forward (no prefixes set)")
        B, L, _ = hidden_states.shape
        H, hd = self.num_attention_heads, self.attention_head_size
        q = self.query(hidden_states).view(B, L, H, hd).transpose(1, 2)
        k = self.key(hidden_states).view(B, L, H, hd).transpose(1, 2)
        v = self.value(hidden_states).view(B, L, H, hd).transpose(1, 2)
        pk, pv = self.prefix_kv
        P = pk.shape[0]
        pk = pk.to(k.dtype).view(P, H, hd).transpose(0, 1).unsqueeze(0).expand(B, H, P, hd)
        pv = pv.to(v.dtype).view(P, H, hd).transpose(0, 1).unsqueeze(0).expand(B, H, P, hd)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        mask = extend_mask(attention_mask, B, L, L, P, self.prefix_enabled, hidden_states.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scaling
        )
        return out.transpose(1, 2).reshape(B, L, H * hd), None


def attention_layers(denoiser) -> list[nn.Module]:
    """The layers of a BERT-family masked LM (whose `.attention.self` gets prefixes), or a ValueError naming what is supported."""
    config = denoiser.mlm.config
    found = []
    for layer in denoiser.encoder_layers:
        attn = getattr(getattr(layer, "attention", None), "self", None)
        if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("query", "key", "value")):
            found = []
            break
        if not hasattr(attn, "num_attention_heads") or not hasattr(attn, "attention_head_size"):
            found = []
            break
        found.append(layer)
    if not found or getattr(config, "is_decoder", False):
        raise ValueError(
            f"method prefix_tuning: {type(denoiser.mlm).__name__} is not supported; it needs an encoder-only "
            "BERT-family masked LM (encoder.layer[i].attention.self with query/key/value, as in BERT, RoBERTa, "
            "ELECTRA, MiniLM). Use lora_diffusion, weight_lora, bitfit or full_ft for this base."
        )
    return found


class PrefixTuning(Adaptation):
    method_name = "prefix_tuning"

    def __init__(self, denoiser, settings: PrefixTuningConfig):
        super().__init__(denoiser, settings)
        layers = attention_layers(denoiser)
        if any(isinstance(layer.attention.self, PrefixSelfAttention) for layer in layers):
            raise ValueError("prefix_tuning: this base already carries prefixes; load a fresh base for a new adapter")
        freeze(denoiser)
        self._attentions: list[PrefixSelfAttention] = []  # plain list: they are submodules of the denoiser
        for layer in layers:
            layer.attention.self = PrefixSelfAttention(layer.attention.self)
            self._attentions.append(layer.attention.self)
        ref = layers[0].attention.self.query.weight
        self.prefix = PrefixEncoder(settings.num_prefix, len(layers), denoiser.hidden_size, settings.reparam_hidden).to(
            ref.device, ref.dtype
        )

    def set_prefix_enabled(self, enabled: bool) -> None:
        """Mask every prefix out (False: the model computes exactly the base's attention) or back in."""
        for attn in self._attentions:
            attn.prefix_enabled = enabled

    def forward(self, x_t, t, attention_mask=None, instruction_mask=None, positions=None, target_mask=None):
        kv = self.prefix()
        for i, attn in enumerate(self._attentions):
            attn.prefix_kv = (kv[i, 0], kv[i, 1])
        try:
            return super().forward(x_t, t, attention_mask, instruction_mask, positions, target_mask)
        finally:
            for attn in self._attentions:
                attn.prefix_kv = None


def build(denoiser, settings: PrefixTuningConfig) -> PrefixTuning:
    return PrefixTuning(denoiser, settings)
