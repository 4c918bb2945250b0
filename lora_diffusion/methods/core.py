"""The interface every method implements: a base denoiser plus what the method trains."""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


class Adaptation(nn.Module):
    """A base `Denoiser` adapted by one method.

    forward(x_t, t, attention_mask, instruction_mask, positions, target_mask) returns logits (N, V) at
    the positions marked True in `positions` (B, L), or (B, L, V) when positions is None.
    `instruction_mask` (B, L) marks the instruction tokens, `target_mask` (B, L) the target span
    (everything else attended is the prompt): LoRA-Diffusion conditions on the prompt and tells
    span positions apart with them; the other methods ignore both.
    """

    method_name: str = "base"
    #: True when the base runs without an autograd graph (nothing inside it trains).
    frozen_base_forward: bool = False

    def __init__(self, denoiser: nn.Module, settings=None):
        super().__init__()
        self.denoiser = denoiser
        self.settings = settings

    # -- forward --------------------------------------------------------------------------
    def forward(self, x_t, t, attention_mask=None, instruction_mask=None, positions=None, target_mask=None):
        h = self.denoiser.hidden(x_t, t, attention_mask)
        if positions is not None:
            h = h[positions]
        return self.denoiser.head(h)

    # -- training ---------------------------------------------------------------------------
    def regularizers(self) -> dict[str, torch.Tensor]:
        """Unweighted regulariser values, by name (empty for methods without any)."""
        return {}

    def regularization_loss(self) -> torch.Tensor | float:
        """The weighted sum added to the denoising loss."""
        return 0.0

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def param_counts(self) -> dict[str, int]:
        return {"trainable": count_parameters(self, True), "total": count_parameters(self)}

    # -- what gets saved ----------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly what the method trains, by parameter name (saved as safetensors)."""
        return {n: p.detach().contiguous() for n, p in self.trainable_named_parameters()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.trainable_named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter does not fit this {self.method_name} model: missing {missing[:5]}"
                f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
            )
        with torch.no_grad():
            for n, p in own.items():
                if tuple(state[n].shape) != tuple(p.shape):
                    raise ValueError(f"adapter tensor {n}: shape {tuple(state[n].shape)}, model expects {tuple(p.shape)}")
                p.copy_(state[n].to(p.dtype))


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
