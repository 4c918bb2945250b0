"""`load_space`: read a space file, resolve its base config and parameters, and check everything before any
cluster time is spent; a `SpaceError` names the file, the key, the bad value and what is allowed."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_diffusion.config import METHOD_NAMES, Config, ConfigError, config_from_dict, flatten, parse_override, set_dotted
from lora_diffusion.search_space import constraints
from lora_diffusion.search_space.errors import SpaceError, fmt
from lora_diffusion.search_space.metrics import (
    EVAL_METRICS,
    KNOWN_METRICS,
    TASK_EVAL_METRICS,
    TASK_INDEPENDENT_EVAL,
    TRAIN_METRICS,
)
from lora_diffusion.search_space.param import Param, config_key
from lora_diffusion.search_space.schema import ParamSpec, SpaceSpec
from lora_diffusion.search_space.space import Space, reports_per_trial

# Keys a space sets through `resources:` or that must not vary between trials.
NOT_SEARCHABLE = {
    "train.num_workers": "set resources.workers instead",
    "train.cpus_per_worker": "set resources.cpus_per_worker instead",
    "train.gpus_per_worker": "set resources.gpus_per_worker instead",
    "task.name": "a sweep tunes one task (write one space per task)",
    "task.data_dir": "pass --data-dir or set it in overrides",
    "train.output_dir": "trial folders are chosen by the tuner",
}


def load_space(path: str | os.PathLike | None = None, *, text: str | None = None, overrides: list[str] | None = None,
               name: str | None = None, num_samples: int | None = None, data_dir: str | None = None) -> Space:
    """Read, resolve and validate a space file (or YAML `text`); CLI values replace the file's."""
    where = str(path) if path is not None else "<space>"
    if text is None:
        p = Path(path)
        if not p.is_file():
            raise SpaceError(f"space file {where!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SpaceError(f"space file {where!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                             f"{e.start}); a search space is a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpaceError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: top level must be a mapping of space settings, got {type(data).__name__}")
    if name is not None:
        data["name"] = name
    if num_samples is not None:
        data["num_samples"] = num_samples
    try:
        spec = SpaceSpec.model_validate(data)
    except ValidationError as e:
        raise SpaceError(f"{where}: " + _format(e)) from None
    if not spec.params:
        raise SpaceError(f"{where}: params: empty; name at least one config key to search (e.g. train.lr)")

    # The base config: the file, then the space's overrides, then the command line's, then resources.
    base_dict: dict[str, Any] = {}
    if spec.base_config:
        cfg_path = Path(spec.base_config)
        if not cfg_path.is_absolute() and path is not None:
            cfg_path = Path(path).parent / cfg_path
        if not cfg_path.is_file():
            raise SpaceError(f"{where}: base_config: file {str(cfg_path)!r} does not exist")
        base_dict = yaml.safe_load(cfg_path.read_text()) or {}
        if not isinstance(base_dict, dict):
            raise SpaceError(f"{where}: base_config {str(cfg_path)!r}: top level must be a mapping")
    all_keys = set(flatten(Config().to_dict()))
    for key, value in spec.overrides.items():
        _check_key(where, "overrides", key, all_keys, allow_not_searchable=True)
        set_dotted(base_dict, key, value)
    for item in overrides or []:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            raise SpaceError(f"command line: {e}") from None
        _check_key("command line", "override", key, all_keys, allow_not_searchable=True)
        set_dotted(base_dict, key, value)
    if data_dir is not None:
        set_dotted(base_dict, "task.data_dir", data_dir)
    res = spec.resources
    for field, key in (("workers", "train.num_workers"), ("cpus_per_worker", "train.cpus_per_worker"),
                       ("gpus_per_worker", "train.gpus_per_worker")):
        if getattr(res, field) is not None:
            set_dotted(base_dict, key, getattr(res, field))
    try:
        base = config_from_dict(base_dict)
    except ConfigError as e:
        raise SpaceError(f"{where}: the base config (base_config + overrides) is invalid:\n{e}") from None
    if res.trial_runner == "in_process" and base.train.num_workers > 1:
        raise SpaceError(f"{where}: resources.trial_runner: in_process runs one worker, but resources.workers is "
                         f"{base.train.num_workers}; use torch_trainer or auto")

    params = _resolve_params(where, spec, base, all_keys)
    _check_metrics(where, spec, base, params)
    space = Space(spec, base, Path(path) if path is not None else None, params, text)
    _check_constraints(where, space)
    if spec.initial_points:
        typed = [space.check_point(pt, f"{where}: initial_points[{i}]") for i, pt in enumerate(spec.initial_points)]
        space.spec = spec.model_copy(update={"initial_points": typed})
    return space


def _format(err: ValidationError) -> str:
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            out.append(f"{key}: unknown setting")
        elif e["type"] == "missing":
            out.append(f"{key}: required")
        else:
            out.append(f"{key}: got {e.get('input')!r}; {msg}")
    return "; ".join(out)


def _check_key(where: str, section: str, key: str, all_keys: set[str], allow_not_searchable: bool = False) -> None:
    if key not in all_keys:
        close = difflib.get_close_matches(key, sorted(all_keys), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; parameters are dotted config keys such as train.lr or method.lora_diffusion.rank_mid"
        raise SpaceError(f"{where}: {section}.{key}: unknown parameter (not a config key){hint}")
    if not allow_not_searchable and key in NOT_SEARCHABLE:
        raise SpaceError(f"{where}: params.{key}: cannot be searched: {NOT_SEARCHABLE[key]}")


def _validated_value(base: Config, key: str, value: Any, where: str, what: str) -> Any:
    """`value` as the config types it at `key` (raises SpaceError naming the key when the config refuses it)."""
    data = base.to_dict()
    set_dotted(data, key, value)
    if key.startswith("method.") and key.split(".")[1] in METHOD_NAMES:
        data["method"]["name"] = key.split(".")[1]
    if any(key in c.keys and not c.checked_alone for c in constraints.CONSTRAINTS):  # checked with its group by the constraint
        return float(value)
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise SpaceError(f"{where}: params.{key}.{what}: {value!r} is not a valid value:\n{e}") from None
    return flatten(cfg.to_dict())[key]


def _resolve_params(where: str, spec: SpaceSpec, base: Config, all_keys: set[str]) -> list[Param]:
    params: list[Param] = []
    seen: dict[str, Param] = {}
    method_searched = "method.name" in spec.params
    for name, ps in spec.params.items():
        key = config_key(name)
        at = f"{where}: params.{name}"
        if "@" in name and not re.match(r"^[A-Za-z0-9_-]+$", name.split("@", 1)[1]):
            raise SpaceError(f"{at}: the variant after '@' must be letters, digits, '_' or '-'")
        _check_key(where, "params", key, all_keys)
        if ps.type == "categorical":
            if ps.low is not None or ps.high is not None or ps.step is not None or ps.log:
                raise SpaceError(f"{at}: a categorical parameter takes `choices` only (not low/high/step/log)")
            if not ps.choices:
                raise SpaceError(f"{at}.choices: empty or missing; list at least one value")
            choices = [_validated_value(base, key, c, where, "choices") for c in ps.choices]
            if len(set(map(repr, choices))) != len(choices):
                raise SpaceError(f"{at}.choices: {ps.choices} has duplicates")
            ps = ps.model_copy(update={"choices": choices})
        else:
            if ps.choices is not None:
                raise SpaceError(f"{at}: a {ps.type} parameter takes low/high, not choices (use type: categorical)")
            if ps.low is None or ps.high is None:
                raise SpaceError(f"{at}: a {ps.type} parameter needs both low and high")
            if not ps.low < ps.high:
                raise SpaceError(f"{at}: low={fmt(ps.low)} must be < high={fmt(ps.high)} (to fix a value, put it in overrides)")
            log = ps.log or ps.type == "log_float"
            if log and ps.low <= 0:
                raise SpaceError(f"{at}.low: {fmt(ps.low)}; a log-scale range needs low > 0")
            if ps.step is not None:
                if ps.step <= 0:
                    raise SpaceError(f"{at}.step: {fmt(ps.step)}; must be > 0")
                if log:
                    raise SpaceError(f"{at}: step and a log scale cannot be combined")
            if ps.type == "int":
                for what in ("low", "high", "step"):
                    v = getattr(ps, what)
                    if v is not None and not float(v).is_integer():
                        raise SpaceError(f"{at}.{what}: {v!r}; an int parameter needs whole numbers")
                ps = ps.model_copy(update={"low": int(ps.low), "high": int(ps.high), "step": int(ps.step) if ps.step else None})
            for what in ("low", "high"):
                v = _validated_value(base, key, getattr(ps, what), where, what)
                if ps.type != "int" and isinstance(v, int) and not isinstance(v, bool):
                    raise SpaceError(f"{at}: {key} is an integer setting; use type: int")
        when = _resolve_when(where, name, ps, spec, base, seen, all_keys, method_searched)
        p = Param(name, ps, when)
        for other in params:
            if other.config_key == key and not _exclusive(other.when, when):
                raise SpaceError(f"{at}: {other.key} sets the same key {key}; variants need `when` conditions that never "
                                 f"hold together (e.g. different method.name values)")
        params.append(p)
        seen[key] = p
    return params


def _exclusive(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> bool:
    """True when conditions `a` and `b` can never hold at once (some key has disjoint allowed values)."""
    return any(k in b and not set(map(repr, a[k])) & set(map(repr, b[k])) for k in a)


def _check_numeric_when(at: str, src: "Param", allowed: list[Any]) -> None:
    """`when` on an int parameter names values of its grid; on a float parameter it never holds (a continuous
    draw equals a given value with probability 0)."""
    if src.type != "int":
        raise SpaceError(f"{at}: {allowed} can never hold: {src.key} is a {src.type} parameter, so a sampled value "
                         "equals a given one with probability 0; make it categorical to condition on it")
    step = src.step or 1
    bad = [v for v in allowed if isinstance(v, bool) or not isinstance(v, (int, float))
           or not src.low <= v <= src.high or (v - src.low) % step != 0]
    if bad:
        raise SpaceError(f"{at}: {bad} can never hold: {src.key} takes the integers {src.low}..{src.high}"
                         + (f" in steps of {step}" if step != 1 else "") + "; name values it can take")


def _resolve_when(where, name, ps: ParamSpec, spec: SpaceSpec, base: Config, seen: dict[str, Param],
                  all_keys: set[str], method_searched: bool) -> dict[str, list[Any]]:
    at = f"{where}: params.{name}"
    when: dict[str, list[Any]] = {}
    parts = config_key(name).split(".")
    if parts[0] == "method" and len(parts) > 2 and parts[1] in METHOD_NAMES:
        method = parts[1]
        if method_searched:
            choices = seen["method.name"].choices if "method.name" in seen else None
            if choices is None:
                raise SpaceError(f"{at}: comes before method.name in params; list method.name first")
            if method not in choices:
                raise SpaceError(f"{at}: has no effect: method.name is searched over {choices}, which does not include {method!r}")
            when["method.name"] = [method]
        elif base.method.name != method:
            raise SpaceError(f"{at}: has no effect: the base config's method.name is {base.method.name!r} "
                             f"(set method.name: {method} in overrides, or search method.name)")
    for wkey, wval in (ps.when or {}).items():
        allowed = wval if isinstance(wval, list) else [wval]
        if not allowed:
            raise SpaceError(f"{at}.when.{wkey}: empty list of values")
        if wkey in seen:
            src = seen[wkey]
            if src.type == "categorical":
                bad = [v for v in allowed if v not in src.choices]
                if bad:
                    raise SpaceError(f"{at}.when.{wkey}: {bad} not among that parameter's choices {src.choices}")
            else:  # a numeric parameter: the condition must name values it can take
                _check_numeric_when(f"{at}.when.{wkey}", src, allowed)
        elif any(config_key(n) == wkey for n in spec.params):
            raise SpaceError(f"{at}.when.{wkey}: that parameter is listed after {name}; list it first")
        elif wkey not in all_keys:
            raise SpaceError(f"{at}.when.{wkey}: unknown key (not a parameter or config key)")
        else:  # a fixed key of the base config: the condition holds always or never
            fixed = base.flat().get(wkey)
            if not any(v == fixed or str(v) == str(fixed) for v in allowed):
                raise SpaceError(f"{at}.when.{wkey}: {allowed} can never hold: {wkey} is not searched and the base "
                                 f"config fixes it to {fixed!r}, so {name} would never be sampled; search {wkey}, "
                                 "change the condition or drop it")
        if wkey in when:  # already conditioned (the implicit method condition): both must hold
            when[wkey] = [v for v in when[wkey] if v in allowed]
            if not when[wkey]:
                raise SpaceError(f"{at}.when.{wkey}: {allowed} contradicts the implicit condition method.name == {parts[1]!r}")
        else:
            when[wkey] = allowed
    return when


def _check_metrics(where: str, spec: SpaceSpec, base: Config, params: list[Param]) -> None:
    def known(metric: str, field: str) -> None:
        if metric not in KNOWN_METRICS:
            close = difflib.get_close_matches(metric, sorted(KNOWN_METRICS), n=3, cutoff=0.6)
            raise SpaceError(f"{where}: {field}: unknown metric {metric!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else "")
                             + f"; allowed: {', '.join(sorted(KNOWN_METRICS))}")

    metrics = spec.metric if isinstance(spec.metric, list) else [spec.metric]
    if not 1 <= len(metrics) <= 2:
        raise SpaceError(f"{where}: metric: got {len(metrics)} metrics {metrics}; give one metric, or a list of two "
                         "(e.g. [eval_accuracy, trainable_params]) for a two-objective sweep")
    if len(set(metrics)) != len(metrics):
        raise SpaceError(f"{where}: metric: {metrics} names the same metric twice")
    if isinstance(spec.mode, list) and len(spec.mode) != len(metrics):
        raise SpaceError(f"{where}: mode: got {spec.mode} for the {len(metrics)} metric(s) {metrics}; give one mode per metric")
    if len(metrics) > 1 and spec.mode is not None and not isinstance(spec.mode, list):
        raise SpaceError(f"{where}: mode: got {spec.mode!r} for the two metrics {metrics}; give a list, e.g. [max, min]")
    if len(metrics) == 1 and isinstance(spec.mode, list):
        raise SpaceError(f"{where}: mode: got the list {spec.mode} for one metric {metrics[0]!r}; give min or max")
    task = base.task.name
    for metric in metrics:
        known(metric, "metric")
        if metric in EVAL_METRICS and metric not in TASK_INDEPENDENT_EVAL and metric not in TASK_EVAL_METRICS.get(task, set()):
            allowed = sorted(TASK_EVAL_METRICS.get(task, set()) | TASK_INDEPENDENT_EVAL)
            raise SpaceError(f"{where}: metric: {metric!r} is not computed for task {task!r}; allowed for {task}: {', '.join(allowed)}")
        if metric in EVAL_METRICS and not base.train.eval_at_end:
            raise SpaceError(f"{where}: metric: {metric!r} comes from the final evaluation, but train.eval_at_end is false")
    s = spec.scheduler
    if s.name == "asha":
        m = s.metric or metrics[0]
        known(m, "scheduler.metric")
        if m in EVAL_METRICS:
            raise SpaceError(f"{where}: scheduler.metric: ASHA compares trials during training, but {m!r} is reported only at the end; "
                             f"set scheduler.metric to a training metric ({', '.join(sorted(TRAIN_METRICS))}) or scheduler.name: none")
        if m.startswith("val_") and getattr(base.train, "eval_every", 0) in (0, None):
            raise SpaceError(f"{where}: scheduler.metric: {m!r} needs periodic validation; set train.eval_every > 0 in overrides")
        max_t = s.max_t or reports_per_trial(base)
        if s.grace_period >= max_t:
            raise SpaceError(f"{where}: scheduler.grace_period: {s.grace_period} must be < max_t={max_t} reports "
                             f"(train.max_steps / train.report_every), or ASHA never stops a trial")
    for metric in metrics:
        if metric.startswith("val_") and getattr(base.train, "eval_every", 0) in (0, None):
            raise SpaceError(f"{where}: metric: {metric!r} needs periodic validation; set train.eval_every > 0 in overrides")


def _check_constraints(where: str, space: Space) -> None:
    every = constraints.CONSTRAINTS
    for p in space.params:
        if p.key != p.config_key and any(p.config_key in c.keys for c in every):
            raise SpaceError(f"{where}: params.{p.key}: {' and '.join(c.what for c in every)} cannot have '@' variants")
    for c in space.constraints:
        c.validate(where, space)
