"""Search spaces for `python -m lora_diffusion.tune`: typed, validated YAML files.

A space file names the run config every trial starts from (`base_config` + `overrides`), the
parameters to search (int / float / log_float / categorical, optionally conditional), the
constraints between them, the objective, the sampler, the early-stopping scheduler, the trial
count and concurrency, and the resources of one trial. See `tune_spaces/quick.yaml` for a
commented example. `load_space(path)` validates everything before any cluster time is spent and
raises `SpaceError` naming the file, the key, the bad value and what is allowed.

Sampling is Optuna's define-by-run: `Space.define_by_run(trial)` asks for the parameters in file
order, skips conditional ones whose condition does not hold, and samples constrained groups with
dependent ranges, so every sampled config satisfies the constraints by construction:

- phase boundaries: `b1` first, then `b2` in `[max(low, b1 + phase_gap), high]` (0 < b1 < b2 < 1);
- rank order (`constraints.rank_order: true`): `rank_early`, then `rank_mid <= rank_early`,
  then `rank_late <= rank_mid`, each range narrowed so the later ranks stay feasible.

Each constraint is one `Constraint` class in `constraints.CONSTRAINTS` (its settings in the file's
`constraints:` section, load-time check, sampling, check of a config, dry-run text); a new constraint is
one class.

Parameters under `method.<name>.` are automatically conditional on `method.name == <name>` when
`method.name` is itself searched. The trial config is the base config plus the sampled values,
with the same dotted keys as `Config.flat()`.

Reading order, one concept per file (each imports only the ones above it; `constraints.py` names `Space`
only in type hints):

- `errors.py`: `SpaceError`, and `fmt`, how messages and the dry run write numbers;
- `metrics.py`: the metric names a space may optimise or stop on (`KNOWN_METRICS`, `TRAIN_METRICS`, `EVAL_METRICS`, ...);
- `constraints.py`: `Constraint`, the built-in `PhaseOrder` and `RankOrder`, and the list `CONSTRAINTS`;
- `schema.py`: the file's pydantic specs (`SpaceSpec` and its sections: `ParamSpec`, `SamplerSpec`, ...);
- `param.py`: `Param`, one resolved parameter, and `config_key` of a parameter name;
- `space.py`: `Space` (sampling, initial points, dry-run text, resources), `apply_sampled`, `reports_per_trial`;
- `load.py`: `load_space`, which reads a file and runs every check.

Every name below is importable from `lora_diffusion.search_space` itself.
"""

from lora_diffusion.search_space.constraints import CONSTRAINTS, PHASE_KEYS, RANK_KEYS, Constraint, PhaseOrder, RankOrder
from lora_diffusion.search_space.errors import SpaceError
from lora_diffusion.search_space.load import NOT_SEARCHABLE, load_space
from lora_diffusion.search_space.metrics import (
    EVAL_METRICS,
    KNOWN_METRICS,
    TASK_EVAL_METRICS,
    TASK_INDEPENDENT_EVAL,
    TRAIN_METRICS,
)
from lora_diffusion.search_space.param import Param, config_key
from lora_diffusion.search_space.schema import (
    NAME_RE,
    ConstraintsSpec,
    ParamSpec,
    ResourcesSpec,
    SamplerSpec,
    SchedulerSpec,
    SpaceSpec,
)
from lora_diffusion.search_space.space import TRIAL_PROCESS_MEMORY, Space, apply_sampled, reports_per_trial

__all__ = [
    "CONSTRAINTS", "EVAL_METRICS", "KNOWN_METRICS", "NAME_RE", "NOT_SEARCHABLE", "PHASE_KEYS", "RANK_KEYS",
    "TASK_EVAL_METRICS", "TASK_INDEPENDENT_EVAL", "TRAIN_METRICS", "TRIAL_PROCESS_MEMORY",
    "Constraint", "ConstraintsSpec", "Param", "ParamSpec", "PhaseOrder", "RankOrder", "ResourcesSpec", "SamplerSpec",
    "SchedulerSpec", "Space", "SpaceError", "SpaceSpec", "apply_sampled", "config_key", "load_space", "reports_per_trial",
]
