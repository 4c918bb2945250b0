"""The reverse process over the target span: fill every [MASK] of the span, keep the prompt.

    out = generate(adaptation, batch, cfg.sampling, tokenizer.mask_token_id, diffusion_cfg=cfg.diffusion)
    texts = decode_targets(tokenizer, out, batch["target_mask"])

Start: every target-span position is [MASK]; the prompt ([CLS] instruction [SEP] input [SEP]) is
never changed. Each step the model predicts a token x0 (and a confidence) at every still-masked
position in one pass (the head runs only there), then commits some of them:

- proposal: `strategy="greedy"` takes the argmax; `"sample"` draws from softmax(logits / temperature)
  after top-k and nucleus (top-p) filtering. [MASK] itself is never proposed.
- which to commit (`remasking`): "low_confidence" commits the positions whose proposal has the
  highest probability and leaves the rest masked (LLaDA); "random" commits random positions.
- how many: the span (or the current block) is filled in `steps` steps, as evenly as possible
  (LLaDA's schedule), so the number of steps is independent of the training T. The last step
  of a block commits everything left in it: at the end every target position holds a token.
- semi-autoregressive blocks (`block_length` > 0): the span is cut into blocks of that many
  positions, filled left to right; `steps` are shared out across the blocks (at least one each).
- time: before each step the model gets t = the time at which the schedule masks the
  fraction of the span still masked (t = fraction for the linear schedule; snapped up to the
  k/T grid for discrete time), so LoRA-Diffusion's phase routing follows the trajectory from
  early (mostly masked) to late (almost clean).

Batched; deterministic under `sampling.seed` (or the given generator): all randomness comes
from one torch.Generator.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lora_diffusion.config import DiffusionConfig, SamplingConfig
from lora_diffusion.diffusion import get_schedule


def time_for_mask_fraction(frac: torch.Tensor, diffusion_cfg: DiffusionConfig | None = None) -> torch.Tensor:
    """t in (0, 1] at which the schedule's mask probability equals `frac` (per row)."""
    schedule = get_schedule(diffusion_cfg.schedule if diffusion_cfg is not None else "linear")
    t = schedule.time_for_mask_prob(frac.float().clamp(0.0, 1.0))
    if diffusion_cfg is not None and diffusion_cfg.time == "discrete":
        T = diffusion_cfg.T
        return (torch.ceil(t * T - 1e-6) / T).clamp(min=1.0 / T, max=1.0)
    eps = diffusion_cfg.eps if diffusion_cfg is not None else 1e-3
    return t.clamp(min=eps, max=1.0)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with everything outside the top-k and outside the nucleus (top-p mass) set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
        drop_sorted = before >= top_p  # keep the smallest prefix reaching top_p (the top token always stays)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def propose(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, its probability) for each row of logits (N, V)."""
    logits = logits.float()
    if cfg.strategy == "greedy":
        probs = torch.softmax(logits, dim=-1)
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    probs = torch.softmax(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p), dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def steps_per_block(steps: int, n_blocks: int) -> list[int]:
    """`steps` shared out over `n_blocks` as evenly as possible, at least one each."""
    base, extra = divmod(steps, n_blocks)
    return [max(1, base + (b < extra)) for b in range(n_blocks)]


def _unpack(batch):
    if isinstance(batch, dict):
        return batch["input_ids"], batch["attention_mask"], batch["target_mask"].bool(), batch.get("instruction_mask")
    input_ids, attention_mask, target_mask, *rest = batch
    return input_ids, attention_mask, target_mask.bool(), (rest[0] if rest else None)


@torch.no_grad()
def generate(adaptation, batch, sampling_cfg: SamplingConfig, mask_id: int, *,
             diffusion_cfg: DiffusionConfig | None = None, generator: torch.Generator | None = None,
             on_logits: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Fill the target span of every row; returns input_ids (B, L) with the span generated.

    `batch` is the batch contract dict (or a tuple input_ids, attention_mask, target_mask
    [, instruction_mask]); whatever the span holds on input is ignored. `on_logits(step, t, positions,
    logits)` sees each step's model output as it comes (logits (N, V) at the True positions of
    `positions`, row by row; step 0 is the whole span masked): scoring reuses step 0 for rank
    classification instead of a second forward.
    """
    cfg = sampling_cfg
    input_ids, attention_mask, target_mask, instruction_mask = _unpack(batch)
    device = input_ids.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    x = input_ids.masked_fill(target_mask, mask_id)
    still = target_mask.clone()  # positions not yet committed
    span_len = target_mask.sum(1)
    order = target_mask.long().cumsum(1) - 1  # position within the span
    if cfg.block_length > 0:
        block_of = torch.where(target_mask, order // cfg.block_length, torch.full_like(order, -1))
        n_blocks = max(1, math.ceil(int(span_len.max()) / cfg.block_length)) if span_len.numel() else 1
    else:
        block_of = torch.where(target_mask, torch.zeros_like(order), torch.full_like(order, -1))
        n_blocks = 1

    step_index = 0
    for b, n_steps in enumerate(steps_per_block(cfg.steps, n_blocks)):
        in_block = block_of == b
        block_size = in_block.sum(1)  # (B,)
        for s in range(n_steps):
            if not still.any():
                break
            # how many positions each row commits now (LLaDA: as even as possible, the extras first)
            k = block_size // n_steps + (s < block_size % n_steps).long()
            if s == n_steps - 1:
                k = (still & in_block).sum(1)  # the last step of a block commits what is left in it
            frac = still.sum(1).float() / span_len.clamp_min(1).float()
            t = time_for_mask_fraction(frac, diffusion_cfg)
            logits = adaptation(x, t, attention_mask, instruction_mask, positions=still, target_mask=target_mask)
            if on_logits is not None:
                on_logits(step_index, t, still, logits)
            step_index += 1
            logits = logits.float().index_fill(-1, torch.tensor([mask_id], device=device), float("-inf"))
            tokens, conf = propose(logits, cfg, generator)
            if cfg.remasking == "random":
                conf = torch.rand(conf.shape, generator=generator, device=device)
            proposal = torch.zeros_like(x)
            proposal[still] = tokens
            score = torch.full(x.shape, float("-inf"), device=device)
            score[still] = conf.float()
            score = score.masked_fill(~in_block, float("-inf"))
            # commit the k highest-scoring candidates of each row
            rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
            commit = (rank < k[:, None]) & still & in_block
            x = torch.where(commit, proposal, x)
            still = still & ~commit
    return x


def decode_targets(tokenizer, ids: torch.Tensor, target_mask: torch.Tensor) -> list[str]:
    """The text of each row's target span, up to its first [SEP] or [PAD], special tokens dropped."""
    stops = {tokenizer.sep_token_id, tokenizer.pad_token_id}
    texts = []
    for row, mask in zip(ids.tolist(), target_mask.bool().tolist()):
        span = [tok for tok, m in zip(row, mask) if m]
        cut = next((i for i, tok in enumerate(span) if tok in stops), len(span))
        texts.append(tokenizer.decode(span[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=True).strip())
    return texts
