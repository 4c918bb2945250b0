"""Benchmarks: every suite's `--quick --smoke` run produces complete, finite JSON and a Markdown table.

No timing assertions: the suites measure; these tests check that they run, report every field,
and keep the logical properties that hold on any machine (e.g. ASHA never trains more steps than
the same sweep without it). Unit tests cover the shared helpers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_diffusion.bench import common
from lora_diffusion.bench.__main__ import main
from lora_diffusion.config import METHOD_NAMES

REPO = Path(__file__).resolve().parents[1]


def run_suite(suite: str, out: Path, *extra: str, timeout: int = 600) -> tuple[dict, str]:
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": ""}  # the smoke runs make their own data
    proc = subprocess.run([sys.executable, "-m", "lora_diffusion.bench", suite, "--quick", "--smoke", "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / f"{suite}.json").read_text())
    md = (out / f"{suite}.md").read_text()
    return result, md


def check_common(result: dict, md: str, suite: str) -> None:
    assert result["suite"] == suite and result["size"] == "smoke"
    assert result["non_finite"] == [] and common.check_finite(result) == []
    m = result["machine"]
    for key in ("date", "cpu_count", "torch_threads", "device", "torch", "git_commit"):
        assert m[key] not in (None, ""), key
    assert result["rows"], "no rows"
    assert result["goals"], "no goals"
    for g in result["goals"]:
        assert set(g) >= {"goal", "op", "target", "measured", "met"}
        assert isinstance(g["met"], bool) and math.isfinite(g["measured"])
    assert result["wall_s"] > 0
    assert f"### Benchmark `{suite}` (smoke)" in md and "| goal |" in md and result["command"] in md


def has(row: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in row]
    assert not missing, f"{row.get('method') or row.get('model') or row}: missing {missing}"
    for k in keys:
        v = row[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            assert math.isfinite(v), f"{k} = {v}"


# --------------------------------------------------------------------------- the suites


@pytest.mark.timeout(300)
def test_step_smoke(tmp_path):
    result, md = run_suite("step", tmp_path)
    check_common(result, md, "step")
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"base_forward", *METHOD_NAMES}
    for name, r in rows.items():
        has(r, "step_ms", "floor_ms", "x_floor", "x_floor_best", "x_weight_lora", "peak_mb", "baseline_mb", "mem_increase_mb",
            "mem_increase_x_weight_lora", "trainable", "total", "trainable_pct", "adapter_mb")
        assert r["step_ms"] > 0 and r["peak_mb"] > 0 and len(r["step_ms_all"]) == result["settings"]["steps"]
        assert 0 <= r["trainable"] <= r["total"]
    assert rows["base_forward"]["trainable"] == 0 and rows["base_forward"]["x_floor"] == 1.0
    assert rows["full_ft"]["trainable"] == rows["full_ft"]["total"]
    assert rows["weight_lora"]["x_weight_lora"] == pytest.approx(1.0)
    for m in METHOD_NAMES:
        assert rows[m]["adapter_mb"] > 0
    # the adapter of full fine-tuning is the whole model: the largest file
    assert rows["full_ft"]["adapter_mb"] == max(rows[m]["adapter_mb"] for m in METHOD_NAMES)
    assert len(result["goals"]) == 3
    # a missed goal (always on the tiny base) comes with a profile of where the step goes
    if not all(g["met"] for g in result["goals"]):
        prof = rows["lora_diffusion"]["profile"]
        parts = {p["part"] for p in prof["parts"]}
        assert {"base (transformer)", "backward", "optimizer"} <= parts
        assert prof["top_ops"] and "Where lora_diffusion's step goes" in md


@pytest.mark.timeout(300)
def test_sample_smoke(tmp_path):
    result, md = run_suite("sample", tmp_path)
    check_common(result, md, "sample")
    s = result["settings"]
    combos = {(r["strategy"], r["steps"], r["model"]) for r in result["rows"]}
    assert combos == {(st, n, m) for st in ("greedy", "low_confidence") for n in s["step_counts"]
                      for m in ("base (no adapter)", "lora_diffusion")}
    for r in result["rows"]:
        has(r, "ms_per_example", "base_ms_per_example", "x_base", "x_base_best", "tokens_per_s")
        assert r["ms_per_example"] > 0
        if r["model"] == "base (no adapter)":
            assert r["x_base"] == pytest.approx(1.0)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ray_smoke(tmp_path):
    result, md = run_suite("ray", tmp_path)
    check_common(result, md, "ray")
    assert [r["run"] for r in result["rows"]] == ["plain (LocalReporter)", "Ray Train (1 worker)"]
    for r in result["rows"]:
        has(r, "runs", "steps", "wall_s", "steps_per_s", "loop_steps_per_s", "fixed_s", "report_s", "x_plain", "x_plain_loop")
        assert r["steps_per_s"] > 0
    assert [r["kind"] for r in result["runs"]] == result["settings"]["order"] == ["plain", "ray"]
    has(result["ray_startup"], "init_s", "fit_fixed_s", "shutdown_s", "extra_fixed_s")
    assert result["ray_startup"]["scaling"]["num_workers"] == 1
    tu = result["tune"]
    has(tu, "trials", "finished", "plain_trial_s", "plain_trial_before_s", "plain_trial_after_s", "tuner_fit_s", "command_wall_s", "one_off_s", "per_trial_overhead_s")
    assert tu["finished"] == tu["trials"] == result["settings"]["trials"]
    assert tu["tuner_fit_s"] < tu["command_wall_s"]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_asha_smoke(tmp_path):
    result, md = run_suite("asha", tmp_path)
    check_common(result, md, "asha")
    none, asha = result["rows"]
    assert (none["scheduler"], asha["scheduler"]) == ("none", "asha")
    for r in result["rows"]:
        has(r, "trials", "finished", "stopped_early", "trained_steps", "best_objective", "best_lr", "tuner_fit_s", "wall_s")
    s = result["settings"]
    assert s["same_configs"] is True  # seeded random search, one trial at a time: the same configurations
    assert none["stopped_early"] == 0 and none["trained_steps"] == s["trials"] * s["trial_steps"]
    assert asha["trained_steps"] <= none["trained_steps"]  # ASHA only ever stops trials
    assert asha["finished"] + asha["stopped_early"] == s["trials"]
    assert result["step_ratio"] == pytest.approx(asha["trained_steps"] / none["trained_steps"])


@pytest.mark.timeout(600)
def test_quality_smoke(tmp_path):
    result, md = run_suite("quality", tmp_path)
    check_common(result, md, "quality")
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(METHOD_NAMES)
    n_seeds = len(result["settings"]["seeds"])
    assert n_seeds >= 2
    for r in rows.values():
        has(r, "accuracy", "accuracy_std", "denoise_acc", "denoise_acc_std", "non_label_rate", "trainable", "total",
            "trainable_pct", "train_s", "eval_s", "n_eval", "lr", "top_prediction_share", "majority_baseline")
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["denoise_acc"] <= 1.0 and 0.0 <= r["rank_accuracy"] <= 1.0
        assert 0.0 <= r["denoise_acc_content"] <= 1.0
        assert len(r["per_seed_accuracy"]) == n_seeds
        assert r["n_eval"] == 64  # the whole (synthetic) validation split
        if r["method"] != "lora_diffusion":  # paired tests against LoRA-Diffusion (p may be undefined: None + reason)
            assert r["vs_lora_diffusion"]["n"] == n_seeds
            assert 0.0 < r["bootstrap_vs_lora_diffusion"]["p"] <= 1.0
    assert rows["full_ft"]["trainable_pct"] == pytest.approx(100.0)
    probe = result["reference"]["probe"]
    assert 0.0 <= probe["label_position"] <= 1.0 and 0.0 <= probe["mean_prompt"] <= 1.0 and probe["n_eval"] == 64
    assert {g["goal"].split(" ")[0] for g in result["goals"]} == set(METHOD_NAMES)
    assert "reference: linear probe" in md and "reference: always the majority label" in md
    work = sum((r["train_s"] + r["eval_s"]) * n_seeds for r in result["rows"])  # rows: mean seconds per run
    assert result["settings"]["work_s"] == pytest.approx(work, rel=1e-6)
    assert f"sum to {work / 60:.1f} min" in md
    assert result["settings"]["precision"] == "fp32" and "fp32 (training and evaluation)" in md


def test_quality_learning_curve_scores_every_checkpoint(tmp_path):
    """--curve-every N: each run's checkpoints at N, 2N, ... are scored on the validation examples; the last point
    is the run's own final figures; the Markdown gets a curve table."""
    result, md = run_suite("quality", tmp_path, "--methods", "bitfit", "--seeds", "0", "--no-probe", "--curve-every", "2")
    (row,) = result["rows"]
    points = row["curves"]["0"]
    assert [p["step"] for p in points] == [2, 4, 6]
    assert all(0.0 <= p["accuracy"] <= 1.0 and 0.0 <= p["rank_accuracy"] <= 1.0 and p["loss"] > 0 for p in points)
    assert points[-1]["accuracy"] == row["accuracy"] and points[-1]["rank_accuracy"] == row["rank_accuracy"]
    assert "Learning curves (accuracy" in md and "| step 2 | step 4 | step 6 |" in md


# --------------------------------------------------------------------------- bad input: clear errors, nothing run


@pytest.mark.parametrize("argv, needle", [
    (["step", "--smoke", "--methods", "lora_diffusion,nope"], "--methods: unknown nope"),
    (["sample", "--smoke", "--step-counts", "4,x"], "--step-counts '4,x'"),
    (["sample", "--smoke", "--device", "tpu"], "--device 'tpu'"),
    (["quality", "--quick", "--data-dir", "/nonexistent/data"], "missing sst2/train.jsonl"),
    (["quality", "--smoke", "--lr", "bogus=1e-3"], "unknown method 'bogus'"),
    (["quality", "--smoke", "--jobs", "0"], "--jobs 0: must be >= 1"),
    (["quality", "--smoke", "--curve-every", "0"], "--curve-every 0: must be >= 1"),
    (["quality", "--smoke", "--curve-every", "7"], "--curve-every 7: must be <= --steps (6)"),
    (["ray", "--smoke", "--steps", "4", "--report-every", "2"], "need at least 3 reports"),
    (["step", "--smoke", "--set", "model.base=minilm"], "only method.<method>.* and diffusion.* keys"),
])
def test_bad_input(argv, needle, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_input_through_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_diffusion.bench", "step", "--smoke", "--set",
                           "method.lora_diffusion.rank_norm=bogus", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "method.lora_diffusion.rank_norm: got 'bogus'" in proc.stderr


def test_quality_needs_real_data_unless_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORA_DIFFUSION_DATA_DIR", raising=False)
    assert main(["quality", "--quick", "--out", str(tmp_path)]) == 2
    assert "give --data-dir" in capsys.readouterr().err


def test_cuda_refused_without_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["step", "--smoke", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


# --------------------------------------------------------------------------- helpers


def test_machine_info_names_the_commit_in_short_form(tmp_path):
    from lora_diffusion.tracking import git_commit

    short = common.machine_info()["git_commit"]
    assert short == git_commit(short=True) and git_commit().startswith(short) and 7 <= len(short) < 40
    assert git_commit(tmp_path, short=True) is None  # outside a checkout (the bench writes "unknown" then)


def test_goal_met_and_missed():
    assert common.goal("x", 1.2, 1.3)["met"] is True
    assert common.goal("x", 1.4, 1.3)["met"] is False
    assert common.goal("x", 0.98, 0.97, ">=")["met"] is True
    assert common.goal("x", float("nan"), 1.0)["met"] is False  # never "met" on a missing figure
    with pytest.raises(ValueError):
        common.goal("x", 1.0, 1.0, "<")


def test_check_finite_names_every_bad_value():
    assert common.check_finite({"a": 1.0, "b": [1, {"c": 2.0}]}) == []
    assert common.check_finite({"a": float("nan"), "b": [1.0, {"c": float("inf")}]}) == ["a", "b[1].c"]


def test_median_mean_std_and_fmt():
    assert common.median([3.0, 1.0, 2.0]) == 2.0 and common.median([1.0, 2.0, 3.0, 4.0]) == 2.5
    mu, sd = common.mean_std([1.0, 2.0, 3.0])
    assert mu == 2.0 and sd == pytest.approx(1.0)
    assert common.mean_std([5.0]) == (5.0, 0.0)
    assert common.fmt(1234567) == "1,234,567" and common.fmt(0.0) == "0" and common.fmt(True) == "yes"
    assert common.fmt(1.23456) == "1.23" and common.fmt(1234.4) == "1,234" and common.fmt(0.01234) == "0.012"


def test_peak_memory_sees_an_allocation():
    with common.PeakMemory("cpu") as mem:
        block = bytearray(64 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
    del block
    assert mem.kind == "rss_high_water_mark"
    if mem.reset_ok:  # Linux: the high-water mark was reset at the start of the block
        assert mem.increase_mb >= 48


def test_synthetic_batch_follows_the_batch_contract(tiny_base):
    _, tok = tiny_base
    b = common.synthetic_batch(tok, batch_size=3, seq_len=24, target_len=5, instruction_len=4)
    ids = b["input_ids"]
    assert ids.shape == (3, 24) and b["attention_mask"].sum() == 3 * 24
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, 5] == tok.sep_token_id).all()
    assert (ids[:, 18] == tok.sep_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    assert b["target_mask"][0].nonzero().flatten().tolist() == list(range(19, 24))
    assert b["instruction_mask"][0].nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert not (b["target_mask"] & b["instruction_mask"]).any()
    assert not (ids == tok.mask_token_id).any()
    with pytest.raises(common.BenchError):
        common.synthetic_batch(tok, 2, 10, 8)


def test_synthetic_sst2_loads_as_the_sst2_task(tmp_path):
    from lora_diffusion.config import load_config
    from lora_diffusion.data import load_split

    folder = common.synthetic_sst2(tmp_path, n_train=20, n_val=10)
    cfg = load_config(None, [f"task.data_dir={folder}", f"task.cache_dir={tmp_path / 'cache'}"])
    train, val = load_split(cfg.task, "train"), load_split(cfg.task, "validation")
    assert len(train) == 20 and len(val) == 10
    assert set(train["label"]) <= {0, 1}
    assert common.resolve_data_dir(str(folder)) == str(folder.resolve())
    with pytest.raises(common.BenchError, match="missing sst2/train.jsonl"):
        common.resolve_data_dir(str(tmp_path / "nowhere"))


def test_resolve_data_dir_finds_a_split_where_the_task_does(tmp_path):
    # SQuAD with only the official dev set: train and validation are the halves of dev_split/ (tasks/squad.py).
    (tmp_path / "squad" / "dev_split").mkdir(parents=True)
    with pytest.raises(common.BenchError, match=r"missing squad/train.jsonl or squad/dev_split/train.jsonl, "
                                                 r"squad/dev_split/validation.jsonl or squad/validation.jsonl"):
        common.resolve_data_dir(str(tmp_path), task="squad")
    for split in ("train", "validation"):
        (tmp_path / "squad" / "dev_split" / f"{split}.jsonl").write_text("{}\n")
    assert common.resolve_data_dir(str(tmp_path), task="squad") == str(tmp_path.resolve())


def test_run_isolated_returns_the_child_result_and_reports_failures():
    out = common.run_isolated("lora_diffusion.bench.common:machine_info", "cpu")
    assert out["device"] == "cpu" and out["cpu_count"] >= 1
    with pytest.raises(common.BenchError, match="failed"):
        common.run_isolated("lora_diffusion.bench.common:check_device", "tpu")


@pytest.mark.parametrize("size, flag, native, expected", [
    ("--quick", [], True, "bf16"), ("--quick", [], False, "fp32"), ("--smoke", [], True, "fp32"),
    ("--quick", ["--precision", "fp32"], True, "fp32"), ("--smoke", ["--precision", "bf16"], True, "bf16"),
    ("--quick", ["--precision", "auto"], False, "fp32"),
])
def test_quality_precision_auto_is_bf16_where_native_and_reaches_every_run(monkeypatch, tmp_path, size, flag, native,
                                                                           expected):
    """--quick resolves --precision auto to bf16 only where the device computes it natively; the resolved value is
    every run's train.precision (training and evaluation)."""
    from lora_diffusion import precision
    from lora_diffusion.bench import __main__ as bench_main
    from lora_diffusion.bench import quality

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    args = bench_main.build_parser().parse_args(["quality", size, *flag])
    s = quality._settings(args, "quick" if size == "--quick" else "smoke")
    assert s["precision"] == expected
    spec = {**s, "base": "builtin:tiny", "data_dir": str(tmp_path), "work": str(tmp_path), "method": "bitfit",
            "lr": 1e-3}
    assert quality._run_config(spec, 0, tmp_path).train.precision == expected


def test_quality_runs_every_method_seed_pair_and_groups_them_in_table_order(monkeypatch):
    """bench quality --jobs: one child per (method, seed), N at a time; finishing order does not matter."""
    import threading
    import time

    from lora_diffusion.bench import quality

    live, most = [], []
    lock = threading.Lock()

    def fake(func, spec, timeout, stream):
        assert func.endswith(":train_eval") and len(spec["seeds"]) == 1
        with lock:
            live.append(1)
            most.append(len(live))
        time.sleep(0.05 if spec["method"] == "a" else 0.01)  # "a" finishes after "b"
        with lock:
            live.pop()
        return {"method": spec["method"], "runs": [{"seed": spec["seeds"][0], "lr": spec["lr"]}]}

    monkeypatch.setattr(quality, "run_isolated", fake)
    out = quality.run_all({"methods": ["a", "b"], "seeds": [2, 0, 1], "lr": {"a": 1.0, "b": 2.0}, "jobs": 2})
    assert [r["method"] for r in out] == ["a", "b"]
    assert [[x["seed"] for x in r["runs"]] for r in out] == [[2, 0, 1], [2, 0, 1]]
    assert out[1]["runs"][0]["lr"] == 2.0
    assert max(most) == 2


def test_quality_starts_the_longest_runs_first(monkeypatch):
    """Runs start in order of their measured cost (full FT first, LoRA-Diffusion last; an unknown method first);
    the table keeps the order given."""
    from lora_diffusion.bench import quality

    started = []

    def fake(func, spec, timeout, stream):
        started.append(spec["method"])
        return {"method": spec["method"], "runs": [{"seed": spec["seeds"][0]}]}

    monkeypatch.setattr(quality, "run_isolated", fake)
    methods = ["lora_diffusion", "bitfit", "full_ft", "new_method", "adapters"]
    out = quality.run_all({"methods": methods, "seeds": [0, 1], "lr": dict.fromkeys(methods, 1.0), "jobs": 1})
    assert started == [m for m in ["new_method", "full_ft", "adapters", "bitfit", "lora_diffusion"] for _ in (0, 1)]
    assert [r["method"] for r in out] == methods


def test_quality_a_failed_run_stops_the_rest_and_kills_the_children(monkeypatch):
    from lora_diffusion.bench import quality

    started, killed = [], []

    def fake(func, spec, timeout, stream):
        started.append((spec["method"], spec["seeds"][0]))
        if spec["method"] == "a":
            raise common.BenchError("train_eval failed (exit 1)")
        return {"method": spec["method"], "runs": [{"seed": spec["seeds"][0]}]}

    monkeypatch.setattr(quality, "run_isolated", fake)
    monkeypatch.setattr(quality, "kill_children", lambda: killed.append(True))
    with pytest.raises(common.BenchError, match="failed"):
        quality.run_all({"methods": ["a", "b"], "seeds": [0, 1, 2], "lr": {"a": 1.0, "b": 1.0}, "jobs": 1})
    assert started[0] == ("a", 0) and len(started) < 6  # the queued runs were cancelled
    assert killed


# --------------------------------------------------------------------------- a new suite is one file

THROWAWAY_SUITE = '''"""throwaway: sums of a few integers, a suite that exists only for this test.

It shows that a suite is one file: no registry, parser or output code to touch.
"""

from lora_diffusion.bench.common import goal, goals_table, heading, int_list, machine_info, table, with_options

NAME = "throwaway"
PRESETS = {"smoke": dict(n=3, values=[1, 2]), "quick": dict(n=30, values=[1, 2]), "full": dict(n=300, values=[1, 2])}


def add_arguments(p):
    p.add_argument("--n", type=int, help="terms per sum")
    p.add_argument("--values", help="comma-separated integers")


def run(args, size):
    s = with_options(PRESETS[size], args, ("n",), positive=("n",))
    if args.values:
        s["values"] = int_list("--values", args.values)
    rows = [{"value": v, "sum": v * s["n"]} for v in s["values"]]
    return {"machine": machine_info(args.device), "settings": s, "rows": rows,
            "goals": [goal("largest sum <= 1000", float(max(r["sum"] for r in rows)), 1000.0)]}


def markdown(result):
    return "\\n".join([*heading(result), table(result["rows"], [("value", "value"), ("sum", "sum")]), "",
                      goals_table(result["goals"])])
'''


@pytest.fixture
def throwaway_suite(tmp_path, monkeypatch):
    """The package's search path plus a folder holding one new suite file (the package folder itself is not touched)."""
    import lora_diffusion.bench as bench_pkg

    folder = tmp_path / "extra_suites"
    folder.mkdir()
    (folder / "throwaway.py").write_text(THROWAWAY_SUITE)
    (folder / "not_a_suite.py").write_text("HELPER = 1  # a module without the interface is no suite\n")
    monkeypatch.setattr(bench_pkg, "__path__", [*bench_pkg.__path__, str(folder)])
    for name in ("throwaway", "not_a_suite"):
        monkeypatch.delitem(sys.modules, f"lora_diffusion.bench.{name}", raising=False)
    bench_pkg.suites.cache_clear()
    yield bench_pkg
    bench_pkg.suites.cache_clear()
    for name in ("throwaway", "not_a_suite"):
        sys.modules.pop(f"lora_diffusion.bench.{name}", None)


def test_a_new_suite_is_one_file(throwaway_suite, tmp_path, capsys):
    from lora_diffusion.bench.__main__ import build_parser

    found = throwaway_suite.suites()
    assert {"step", "sample", "ray", "asha", "quality", "throwaway"} <= set(found)
    assert not {"not_a_suite", "common"} & set(found)  # modules without the interface are no suites
    assert "throwaway" in build_parser().format_help() and "sums of a few integers" in build_parser().format_help()

    out = tmp_path / "out"
    assert main(["throwaway", "--smoke", "--values", "4,5", "--out", str(out)]) == 0
    result = json.loads((out / "throwaway.json").read_text())
    assert result["suite"] == "throwaway" and result["size"] == "smoke" and result["non_finite"] == []
    assert result["rows"] == [{"value": 4, "sum": 12}, {"value": 5, "sum": 15}]
    assert result["goals"][0]["met"] is True
    md = (out / "throwaway.md").read_text()
    assert "### Benchmark `throwaway` (smoke)" in md and "| 5 | 15 |" in md and result["command"] in md

    # the shared option checks give it the same clear errors (exit 2, nothing written) as the built-in suites
    bad = tmp_path / "bad"
    assert main(["throwaway", "--smoke", "--n", "0", "--out", str(bad)]) == 2
    assert main(["throwaway", "--smoke", "--values", "1,x", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bench throwaway: --n 0: must be >= 1" in err and "--values '1,x': expected comma-separated integers" in err
    assert not bad.exists()
