"""Collator: tokenised examples -> the batch contract (README.md, "Diffusion, tasks, data and metrics": Tasks).

    [CLS] instruction [SEP] input [SEP] target-span [PAD]...        (right-padded to the longest row)
                                        |<- budget ->|
    target span = target tokens, [SEP], then [PAD] up to the budget: all of it is maskable and
    in the loss, so the model learns where the answer ends.

Truncation: the instruction and the target span are never cut for length; the input (context)
is cut from its end until the row fits `max_length`. A target longer than budget - 1 tokens is
cut to fit (the closing [SEP] always stays) and counted; a warning reports the running count.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)


class Collator:
    def __init__(self, tokenizer, max_length: int, target_budget: int):
        for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {name[:-3]}; "
                                 "the batch layout needs [CLS], [SEP] and [PAD]")
        if target_budget < 2:
            raise ValueError(f"task.target_budget: got {target_budget}; must be >= 2 (target tokens + [SEP])")
        if max_length < target_budget + 3:
            raise ValueError(f"model.max_length: got {max_length}; must be >= target budget + 3 = {target_budget + 3}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.target_budget = target_budget
        self.cls, self.sep, self.pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        self.examples_seen = 0
        self.targets_cut = 0  # targets longer than budget - 1, cut
        self.contexts_cut = 0  # inputs shortened to fit max_length
        self._next_warning = 1

    def layout(self, instruction: Sequence[int], context: Sequence[int], target: Sequence[int]):
        """(token ids, n prompt tokens, n instruction tokens, target cut?, context cut?) of one row, unpadded."""
        room = self.max_length - 3 - len(instruction) - self.target_budget
        if room < 0:
            raise ValueError(
                f"model.max_length={self.max_length}: an instruction of {len(instruction)} tokens plus the target span "
                f"of {self.target_budget} does not fit (need max_length >= {len(instruction) + self.target_budget + 3})"
            )
        context_cut = len(context) > room
        target_cut = len(target) > self.target_budget - 1
        target = list(target[: self.target_budget - 1])
        span = target + [self.sep] + [self.pad] * (self.target_budget - 1 - len(target))
        prompt = [self.cls, *instruction, self.sep, *context[:room], self.sep]
        return prompt + span, len(prompt), len(instruction), target_cut, context_cut

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = []
        cut_here = 0
        for ex in examples:
            ids, n_prompt, n_instr, target_cut, context_cut = self.layout(
                ex["instruction_ids"], ex.get("context_ids") or [], ex.get("target_ids") or []
            )
            rows.append((ids, n_prompt, n_instr))
            cut_here += target_cut
            self.contexts_cut += context_cut
        self.examples_seen += len(examples)
        if cut_here:
            self.targets_cut += cut_here
            if self.targets_cut >= self._next_warning:
                log.warning("collator: %d of %d targets so far were longer than the target budget of %d tokens "
                            "(incl. [SEP]) and were cut; raise task.target_budget to keep them whole",
                            self.targets_cut, self.examples_seen, self.target_budget)
                while self._next_warning <= self.targets_cut:
                    self._next_warning *= 2

        B, L = len(rows), max(len(r[0]) for r in rows)
        input_ids = torch.full((B, L), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        target_mask = torch.zeros((B, L), dtype=torch.bool)
        instruction_mask = torch.zeros((B, L), dtype=torch.bool)
        for i, (ids, n_prompt, n_instr) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
            target_mask[i, n_prompt : len(ids)] = True
            instruction_mask[i, 1 : 1 + n_instr] = True
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "target_mask": target_mask, "instruction_mask": instruction_mask}
        if all("index" in ex for ex in examples):
            batch["index"] = torch.tensor([int(ex["index"]) for ex in examples], dtype=torch.long)
        return batch
