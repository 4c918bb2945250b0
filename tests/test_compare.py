"""Seed studies (`python -m lora_diffusion.compare`).

Unit tests of our own logic (no Ray): study files and sweeps -> one config per method, one budget, seeds,
trial points that rebuild their configs, per-example scores, the analysis against lora_diffusion.stats, the
table; bad input exits 2 before anything starts. One real study (marked ray, slow): 2 methods x 2 seeds
on builtin:tiny, a real local Ray cluster and a SQLite MLflow store -- the result, the MLflow parent and
child runs (with system metrics, node tags and model cards) and the report's section.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_diffusion import compare as C
from lora_diffusion import stats
from test_train import write_sst2

TINY = {
    "model.base": "builtin:tiny", "model.max_length": 40, "task.eval_subset_size": 8,
    "method.lora_diffusion.rank_early": 8, "method.lora_diffusion.rank_mid": 4, "method.lora_diffusion.rank_late": 2,
    "train.batch_size": 8, "train.max_steps": 4, "train.warmup_steps": 0, "train.report_every": 2,
    "train.torch_threads": 1, "train.cpus_per_worker": 1, "train.lr": 0.003, "train.keep_checkpoints": 1,
    "sampling.steps": 2, "tracking.system_metrics_interval_s": 0.5,
}


def study_yaml(tmp_path: Path, body: dict) -> Path:
    import yaml

    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(body, sort_keys=False))
    return p


def two_methods(**extra) -> dict:
    return {"name": "tiny_seeds", "metric": "eval_accuracy", "overrides": dict(TINY),
            "methods": [{"method": "bitfit", "overrides": {"train.lr": 0.01}},
                        {"method": "lora_diffusion", "overrides": {"method.lora_diffusion.b1": 0.3}}], **extra}


def args(**kw):
    base = dict(overrides=[], sweep=[], configs=None, seeds=None, metric=None, mode=None, baseline=None, name=None,
                data_dir=None, storage_path=None, tracking_uri=None)
    base.update(kw)
    return type("Args", (), base)()


# --------------------------------------------------------------------------- inputs


def test_seeds():
    assert C.parse_seeds(None, None) == [0, 1, 2]
    assert C.parse_seeds("4", None) == [0, 1, 2, 3]
    assert C.parse_seeds("3,7", None) == [3, 7]
    assert C.parse_seeds(None, [5, 6]) == [5, 6]
    assert C.parse_seeds("2", [5, 6]) == [0, 1]  # the command line wins
    for bad, msg in (("0", ">= 1"), ("a,b", "comma-separated"), ("1,1", "distinct")):
        with pytest.raises(C.StudyError, match=msg):
            C.parse_seeds(bad, None)


def test_study_file_gives_one_config_per_method_baseline_first(tmp_path):
    f = study_yaml(tmp_path, two_methods(seeds=2))
    study = C.build_study(args(configs=str(f), data_dir=str(tmp_path)))
    assert [c.method for c in study.candidates] == ["lora_diffusion", "bitfit"]  # the baseline first
    assert study.name == "tiny_seeds" and study.seeds == [0, 1] and study.mode == "max"
    bitfit = study.candidates[1].config
    assert bitfit.method.name == "bitfit" and bitfit.train.lr == 0.01 and bitfit.task.data_dir == str(tmp_path.resolve())
    assert study.candidates[0].config.method.lora_diffusion.b1 == 0.3
    trials = study.trial_configs()
    assert [(m, s) for m, s, _ in trials] == [("lora_diffusion", 0), ("lora_diffusion", 1), ("bitfit", 0), ("bitfit", 1)]
    assert all(cfg.train.seed == s and cfg.task.seed == 0 for _, s, cfg in trials)  # same subset, seed-driven order
    # the trials' Tune configs rebuild each config exactly (checked inside) and differ only where the configs do
    points = C.trial_points([cfg for _, _, cfg in trials])
    assert set(points[0]) >= {"method.name", "train.seed", "train.lr", "method.lora_diffusion.b1"}
    assert "model.base" not in points[0]
    assert points[2]["method.name"] == "bitfit" and points[3]["train.seed"] == 1


def test_study_file_errors_name_the_file_and_key(tmp_path):
    f = study_yaml(tmp_path, {**two_methods(), "colour": "red"})
    with pytest.raises(C.StudyError, match=r"study.yaml: colour: unknown key; allowed here: name, metric, mode, seeds"):
        C.build_study(args(configs=str(f)))
    f = study_yaml(tmp_path, two_methods(methods=[{"method": "bitfit", "lr": 0.1}, {"method": "lora_diffusion"}]))
    with pytest.raises(C.StudyError, match=r"study.yaml: methods.0.lr: unknown key; allowed here: method, config, overrides$"):
        C.build_study(args(configs=str(f)))
    f = study_yaml(tmp_path, two_methods(mode="up"))
    with pytest.raises(C.StudyError, match=r"study.yaml: mode: got 'up'; Input should be 'min' or 'max'"):
        C.build_study(args(configs=str(f)))
    f = study_yaml(tmp_path, two_methods(methods=[{"method": "dora"}]))
    with pytest.raises(C.StudyError, match=r"methods.0.method: .*unknown method 'dora'; allowed: lora_diffusion"):
        C.build_study(args(configs=str(f)))
    f = study_yaml(tmp_path, two_methods(methods=[{"method": "bitfit"}, {"method": "bitfit", "overrides": {"train.lr": 1}}]))
    with pytest.raises(C.StudyError, match="method 'bitfit' comes twice"):
        C.build_study(args(configs=str(f), baseline="bitfit"))
    f = study_yaml(tmp_path, two_methods(methods=[{"method": "bitfit", "overrides": {"train.max_steps": 8}},
                                                  {"method": "lora_diffusion"}]))
    with pytest.raises(C.StudyError, match=r"train.max_steps: lora_diffusion 4, bitfit 8|train.max_steps: bitfit 8, lora_diffusion 4"):
        C.build_study(args(configs=str(f)))
    # ... and one value on the command line fixes it
    assert C.build_study(args(configs=str(f), overrides=["train.max_steps=6"])).candidates[1].config.train.max_steps == 6
    f = study_yaml(tmp_path, two_methods(methods=[{"method": "bitfit", "overrides": {"train.lr": -1}}]))
    with pytest.raises(C.StudyError, match=r"methods\[0\] \(bitfit\): train.lr: got -1"):
        C.build_study(args(configs=str(f), baseline="bitfit"))
    f = study_yaml(tmp_path, two_methods())
    with pytest.raises(C.StudyError, match="--baseline: got 'adapters'; the study's methods are: bitfit, lora_diffusion"):
        C.build_study(args(configs=str(f), baseline="adapters"))
    with pytest.raises(C.StudyError, match="--metric: got 'eval_rouge1'; task sst2 reports"):
        C.build_study(args(configs=str(f), metric="eval_rouge1"))
    with pytest.raises(C.StudyError, match="not both"):
        C.build_study(args(configs=str(f), sweep=["x"]))


def write_sweep(root: Path) -> Path:
    """A finished sweep's folder as tune.py leaves it (sweep.json + best.json), two methods searched."""
    from lora_diffusion.config import load_config

    base = load_config(None, [f"{k}={v}" for k, v in TINY.items()]).to_dict()
    exp = root / "cmp"
    exp.mkdir(parents=True)
    (exp / "sweep.json").write_text(json.dumps({"space": {}, "base": base}))
    rows = [
        {"trial_id": "a", "state": "FINISHED", "objective": 60.0, "params": {"method.name": "lora_diffusion", "train.lr@lora_diffusion": 0.01}},
        {"trial_id": "b", "state": "FINISHED", "objective": 70.0, "params": {"method.name": "lora_diffusion", "train.lr@lora_diffusion": 0.02}},
        {"trial_id": "c", "state": "PRUNED", "objective": 90.0, "params": {"method.name": "bitfit", "train.lr@bitfit": 0.5}},
        {"trial_id": "d", "state": "FINISHED", "objective": 55.0, "params": {"method.name": "bitfit", "train.lr@bitfit": 0.05}},
        {"trial_id": "e", "state": "FAILED", "objective": None, "params": {"method.name": "weight_lora"}},
    ]
    (exp / "best.json").write_text(json.dumps({"sweep": "cmp", "metric": "eval_accuracy", "mode": "max", "trials": rows}))
    return exp


def test_best_config_of_each_method_from_a_sweep(tmp_path):
    exp = write_sweep(tmp_path / "tune")
    for ref in ("cmp", str(exp), str(exp / "best.json")):
        study = C.build_study(args(sweep=[ref], storage_path=str(tmp_path / "tune"), seeds="2"))
        got = {c.method: c for c in study.candidates}
        assert set(got) == {"lora_diffusion", "bitfit"}  # weight_lora only failed: not rerun
        assert got["lora_diffusion"].config.train.lr == 0.02 and got["lora_diffusion"].sweep_objective == 70.0
        assert got["bitfit"].config.train.lr == 0.05  # the pruned trial's 90 does not count
        assert "trial b" in got["lora_diffusion"].source
        assert study.metric == "eval_accuracy" and study.mode == "max" and study.name == "cmp_seeds"
    with pytest.raises(C.StudyError, match="--sweep nope: no best.json"):
        C.build_study(args(sweep=["nope"], storage_path=str(tmp_path / "tune"),
                           tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))


def test_bad_input_exits_2_before_anything_starts(tmp_path, capsys):
    assert C.main(["--storage-path", str(tmp_path)]) == 2
    assert "give the configs to compare" in capsys.readouterr().err
    f = study_yaml(tmp_path, two_methods())
    assert C.main(["--configs", str(f), "--seeds", "0,0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert C.main(["--configs", str(f), "--data-dir", str(tmp_path / "missing"), "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "does not exist" in err
    assert not (tmp_path / "tiny_seeds").exists()  # nothing was started
    assert C.main(["--configs", str(f), "--dry-run", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 trials" in out and "dry run: nothing started" in out


# --------------------------------------------------------------------------- scores and statistics


def test_per_example_scores():
    preds = [{"index": 3, "prediction": "positive", "references": ["positive"]},
             {"index": 5, "prediction": "negative", "references": ["positive"]},
             {"index": 9, "prediction": "banana", "references": ["negative"]}]
    scores, why = C.per_example_scores("sst2", preds, "eval_accuracy", 100 / 3)
    assert why is None and scores == {3: 100.0, 5: 0.0, 9: 0.0}
    ranked = [{**p, "rank_prediction": w} for p, w in zip(preds, ["positive", "negative", "negative"])]
    scores, why = C.per_example_scores("sst2", ranked, "eval_rank_accuracy", 200 / 3)
    assert why is None and scores == {3: 100.0, 5: 0.0, 9: 100.0}
    none, why = C.per_example_scores("sst2", preds, "eval_rank_accuracy", 50.0)
    assert none is None and "no rank_prediction" in why
    none, why = C.per_example_scores("sst2", preds, "eval_accuracy", 50.0)
    assert none is None and "not a mean over examples" in why
    none, why = C.per_example_scores("sst2", preds, "eval_denoise_acc", 10.0)
    assert none is None and "not computed from the generated predictions" in why
    none, why = C.per_example_scores("sst2", preds, "val_loss", 1.0)
    assert none is None and "not a final-evaluation metric" in why


def fake_trials(values: dict[str, list[float]], scores: dict[str, list[list[float]]] | None = None) -> list[dict]:
    rows = []
    for m, vals in values.items():
        for s, v in enumerate(vals):
            sc = None if scores is None else dict(enumerate(scores[m][s]))
            rows.append({"method": m, "seed": s, "state": "FINISHED" if v is not None else "FAILED", "value": v,
                         "trainable_params": 1000.0 if m == "lora_diffusion" else 50.0, "scores": sc,
                         "scores_reason": None if sc else "no predictions", "run_id": f"{m}{s}"})
    return rows


def test_analysis_matches_the_statistics(tmp_path):
    study = C.build_study(args(configs=str(study_yaml(tmp_path, two_methods(seeds=3)))))
    lora = [[100, 0, 100, 100], [100, 100, 0, 100], [100, 100, 100, 0]]
    bit = [[0, 0, 100, 100], [100, 0, 0, 0], [0, 100, 0, 0]]
    values = {"lora_diffusion": [75.0, 75.0, 75.0], "bitfit": [50.0, 25.0, 25.0]}
    result = C.analyse(study, fake_trials(values, {"lora_diffusion": lora, "bitfit": bit}))
    base, other = result["methods"]
    assert base["method"] == "lora_diffusion" and "t_test" not in base
    assert (base["mean"], base["std"]) == (75.0, 0.0)
    mean, std = stats.mean_std([50.0, 25.0, 25.0])
    assert other["mean"] == pytest.approx(mean) and other["std"] == pytest.approx(std)
    assert other["ci95"] == pytest.approx(list(stats.ci95([50.0, 25.0, 25.0])))
    t = stats.paired_t_test([50.0, 25.0, 25.0], [75.0, 75.0, 75.0])
    assert other["t_test"]["p"] == pytest.approx(t["p"]) and other["t_test"]["mean_diff"] == pytest.approx(-41.666666, abs=1e-4)
    avg_b = [sum(bit[s][i] for s in range(3)) / 3 for i in range(4)]
    avg_l = [sum(lora[s][i] for s in range(3)) / 3 for i in range(4)]
    boot = stats.paired_bootstrap(avg_b, avg_l)
    assert other["bootstrap"]["diff"] == pytest.approx(boot["diff"]) and other["bootstrap"]["p"] == pytest.approx(boot["p"])
    table = C.markdown_table(result)
    assert "| lora_diffusion | 3 | 75.00 ± 0.00 | [75.00, 75.00] | (baseline) |" in table
    assert "| bitfit | 3 | 33.33 ± 14.43 |" in table and "-41.67" in table
    json.dumps(result)  # JSON as written


def test_analysis_with_a_failed_seed_and_no_scores(tmp_path):
    study = C.build_study(args(configs=str(study_yaml(tmp_path, two_methods(seeds=2)))))
    result = C.analyse(study, fake_trials({"lora_diffusion": [75.0, 70.0], "bitfit": [50.0, None]}))
    other = result["methods"][1]
    assert other["n"] == 1 and other["failed_seeds"] == [1] and other["std"] == 0.0 and other["ci95"] == [None, None]
    assert other["t_test"]["seeds"] == [0] and other["t_test"]["p"] is None and "at least 2" in other["t_test"]["reason"]
    assert other["bootstrap"]["reason"].startswith("bitfit seed 0") or other["bootstrap"]["reason"].startswith("lora_diffusion seed 0")
    table = C.markdown_table(result)
    assert "| bitfit | 1 (failed: 1) |" in table and "— [1]" in table and "[1] needs at least 2 pairs" in table


# --------------------------------------------------------------------------- the real thing


@pytest.mark.ray
@pytest.mark.slow
def test_real_seed_study_two_methods_two_seeds(tmp_path):
    from lora_diffusion.report import build_report
    from lora_diffusion.tracking import client

    data = write_sst2(tmp_path / "data")
    f = study_yaml(tmp_path, two_methods(seeds=2))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "lora_diffusion.compare", "--configs", str(f), "--data-dir", str(data),
           "--storage-path", str(tmp_path / "tune"), "--tracking-uri", uri, "--num-cpus", "2", "--no-dashboard"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| lora_diffusion | 2 |" in out.stdout and "| bitfit | 2 |" in out.stdout

    result = json.loads((tmp_path / "tune" / "tiny_seeds" / "seed_study.json").read_text())
    assert [m["method"] for m in result["methods"]] == ["lora_diffusion", "bitfit"]
    assert len(result["trials"]) == 4 and all(t["state"] == "FINISHED" for t in result["trials"])
    assert sorted((t["method"], t["seed"]) for t in result["trials"]) == [
        ("bitfit", 0), ("bitfit", 1), ("lora_diffusion", 0), ("lora_diffusion", 1)]

    c = client(uri)
    exp = c.get_experiment_by_name("tiny_seeds")
    runs = c.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("study") == "seed_study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(children) == 4
    by = {(r.data.params["method.name"], int(r.data.params["train.seed"])): r for r in children}
    assert set(by) == {(m, s) for m in ("lora_diffusion", "bitfit") for s in (0, 1)}
    for (m, s), r in by.items():
        row = next(t for t in result["trials"] if t["method"] == m and t["seed"] == s)
        assert row["run_id"] == r.info.run_id and row["value"] == r.data.metrics["eval_accuracy"]
        assert r.data.params["task.seed"] == "0"  # the same validation examples for every trial
        # system metrics (item 6) and the node tag on every Tune trial's run
        assert "system/cpu_utilization_percentage" in r.data.metrics, sorted(r.data.metrics)
        assert "system/system_memory_usage_megabytes" in r.data.metrics
        assert r.data.tags.get("node_hostname") and r.data.tags.get("ray_node_id")
        # the model card (item 7) in the trial's logged adapter, naming this run
        card = Path(c.download_artifacts(r.info.run_id, "adapter/README.md", str(tmp_path))).read_text()
        assert f"--adapter runs:/{r.info.run_id}/adapter" in card and f"| method | `{m}` |" in card
        assert f"seed {s}," in card
    # the statistics are those of the runs' values
    values = {m: [by[(m, s)].data.metrics["eval_accuracy"] for s in (0, 1)] for m in ("lora_diffusion", "bitfit")}
    bit = result["methods"][1]
    assert bit["mean"] == pytest.approx(stats.mean_std(values["bitfit"])[0])
    t = stats.paired_t_test(values["bitfit"], values["lora_diffusion"])
    assert bit["t_test"]["mean_diff"] == pytest.approx(t["mean_diff"])
    assert (bit["t_test"]["p"] is None) == math.isnan(t["p"])
    if not math.isnan(t["p"]):
        assert bit["t_test"]["p"] == pytest.approx(t["p"])
    assert bit["bootstrap"].get("reason") is None and bit["bootstrap"]["n"] == 8  # 8 validation examples, paired
    assert parent[0].data.metrics["bitfit_mean"] == pytest.approx(bit["mean"])

    page, _ = build_report("tiny_seeds", uri)
    assert '<section id="seed-study">' in page and 'id="seed-study"' in page and "(baseline)" in page

    # the same command again: the study is restored, nothing is retrained, nothing duplicated
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming study 'tiny_seeds'" in again.stdout
    runs = c.search_runs([exp.experiment_id])
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]) == 4
    assert len([r for r in runs if r.data.tags.get("study") == "seed_study"]) == 1
    redo = json.loads((tmp_path / "tune" / "tiny_seeds" / "seed_study.json").read_text())
    assert [m["values"] for m in redo["methods"]] == [m["values"] for m in result["methods"]]
    # other inputs under the same name are refused, before Ray starts
    changed = subprocess.run(cmd + ["train.lr=0.5"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert changed.returncode == 2 and "started with other settings" in changed.stderr and "train" in changed.stderr
