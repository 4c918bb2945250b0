"""Search spaces: every shipped space loads and samples valid configs; bad spaces fail with clear errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lora_diffusion.search_space import (
    PHASE_KEYS,
    RANK_KEYS,
    SpaceError,
    apply_sampled,
    load_space,
    reports_per_trial,
)

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))

BASE = """\
name: t
overrides:
  model.base: builtin:tiny
  train.max_steps: 20
  train.report_every: 5
"""


def space(body: str, **kw):
    return load_space(text=BASE + textwrap.dedent(body), **kw)


def error(body: str, **kw) -> str:
    with pytest.raises(SpaceError) as e:
        space(body, **kw)
    return str(e.value)


# --------------------------------------------------------------------------- shipped spaces


def test_every_shipped_space_is_there():
    names = {p.stem for p in SPACES}
    assert {"quick", "lora_diffusion_sst2", "lora_diffusion_squad", "lora_diffusion_xsum", "compare_methods",
            "weight_lora_sst2", "adapters_sst2", "prefix_tuning_sst2", "bitfit_sst2", "full_ft_sst2"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_space_samples_valid_configs(path):
    s = load_space(path)
    assert s.name and s.spec.num_samples >= 1
    for sampled in s.sample(12):
        cfg = s.trial_config(sampled)
        assert s.check_constraints(cfg) == []
        for name, value in sampled.items():  # the sampled value is what the trial's config holds
            assert cfg.flat()[name.split("@")[0]] == value


def test_quick_space_is_the_cpu_sweep_on_generated_accuracy():
    s = load_space(REPO / "tune_spaces" / "quick.yaml")
    assert s.base.model.base == "minilm" and s.base.train.gpus_per_worker == 0
    assert s.metric == "eval_accuracy" and s.mode == "max" and s.base.task.eval_subset_size is None  # all 872
    assert s.base.diffusion.loss_weighting == "none" and s.base.method.lora_diffusion.condition == "prompt"
    assert s.trial_runner == "in_process" and s.scheduler_metric == "val_loss"
    assert s.base.task.resolved_data_dir() is None or s.base.task.data_dir is None  # the Hub unless told


# --------------------------------------------------------------------------- sampling and constraints


def test_phase_and_rank_constraints_hold_by_construction():
    s = space("""
        params:
          method.lora_diffusion.b2: {type: float, low: 0.3, high: 0.7}
          method.lora_diffusion.b1: {type: float, low: 0.2, high: 0.65}
          method.lora_diffusion.rank_late: {type: int, low: 1, high: 64}
          method.lora_diffusion.rank_early: {type: int, low: 8, high: 40, step: 8}
        constraints: {phase_gap: 0.2, rank_order: true}
        metric: loss
        sampler: {name: random, seed: 3}
    """, overrides=["method.lora_diffusion.rank_mid=12"])
    seen_b1 = []
    for sampled in s.sample(200):
        ld = s.trial_config(sampled).method.lora_diffusion
        assert 0 < ld.b1 < ld.b2 < 1 and ld.b2 - ld.b1 >= 0.2 - 1e-9
        assert ld.rank_early >= ld.rank_mid == 12 >= ld.rank_late
        assert ld.rank_early % 8 == 0 and ld.rank_early >= 16  # the grid point >= the fixed rank_mid
        seen_b1.append(ld.b1)
    assert min(seen_b1) < 0.25 and max(seen_b1) > 0.45  # the whole feasible range is used


def test_conditional_parameters_follow_the_method():
    s = space("""
        params:
          method.name: {type: categorical, choices: [lora_diffusion, weight_lora, bitfit]}
          train.lr@small: {type: log_float, low: 1.0e-5, high: 1.0e-4, when: {method.name: weight_lora}}
          train.lr@big: {type: log_float, low: 1.0e-3, high: 1.0e-2, when: {method.name: [lora_diffusion, bitfit]}}
          method.weight_lora.r: {type: int, low: 2, high: 16}
          method.lora_diffusion.k: {type: int, low: 1, high: 3}
        metric: loss
        sampler: {name: random, seed: 0}
    """)
    methods = set()
    for sampled in s.sample(40):
        cfg = s.trial_config(sampled)
        m = sampled["method.name"]
        methods.add(m)
        assert ("method.weight_lora.r" in sampled) == (m == "weight_lora")
        assert ("method.lora_diffusion.k" in sampled) == (m == "lora_diffusion")
        lr_keys = [k for k in sampled if k.startswith("train.lr@")]
        assert lr_keys == (["train.lr@small"] if m == "weight_lora" else ["train.lr@big"])
        assert (1e-5 <= cfg.train.lr <= 1e-4) if m == "weight_lora" else (1e-3 <= cfg.train.lr <= 1e-2)
    assert methods == {"lora_diffusion", "weight_lora", "bitfit"}


def test_samples_are_seeded_and_typed():
    body = """
        params:
          train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
          train.batch_size: {type: int, low: 4, high: 32, step: 4}
          train.fail_at_step: {type: categorical, choices: [null, 3]}
          diffusion.schedule: {type: categorical, choices: [linear, cosine]}
        metric: loss
        sampler: {seed: 7}
    """
    a, b = space(body).sample(5), space(body).sample(5)
    assert a == b
    assert space(body.replace("seed: 7", "seed: 8")).sample(5) != a
    for s in a:
        assert isinstance(s["train.batch_size"], int) and s["train.batch_size"] % 4 == 0
        assert s["train.fail_at_step"] in (None, 3)


def test_cli_values_replace_the_file():
    s = space("""
        params:
          train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
        metric: loss
        num_samples: 4
    """, overrides=["train.max_steps=30", "model.max_length=40"], name="other", num_samples=9, data_dir="/data")
    assert s.name == "other" and s.spec.num_samples == 9
    assert s.base.train.max_steps == 30 and s.base.model.max_length == 40 and s.base.task.data_dir == "/data"


def test_resources_set_the_trial_config_and_the_runner():
    s = space("""
        params:
          train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
        metric: loss
        resources: {workers: 2, cpus_per_worker: 3}
    """)
    assert s.base.train.num_workers == 2 and s.base.train.cpus_per_worker == 3
    assert s.trial_runner == "torch_trainer"
    r = s.resources_per_trial()
    assert r["trial"]["CPU"] == 0 and r["trial"]["memory"] > 0 and r["total"]["CPU"] == 6
    one = space("""
        params:
          train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
        metric: loss
        resources: {cpus_per_worker: 2}
    """)
    assert one.trial_runner == "in_process" and one.resources_per_trial()["trial"] == {"CPU": 2, "GPU": 0.0}


def test_asha_budget_counts_reports():
    s = space("""
        params:
          train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
        metric: loss
    """)
    assert s.max_t == reports_per_trial(s.base) == 4  # steps 5, 10, 15, 20
    s2 = space("""
        params:
          train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
        metric: val_loss
    """, overrides=["train.eval_every=4", "train.max_steps=21"])
    # reports at 4, 5, 8, 10, 12, 15, 16, 20 and the last step 21
    assert reports_per_trial(s2.base) == 9 and s2.scheduler_metric == "val_loss" and s2.mode == "min"


def test_apply_sampled_strips_variants():
    cfg = apply_sampled({"train": {"lr": 1.0}}, {"train.lr@x": 0.5, "train.batch_size": 4})
    assert cfg.train.lr == 0.5 and cfg.train.batch_size == 4


# --------------------------------------------------------------------------- bad spaces


def test_b1_not_below_b2_is_refused():
    msg = error("""
        params:
          method.lora_diffusion.b1: {type: float, low: 0.6, high: 0.9}
          method.lora_diffusion.b2: {type: float, low: 0.2, high: 0.5}
        metric: loss
    """)
    assert "method.lora_diffusion.b1 in [0.6, 0.9]" in msg and "method.lora_diffusion.b2 in [0.2, 0.5]" in msg
    assert "phase_gap" in msg
    # a searched b1 against the base config's fixed b2 = 2/3
    assert "b1.low + phase_gap <= b2.high" in error("""
        params:
          method.lora_diffusion.b1: {type: float, low: 0.7, high: 0.9}
        metric: loss
    """)
    assert "must lie inside (0, 1)" in error("""
        params:
          method.lora_diffusion.b2: {type: float, low: 0.5, high: 1.0}
        metric: loss
    """)


def test_unknown_parameter_is_named_with_a_suggestion():
    msg = error("""
        params:
          train.lrr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
        metric: loss
    """)
    assert "params.train.lrr: unknown parameter" in msg and "did you mean train.lr" in msg
    assert "unknown parameter" in error("""
        params:
          method.lora_diffusion.rank_huge: {type: int, low: 1, high: 4}
        metric: loss
    """)


def test_empty_choice_list_is_refused():
    msg = error("""
        params:
          diffusion.schedule: {type: categorical, choices: []}
        metric: loss
    """)
    assert "params.diffusion.schedule.choices: empty" in msg


def test_negative_rank_range_is_refused():
    msg = error("""
        params:
          method.lora_diffusion.rank_late: {type: int, low: -4, high: 8}
        metric: loss
    """)
    assert "params.method.lora_diffusion.rank_late.low: -4 is not a valid value" in msg and "greater than 0" in msg
    assert "low=16 must be < high=4" in error("""
        params:
          method.lora_diffusion.rank_mid: {type: int, low: 16, high: 4}
        metric: loss
    """)


def test_unknown_metric_is_refused_with_the_allowed_ones():
    msg = error("""
        params:
          train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
        metric: eval_acc
    """)
    assert "metric: unknown metric 'eval_acc'" in msg and "did you mean" in msg and "eval_accuracy" in msg
    assert "allowed:" in msg and "val_loss" in msg


@pytest.mark.parametrize("body, expected", [
    ("""
     params: {}
     metric: loss
     """, "params: empty"),
    ("""
     params:
       train.lr: {type: float, low: 0.1, high: 0.2}
     metric: eval_exact_match
     """, "'eval_exact_match' is not computed for task 'sst2'"),
    ("""
     params:
       train.lr: {type: float, low: 0.1, high: 0.2}
     metric: eval_accuracy
     """, "ASHA compares trials during training"),
    ("""
     params:
       train.lr: {type: float, low: 0.1, high: 0.2}
     metric: val_loss
     """, "needs periodic validation; set train.eval_every"),
    ("""
     params:
       train.lr: {type: float, low: 0.1, high: 0.2}
     metric: loss
     scheduler: {grace_period: 4}
     """, "grace_period: 4 must be < max_t=4"),
    ("""
     params:
       train.num_workers: {type: int, low: 1, high: 2}
     metric: loss
     """, "set resources.workers instead"),
    ("""
     params:
       train.batch_size: {type: float, low: 4, high: 8}
     metric: loss
     """, "train.batch_size is an integer setting; use type: int"),
    ("""
     params:
       train.lr: {type: log_float, low: 0.0, high: 0.1}
     metric: loss
     """, "a log-scale range needs low > 0"),
    ("""
     params:
       train.lr: {type: categorical, choices: [0.1, 0.1]}
     metric: loss
     """, "has duplicates"),
    ("""
     params:
       diffusion.schedule: {type: categorical, choices: [linear, quadratic]}
     metric: loss
     """, "'quadratic' is not a valid value"),
    ("""
     params:
       method.weight_lora.r: {type: int, low: 2, high: 8}
     metric: loss
     """, "has no effect: the base config's method.name is 'lora_diffusion'"),
    ("""
     params:
       method.lora_diffusion.rank_early: {type: categorical, choices: [8, 16]}
     constraints: {rank_order: true}
     metric: loss
     """, "rank_order needs int ranges"),
    ("""
     params:
       method.lora_diffusion.rank_early: {type: int, low: 2, high: 4}
     constraints: {rank_order: true}
     metric: loss
     """, "admit no rank_early >= rank_mid >= rank_late"),
    ("""
     params:
       train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2, when: {diffusion.schedule: cosine}}
       diffusion.schedule: {type: categorical, choices: [linear, cosine]}
     metric: loss
     """, "listed after train.lr; list it first"),
    ("""
     params:
       diffusion.schedule: {type: categorical, choices: [linear, cosine]}
       train.lr@a: {type: log_float, low: 1.0e-4, high: 1.0e-2}
       train.lr@b: {type: log_float, low: 1.0e-3, high: 1.0e-1}
     metric: loss
     """, "variants need `when` conditions that never hold together"),
    ("""
     params:
       train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2, extra: 1}
     metric: loss
     """, "params.train.lr.extra: unknown setting"),
    ("""
     params:
       train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
     metric: loss
     resources: {trial_runner: in_process, workers: 2}
     """, "in_process runs one worker"),
], ids=lambda x: x if len(x) < 40 else None)
def test_bad_spaces_name_the_problem(body, expected):
    assert expected in error(body)


def test_bad_base_config_names_the_key():
    msg = error("""
        params:
          train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
        metric: loss
    """, overrides=["train.batch_size=0"])
    assert "base config" in msg and "train.batch_size" in msg
    assert "does not exist" in str(pytest.raises(SpaceError, load_space, "/nonexistent/space.yaml").value)


def test_phase_and_rank_key_constants_match_the_config():
    from lora_diffusion.config import Config

    flat = Config().flat()
    assert all(k in flat for k in PHASE_KEYS + RANK_KEYS)


# --------------------------------------------------------------------------- two objectives, initial points

RANKS = """\
params:
  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
  method.lora_diffusion.rank_early: {type: int, low: 16, high: 64, step: 16}
  method.lora_diffusion.rank_mid: {type: int, low: 8, high: 32, step: 8}
  method.lora_diffusion.rank_late: {type: int, low: 4, high: 16, step: 4}
  method.lora_diffusion.b1: {type: float, low: 0.2, high: 0.45}
  method.lora_diffusion.b2: {type: float, low: 0.55, high: 0.8}
constraints: {phase_gap: 0.1, rank_order: true}
metric: loss
"""
PAPER = ("  - {method.lora_diffusion.rank_early: 64, method.lora_diffusion.rank_mid: 32, method.lora_diffusion.rank_late: 8,\n"
         "     method.lora_diffusion.b1: 0.333333, method.lora_diffusion.b2: 0.666667}\n")


def test_two_metrics_make_a_two_objective_space():
    s = space("params:\n  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}\n"
              "metric: [loss, trainable_params]\nmode: [min, min]\nsampler: {name: nsga2, population_size: 4}\n")
    assert s.multi_objective and s.metrics == ["loss", "trainable_params"] and s.modes == ["min", "min"]
    assert s.metric == "loss" and s.mode == "min" and s.directions == ["minimize", "minimize"]
    assert type(s.make_sampler()).__name__ == "NSGAIISampler" and len(s.sample(3)) == 3
    assert "objectives: min loss, min trainable_params (Pareto front" in s.describe()
    assert "ASHA compares one metric: loss" in s.describe()
    # modes default to each metric's natural direction
    s = space("params:\n  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}\nmetric: [val_denoise_acc, trainable_params]\n"
              "scheduler: {name: none}\n", overrides=["train.eval_every=5"])
    assert s.modes == ["max", "min"]


@pytest.mark.parametrize("tail, expected", [
    ("metric: [loss, trainable_params, peak_mem_mb]\n", "got 3 metrics"),
    ("metric: [loss, loss]\n", "names the same metric twice"),
    ("metric: [loss, trainable_params]\nmode: [min]\n", "give one mode per metric"),
    ("metric: [loss, trainable_params]\nmode: min\n", "give a list, e.g. [max, min]"),
    ("metric: loss\nmode: [min, max]\n", "got ['min', 'max'] for the 1 metric(s) ['loss']"),
    ("metric: [loss, size]\n", "unknown metric 'size'"),
    ("metric: [loss, eval_rouge1]\n", "'eval_rouge1' is not computed for task 'sst2'"),
])
def test_bad_metric_lists_are_refused(tail, expected):
    assert expected in error("params:\n  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}\n" + tail)


def test_initial_points_come_first_and_are_typed():
    s = space(RANKS + "initial_points:\n" + PAPER + "  - {train.lr: 1.0e-3}\n")
    assert s.points[0] == {"method.lora_diffusion.rank_early": 64, "method.lora_diffusion.rank_mid": 32,
                           "method.lora_diffusion.rank_late": 8, "method.lora_diffusion.b1": 0.333333,
                           "method.lora_diffusion.b2": 0.666667}
    first, second, third = s.sample(3)
    assert {k: first[k] for k in s.points[0]} == s.points[0] and second["train.lr"] == 1.0e-3
    for sampled in (first, second, third):
        assert s.check_constraints(s.trial_config(sampled)) == []
    assert "initial points: 2 (tried first" in s.describe()
    # more points (what --warm-start adds) are checked the same way and come after the file's
    s.add_points([{"train.lr": 2.0e-3}], "--warm-start best.json")
    assert s.points[-1] == {"train.lr": 2.0e-3} and s.sample(3)[2]["train.lr"] == 2.0e-3


@pytest.mark.parametrize("point, expected", [
    ("{train.learning_rate: 1.0e-3}", "initial_points[0]: train.learning_rate: not a searched parameter"),
    ("{train.lr: 1.0}", "initial_points[0]: train.lr: 1.0 is outside the range [0.0001, 0.01]"),
    ("{method.lora_diffusion.rank_early: 16, method.lora_diffusion.rank_mid: 32, method.lora_diffusion.rank_late: 8}",
     "breaks the space's constraints: ranks 16/32/8: need rank_early >= rank_mid >= rank_late"),
    ("{method.lora_diffusion.rank_early: 64, method.lora_diffusion.rank_mid: 30, method.lora_diffusion.rank_late: 8}",
     "rank_mid: 30 is not on the grid 8 + k * 8"),
    ("{method.lora_diffusion.rank_early: 64}", "gives method.lora_diffusion.rank_early but not method.lora_diffusion.rank_mid"),
    ("{}", "a point is a non-empty mapping"),
])
def test_bad_initial_points_are_refused_by_point_and_key(point, expected):
    assert expected in error(RANKS + f"initial_points:\n  - {point}\n")


def test_initial_points_respect_the_phase_gap():
    body = RANKS.replace("phase_gap: 0.1", "phase_gap: 0.2") + "initial_points:\n  - {method.lora_diffusion.b1: 0.45, method.lora_diffusion.b2: 0.6}\n"
    assert "b1=0.45, b2=0.6: need 0 < b1 < b2 < 1 and b2 - b1 >= 0.2" in error(body)


def test_initial_points_respect_conditions():
    body = """\
    params:
      method.name: {type: categorical, choices: [lora_diffusion, weight_lora]}
      method.weight_lora.r: {type: int, low: 2, high: 16}
    metric: loss
    initial_points:
      - POINT
    """
    ok = space(body.replace("POINT", "{method.name: weight_lora, method.weight_lora.r: 8}"))
    assert ok.sample(1)[0] == {"method.name": "weight_lora", "method.weight_lora.r": 8}
    assert "not sampled when method.name='lora_diffusion'" in error(
        body.replace("POINT", "{method.name: lora_diffusion, method.weight_lora.r: 8}"))
    assert "give method.name in the point too" in error(body.replace("POINT", "{method.weight_lora.r: 8}"))
    assert "not one of the choices" in error(body.replace("POINT", "{method.name: lora}"))


@pytest.mark.parametrize("stem", ["lora_diffusion_sst2", "lora_diffusion_squad", "lora_diffusion_xsum", "compare_methods"])
def test_shipped_lora_diffusion_spaces_try_the_paper_defaults_first(stem):
    s = load_space(REPO / "tune_spaces" / f"{stem}.yaml")
    cfg = s.trial_config(s.sample(1)[0]).method.lora_diffusion
    assert (cfg.rank_early, cfg.rank_mid, cfg.rank_late) == (64, 32, 8)
    assert cfg.b1 == pytest.approx(1 / 3, abs=1e-6) and cfg.b2 == pytest.approx(2 / 3, abs=1e-6)


def test_compare_methods_is_accuracy_against_trainable_parameters_across_six_methods():
    s = load_space(REPO / "tune_spaces" / "compare_methods.yaml")
    assert s.metrics == ["eval_accuracy", "trainable_params"] and s.modes == ["max", "min"]
    assert set(next(p for p in s.params if p.key == "method.name").choices) == {
        "lora_diffusion", "weight_lora", "adapters", "prefix_tuning", "bitfit", "full_ft"}
    assert s.scheduler_metric == "val_loss"  # ASHA on one training metric, said in describe()
    assert "Pareto front" in s.describe() and "ASHA compares one metric: val_loss" in s.describe()


# --------------------------------------------------------------------------- a new constraint is one class


def test_a_new_constraint_is_one_class(monkeypatch):
    """A throw-away constraint (a sample budget: batch_size x max_steps <= 4096), added as one class to
    CONSTRAINTS, is validated at load time, sampled by construction, checked in initial points and described.
    The loader and the space read the list through its module, so patching `constraints.CONSTRAINTS` is the one change."""
    from lora_diffusion.search_space import constraints
    from lora_diffusion.search_space.constraints import CONSTRAINTS, Constraint

    class SampleBudget(Constraint):
        keys = ("train.batch_size", "train.max_steps")
        what = "the sample budget"
        budget = 4096

        def validate(self, where, space):
            batch, steps = (space.param(k).low for k in self.keys)
            if batch * steps > self.budget:
                raise SpaceError(f"{where}: the smallest batch_size x max_steps is {batch * steps} > {self.budget}")

        def suggest(self, trial, space):
            batch = space.param(self.keys[0]).suggest(trial)
            steps = space.param(self.keys[1])
            return {self.keys[0]: batch, self.keys[1]: steps.suggest(trial, high=min(steps.high, self.budget // batch))}

        def violations(self, cfg, space):
            n = cfg.train.batch_size * cfg.train.max_steps
            return [f"batch_size x max_steps = {n} > {self.budget}"] if n > self.budget else []

        def describe(self, space):
            return f"batch_size x max_steps <= {self.budget}"

    body = """
        params:
          train.max_steps: {type: int, low: 16, high: 1024}
          train.lr: {type: log_float, low: 1.0e-5, high: 1.0e-2}
          train.batch_size: {type: int, low: 4, high: 64}
        metric: loss
        scheduler: {name: none}
        sampler: {name: random, seed: 0}
        """
    unconstrained = space(body).sample(40)  # without the class, the ranges break the budget
    assert any(p["train.batch_size"] * p["train.max_steps"] > 4096 for p in unconstrained)

    monkeypatch.setattr(constraints, "CONSTRAINTS", [*CONSTRAINTS, SampleBudget()])
    s = space(body)
    assert [type(c).__name__ for c in s.constraints] == ["SampleBudget"]  # the built-in ones are not in force here
    sampled = s.sample(40)
    assert all(p["train.batch_size"] * p["train.max_steps"] <= 4096 for p in sampled)
    assert len({p["train.batch_size"] for p in sampled}) > 5  # still a search, not one point
    # sampled as a group where its first member (max_steps) is listed: batch_size, then max_steps, then lr
    assert all(list(p) == ["train.batch_size", "train.max_steps", "train.lr"] for p in sampled)
    assert "constraints: batch_size x max_steps <= 4096" in s.describe()

    assert "the smallest batch_size x max_steps is 8192 > 4096" in error(body.replace("low: 4, high: 64", "low: 8, high: 64")
                                                                         .replace("low: 16, high: 1024", "low: 1024, high: 2048"))
    point = body.replace("metric: loss", "metric: loss\n        initial_points: [{train.batch_size: 64, train.max_steps: 1024}]")
    assert "breaks the space's constraints: batch_size x max_steps = 65536 > 4096" in error(point)
    assert "cannot have '@' variants" in error(body.replace("train.batch_size:", "train.batch_size@big:"))
