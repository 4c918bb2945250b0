"""The experiment report on an MLflow store written by real MLflow client calls with the sweep naming.

`make_store` mimics what `lora_diffusion.tune` leaves behind (a parent run `run_type=sweep` with
params `sweep.metric` / `sweep.mode` / `sweep.params` and the space file as `space/<file>.yaml`,
child runs `run_type=trial` with flat `Config.flat()` params, per-step metrics, `objective`,
`trial_state` FINISHED / PRUNED / FAILED) so the report's logic is tested without a sweep; the
dashboards end-to-end test runs a real one.
"""

from __future__ import annotations

import random
import re
import tempfile
from pathlib import Path

import pytest
import yaml

from lora_diffusion import report
from lora_diffusion.config import load_config
from lora_diffusion.tracking import RunTracker


def make_store(uri: str, name: str = "mimic", n: int = 8, seed: int = 0, sweep_info: str = "all",
               objectives: str | None = None) -> dict:
    """A sweep of `n` trials over two methods (the last FAILED, trials 2 and 5 PRUNED).

    sweep_info: "all" (space file + sweep.* params), "params" (sweep.* params only), "none".
    objectives: the sweep run's `sweep.objectives` param (a two-objective sweep), e.g. "val_loss:min, trainable_params:min".
    """
    rng = random.Random(seed)
    space = {"name": name, "metric": "val_loss", "mode": "min",
             "params": {"method.name": {"type": "categorical", "choices": ["lora_diffusion", "weight_lora"]},
                        "train.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2},
                        "method.lora_diffusion.rank_early": {"type": "categorical", "choices": [8, 16, 32, 64]},
                        "method.lora_diffusion.b1": {"type": "float", "low": 0.1, "high": 0.5},
                        "method.weight_lora.r": {"type": "categorical", "choices": [4, 8, 16]}}}
    parent = RunTracker.start(uri, name, run_name=name, tags={"run_type": "sweep", "sweep": name})
    if sweep_info in ("all", "params"):
        parent.log_params({"sweep.metric": "val_loss", "sweep.mode": "min", "sweep.params": ", ".join(space["params"])})
    if objectives:
        parent.log_params({"sweep.objectives": objectives})
    if sweep_info == "all":
        with tempfile.TemporaryDirectory() as d:
            Path(d, "sweep_space.yaml").write_text(yaml.safe_dump(space))
            Path(d, "base_config.yaml").write_text(load_config(None, ["model.base=builtin:tiny"]).to_yaml())
            parent.log_artifact(Path(d, "sweep_space.yaml"), "space")
            parent.log_artifact(Path(d, "base_config.yaml"), "space")
    trials = {}
    for i in range(n):
        method = "weight_lora" if i % 3 == 0 else "lora_diffusion"
        lr = 10 ** rng.uniform(-4, -2)
        overrides = ["model.base=builtin:tiny", f"method.name={method}", f"train.lr={lr}"]
        if method == "lora_diffusion":
            overrides += [f"method.lora_diffusion.rank_early={rng.choice([8, 16, 32, 64])}",
                          f"method.lora_diffusion.b1={rng.uniform(0.1, 0.5):.3f}"]
        else:
            overrides += [f"method.weight_lora.r={rng.choice([4, 8, 16])}"]
        cfg = load_config(None, overrides)
        state = "FAILED" if i == n - 1 else "PRUNED" if i in (2, 5) else "FINISHED"
        run = RunTracker.start(uri, name, parent_run_id=parent.run_id, run_name=f"trial_{i:05d}",
                               tags={"run_type": "trial", "task": "sst2", "method": method, "base": "builtin:tiny",
                                     "ray_trial_id": f"t{i:05d}", "sweep": name})
        run.log_params(cfg.flat())
        reports = {"FAILED": 2, "PRUNED": 3}.get(state, 6)
        final = 3 + rng.random()
        trainable = rng.randint(20, 90) * 1000 if method == "lora_diffusion" else rng.randint(5, 20) * 1000
        objective = None
        for s in range(1, reports + 1):
            loss = final + 2.0 / s + 0.1 * rng.random()
            objective = loss + 0.2
            run.log_metrics({"loss": loss, "denoise_loss": loss - 0.01, "lr": lr, "trainable_params": trainable,
                             "total_params": 500_000, "step": 10 * s, "val_loss": objective, "objective": objective,
                             "ce_early": loss + 0.5, "ce_mid": loss, "ce_late": loss - 0.5}, step=10 * s)
        if state == "FINISHED":
            run.log_metrics({"eval_accuracy": rng.random(), "eval_denoise_acc": rng.random()}, step=10 * reports)
        run.set_tags({"trial_state": state})
        run.end("FAILED" if state == "FAILED" else "FINISHED",
                error="RuntimeError: injected failure at step 20" if state == "FAILED" else None)
        trials[f"trial_{i:05d}"] = {"method": method, "state": state, "objective": objective,
                                    "params": cfg.flat(), "run_id": run.run_id}
    parent.end("FINISHED")
    return trials


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    trials = make_store(uri, "mimic")
    make_store(uri, "no-space", n=4, seed=1, sweep_info="none")
    make_store(uri, "params-only", n=4, seed=2, sweep_info="params")
    return uri, trials


# --------------------------------------------------------------------------- pure logic


def test_parse_value_round_trips_mlflow_param_strings():
    assert report.parse_value("3") == 3 and isinstance(report.parse_value("3"), int)
    assert report.parse_value("0.001") == 0.001
    assert report.parse_value("True") is True and report.parse_value("False") is False
    assert report.parse_value("None") is None
    assert report.parse_value("['query', 'value']") == ["query", "value"]
    assert report.parse_value("lora_diffusion") == "lora_diffusion"


def test_pareto_front_keeps_only_undominated_points():
    pts = [(100, 0.5), (10, 0.7), (50, 0.9), (1000, 0.95), (20, 0.6)]
    assert report.pareto_front(pts, "max") == [(10, 0.7), (50, 0.9), (1000, 0.95)]
    assert report.pareto_front(pts, "min") == [(10, 0.7), (20, 0.6), (100, 0.5)]


def test_metric_mode_follows_the_metric_table():
    assert report.metric_mode("val_loss") == "min"
    assert report.metric_mode("eval_accuracy") == "max"
    assert report.metric_mode("eval_non_label_rate") == "min"


# --------------------------------------------------------------------------- reading the store


def test_load_sweep_reads_trials_space_and_ranking(store):
    uri, trials = store
    sweep = report.load_sweep("mimic", uri)
    assert sweep.metric == "val_loss" and sweep.mode == "min"
    assert sweep.searched_source == "the sweep's space file"
    assert set(sweep.searched) == {"method.name", "train.lr", "method.lora_diffusion.rank_early",
                                   "method.lora_diffusion.b1", "method.weight_lora.r"}
    assert sweep.log_keys == {"train.lr"}
    assert {t.name for t in sweep.trials} == set(trials)
    by_name = {t.name: t for t in sweep.trials}
    for name, want in trials.items():
        t = by_name[name]
        assert t.state == want["state"] and t.method == want["method"]
        assert t.objective == pytest.approx(want["objective"])
        assert t.params["train.lr"] == pytest.approx(want["params"]["train.lr"])
    assert by_name["trial_00007"].error.startswith("RuntimeError")
    ranked = [t.objective for t in sweep.ranked() if t.objective is not None]
    assert ranked == sorted(ranked)


def test_without_a_space_the_searched_keys_are_those_that_vary(store):
    uri, _ = store
    sweep = report.load_sweep("no-space", uri)
    assert sweep.searched_source.startswith("the config keys that differ")
    assert "train.lr" in sweep.searched and "method.name" in sweep.searched
    assert not any(k.startswith("tracking.") for k in sweep.searched)
    assert "model.base" not in sweep.searched  # the same in every trial


def test_without_a_space_file_the_sweep_params_say_what_was_searched(store):
    uri, _ = store
    sweep = report.load_sweep("params-only", uri)
    assert sweep.searched_source == "the sweep run's sweep.params"
    assert sweep.metric == "val_loss" and sweep.mode == "min"
    assert set(sweep.searched) == {"method.name", "train.lr", "method.lora_diffusion.rank_early",
                                   "method.lora_diffusion.b1", "method.weight_lora.r"}
    assert sweep.log_keys == set()


def test_another_metric_and_mode_can_be_chosen(store):
    uri, _ = store
    sweep = report.load_sweep("mimic", uri, metric="eval_accuracy")
    assert sweep.metric == "eval_accuracy" and sweep.mode == "max"
    scored = [t for t in sweep.trials if t.objective is not None]
    assert scored and all(t.state == "FINISHED" for t in scored)
    assert report.load_sweep("mimic", uri, mode="max").mode == "max"


def test_clear_errors_name_what_is_wrong(store, tmp_path):
    uri, _ = store
    with pytest.raises(report.ReportError, match=r"experiment 'nope' not found.*mimic"):
        report.load_sweep("nope", uri)
    with pytest.raises(report.ReportError, match=r"no MLflow store at"):
        report.load_sweep("mimic", f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()  # reading never creates a store
    with pytest.raises(report.ReportError, match=r"--metric 'eval_bleu': no trial logged it; metrics logged: .*loss"):
        report.load_sweep("mimic", uri, metric="eval_bleu")


def test_cli_exit_codes(store, tmp_path, capsys):
    uri, _ = store
    assert report.main(["--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "r.html")]) == 2
    assert "experiment 'nope' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(["--experiment", "mimic", "--tracking-uri", uri, "--out", str(tmp_path / "no" / "r.html")])
    assert "--out: folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- the page


def test_page_is_self_contained_with_every_section(store, tmp_path):
    uri, trials = store
    out = tmp_path / "report.html"
    assert report.main(["--experiment", "mimic", "--tracking-uri", uri, "--out", str(out)]) == 0
    page = out.read_text()
    for anchor in ("best", "parallel", "frontier", "curves", "importance", "phases"):
        assert f'<section id="{anchor}">' in page
    # nothing loaded from elsewhere: no src/href to http(s), plotly.js inlined
    assert not re.search(r"""<(script|link|img|iframe)[^>]+(src|href)=["']?(https?:)?//""", page)
    assert "Plotly.newPlot" in page and len(page) > 3_000_000
    # best trials table: ranked by objective, the best first, the failed trial listed with its error
    table = page[page.index('id="best-trials"'):page.index("</table>", page.index('id="best-trials"'))]
    best = min((t for t in trials.values() if t["objective"] is not None and t["state"] != "FAILED"),
               key=lambda t: t["objective"])
    first_row = table[table.index("<tbody>"):].split("</tr>")[0]
    assert best["run_id"] in first_row
    assert 'id="failed-trials"' in page and "injected failure at step 20" in page
    assert page.count('class="plot"') == 2 + 1 + 1 + 2 + 1  # parallel x2, frontier, curves, importance x2, phases


def test_too_few_trials_give_a_message_not_a_crash(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_store(uri, "tiny", n=2, seed=3)  # trial 0 weight_lora FINISHED, trial 1 lora_diffusion FAILED
    page, sweep = report.build_report("tiny", uri)
    assert len(sweep.trials) == 2
    assert "not enough to estimate importances" in page
    assert "parallel coordinates need at least 2 trials" in page


def test_two_objective_sweep_gets_a_pareto_section(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = make_store(uri, "two", objectives="val_loss:min, trainable_params:min")
    page, sweep = report.build_report("two", uri)
    assert sweep.objectives == [("val_loss", "min"), ("trainable_params", "min")]
    assert '<section id="pareto">' in page and page.index('id="pareto"') < page.index('id="parallel"')
    # the trials named on the front are exactly the undominated finished ones
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    pts = {name: (c.get_run(t["run_id"]).data.metrics["objective"], c.get_run(t["run_id"]).data.metrics["trainable_params"])
           for name, t in trials.items() if t["state"] == "FINISHED"}
    front = {n for n, (a, b) in pts.items() if not any(x <= a and y <= b and (x, y) != (a, b) for x, y in pts.values())}
    note = page[page.index("On the front:"):].split("</p>")[0]
    assert {n for n in pts if n in note} == front and front
    # a one-objective sweep has none
    page1, _ = report.build_report("two", uri, metric="eval_accuracy")
    assert '<section id="pareto">' not in page1


def test_nondominated_follows_both_modes():
    pts = [(0.9, 100.0), (0.8, 50.0), (0.7, 60.0), (0.9, 120.0)]
    assert report.nondominated(pts, ("max", "min")) == [0, 1]
    assert report.nondominated(pts, ("min", "max")) == [2, 3]
