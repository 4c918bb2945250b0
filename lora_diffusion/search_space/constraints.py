"""Relations between searched parameters: one `Constraint` class each, listed in `CONSTRAINTS`.

The space and the loader read the list as `constraints.CONSTRAINTS` (through this module), so a new
constraint is one class added to that one list.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from lora_diffusion.config import Config
from lora_diffusion.search_space.errors import SpaceError, fmt

if TYPE_CHECKING:
    from lora_diffusion.search_space.space import Space

PHASE_KEYS = ("method.lora_diffusion.b1", "method.lora_diffusion.b2")
RANK_KEYS = ("method.lora_diffusion.rank_early", "method.lora_diffusion.rank_mid", "method.lora_diffusion.rank_late")


class Constraint:
    """A relation between searched parameters that every sampled config satisfies by construction.

    A constraint is one subclass, listed in `CONSTRAINTS`:

    - `settings`: its fields of the space file's `constraints:` section, name -> (type, pydantic Field);
    - `keys`: the config keys it relates, sampled together in this order where the first searched one
      appears in the file (none may have an "@variant"; as the group is sampled when its first member's
      `when` holds, `validate` should require one `when` for all members);
    - `what`: how error messages name those keys;
    - `checked_alone`: False when the run config cannot check one key's value without the others
      (load time then only types a searched range's ends, as floats, and `validate` checks them together);
    - `active(space)`: whether it is in force in a space (a key searched, a setting switched on);
    - `validate(where, space)`: at load time, a SpaceError when the ranges cannot satisfy it;
    - `suggest(trial, space)`: the searched keys' values from an Optuna trial, ranges narrowed so it holds;
    - `violations(cfg, space)`: what a trial config breaks (initial points, and a self-check of `sample`);
    - `describe(space)`: its text in the dry run's `constraints:` line.
    """

    settings: ClassVar[dict[str, tuple[Any, Any]]] = {}
    keys: ClassVar[tuple[str, ...]] = ()
    what: ClassVar[str] = ""
    checked_alone: ClassVar[bool] = True

    def active(self, space: Space) -> bool:
        return any(space.param(k) is not None for k in self.keys)

    def validate(self, where: str, space: Space) -> None:
        raise NotImplementedError

    def suggest(self, trial, space: Space) -> dict[str, Any]:
        raise NotImplementedError

    def violations(self, cfg: Config, space: Space) -> list[str]:
        raise NotImplementedError

    def describe(self, space: Space) -> str:
        raise NotImplementedError


class PhaseOrder(Constraint):
    """0 < b1 < b2 < 1 with b2 - b1 >= phase_gap: `b1` first, then `b2` in [max(low, b1 + phase_gap), high]."""

    # Smallest b2 - b1 when a phase boundary is searched (0 < b1 < b2 < 1 always holds).
    settings = {"phase_gap": (float, Field(0.05, gt=0, lt=1))}
    keys = PHASE_KEYS
    what = "phase boundaries"
    checked_alone = False  # the config checks b1 < b2 as a pair

    @staticmethod
    def _range(space: Space, key: str) -> tuple[float, float]:
        p = space.param(key)
        if p is None:
            v = space.fixed(key)
            return v, v
        return p.low, p.high

    def validate(self, where: str, space: Space) -> None:
        gap = space.spec.constraints.phase_gap
        k1, k2 = self.keys
        for k in self.keys:
            p = space.param(k)
            if p is not None:
                if p.type == "categorical" or p.step:
                    raise SpaceError(f"{where}: params.{k}: phase boundaries are searched as continuous ranges (type: float, no step)")
                if not (0 < p.low and p.high < 1):
                    raise SpaceError(f"{where}: params.{k}: range [{fmt(p.low)}, {fmt(p.high)}] must lie inside (0, 1)")
        p1, p2 = space.param(k1), space.param(k2)
        if p1 is not None and p2 is not None and p1.when != p2.when:
            raise SpaceError(f"{where}: params.{k1} and params.{k2}: must have the same `when` condition")
        lo1, hi1 = self._range(space, k1)
        lo2, hi2 = self._range(space, k2)
        if lo1 > min(hi1, hi2 - gap) + 1e-12:
            raise SpaceError(f"{where}: params {k1} in [{fmt(lo1)}, {fmt(hi1)}] and {k2} in [{fmt(lo2)}, {fmt(hi2)}]: "
                             f"no b1 < b2 with b2 - b1 >= constraints.phase_gap={fmt(gap)} (need b1.low + phase_gap <= b2.high)")

    def suggest(self, trial, space: Space) -> dict[str, float]:
        gap = space.spec.constraints.phase_gap
        k1, k2 = self.keys
        p1, p2 = space.param(k1), space.param(k2)
        lo1, hi1 = self._range(space, k1)
        lo2, hi2 = self._range(space, k2)
        out: dict[str, float] = {}
        b1 = p1.suggest(trial, lo1, min(hi1, hi2 - gap)) if p1 is not None else lo1
        if p1 is not None:
            out[k1] = b1
        if p2 is not None:
            out[k2] = p2.suggest(trial, max(lo2, b1 + gap), hi2)
        return out

    def violations(self, cfg: Config, space: Space) -> list[str]:
        gap = space.spec.constraints.phase_gap
        if cfg.method.name != "lora_diffusion":
            return []
        ld = cfg.method.lora_diffusion
        if not (0 < ld.b1 < ld.b2 < 1) or ld.b2 - ld.b1 < gap - 1e-9:
            return [f"b1={ld.b1}, b2={ld.b2}: need 0 < b1 < b2 < 1 and b2 - b1 >= {gap}"]
        return []

    def describe(self, space: Space) -> str:
        return f"0 < b1 < b2 < 1, b2 - b1 >= {fmt(space.spec.constraints.phase_gap)}"


class RankOrder(Constraint):
    """rank_early >= rank_mid >= rank_late: each rank drawn from its range narrowed by the one before it
    and by what the later ranks need to stay feasible."""

    # Keep rank_early >= rank_mid >= rank_late (LoRA-Diffusion's step-adaptive ranks).
    settings = {"rank_order": (bool, Field(False))}
    keys = RANK_KEYS
    what = "ranks"

    def active(self, space: Space) -> bool:
        return space.spec.constraints.rank_order

    @staticmethod
    def _grid(space: Space, key: str) -> tuple[int, int, int]:
        p = space.param(key)
        if p is None:
            v = int(space.fixed(key))
            return v, v, 1
        return int(p.low), int(p.high), int(p.step or 1)

    def _floors(self, space: Space) -> list[int | None]:
        """floor[i]: the smallest value rank i can take so that ranks i+1.. stay feasible (None: infeasible)."""
        floors: list[int | None] = [None] * len(self.keys)
        below = None
        for i in range(len(self.keys) - 1, -1, -1):
            lo, hi, step = self._grid(space, self.keys[i])
            need = lo if below is None else max(lo, below)
            first = lo + math.ceil((need - lo) / step) * step
            if first > hi:
                return floors
            floors[i] = below = first
        return floors

    def validate(self, where: str, space: Space) -> None:
        searched = [k for k in self.keys if space.param(k) is not None]
        if not searched:
            raise SpaceError(f"{where}: constraints.rank_order: true, but none of {', '.join(self.keys)} is searched")
        conds = {repr(space.param(k).when) for k in searched}
        if len(conds) > 1:
            raise SpaceError(f"{where}: params {', '.join(searched)}: must have the same `when` condition under rank_order")
        for k in searched:
            if space.param(k).type != "int":
                raise SpaceError(f"{where}: params.{k}: constraints.rank_order needs int ranges (type: int), got {space.param(k).type}")
        if any(f is None for f in self._floors(space)):
            ranges = ", ".join(f"{k.rsplit('.', 1)[1]} in [{a}, {b}]" if space.param(k) is not None else f"{k.rsplit('.', 1)[1]} = {a}"
                               for k in self.keys for a, b, _ in [self._grid(space, k)])
            raise SpaceError(f"{where}: constraints.rank_order: {ranges} admit no rank_early >= rank_mid >= rank_late")

    def suggest(self, trial, space: Space) -> dict[str, int]:
        floors = self._floors(space)
        out: dict[str, int] = {}
        prev = None
        for i, key in enumerate(self.keys):
            lo, hi, step = self._grid(space, key)
            p = space.param(key)
            if p is None:
                prev = lo
                continue
            a = floors[i + 1] if i + 1 < len(self.keys) else lo
            a = max(lo, a)
            first = lo + math.ceil((a - lo) / step) * step
            b = hi if prev is None else min(hi, prev)
            last = lo + ((b - lo) // step) * step
            prev = out[key] = p.suggest(trial, first, last)
        return out

    def violations(self, cfg: Config, space: Space) -> list[str]:
        if cfg.method.name != "lora_diffusion":
            return []
        ld = cfg.method.lora_diffusion
        if not (ld.rank_early >= ld.rank_mid >= ld.rank_late):
            return [f"ranks {ld.rank_early}/{ld.rank_mid}/{ld.rank_late}: need rank_early >= rank_mid >= rank_late"]
        return []

    def describe(self, space: Space) -> str:
        return "rank_early >= rank_mid >= rank_late"


# Every constraint a space can use, in the order they are checked, described and reported.
CONSTRAINTS: list[Constraint] = [PhaseOrder(), RankOrder()]
