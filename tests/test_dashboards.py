"""Live metrics, the Grafana dashboard, the Prometheus configs, and the whole path end to end:
a real tiny sweep on a local Ray cluster -> Prometheus (Debian's) scraping it with the shipped
config -> every Grafana query answered for every trial -> the experiment report from the sweep's
MLflow store in headless Chromium -> `mlflow server` serving the runs the UI compares.

`LORA_DIFFUSION_REPORT_SCREENSHOT=dashboards/report_screenshot.png pytest tests/test_dashboards.py -k end_to_end`
also writes the report's screenshot there (the README shows it).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lora_diffusion import live_metrics

REPO = Path(__file__).resolve().parents[1]
DASH = REPO / "dashboards"
GRAFANA = DASH / "grafana_lora_diffusion.json"
ROWS = ["Progress", "Throughput & memory", "Loss by phase", "Trial comparison"]
METRIC_RE = re.compile(r"\bray_lora_diffusion_[a-z0-9_]+")
RAY_TEMP_ROOT = Path("/tmp/ray")  # Ray's default temp dir: session folders live here


sys.path.insert(0, str(Path(__file__).parent))
from test_report_browser import apt_install, check_report_page, open_page  # noqa: E402


def grafana() -> dict:
    return json.loads(GRAFANA.read_text())


def queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def used_metrics(dash: dict) -> set[str]:
    exprs = [e for _, e in queries(dash)] + [v["query"]["query"] for v in dash["templating"]["list"]
                                             if isinstance(v.get("query"), dict)]
    return {m for e in exprs for m in METRIC_RE.findall(e)}


# --------------------------------------------------------------------------- live_metrics


class FakeGauge:
    """Stands in for ray.util.metrics.Gauge to see what publish() sets (our logic only)."""

    made: list["FakeGauge"] = []

    def __init__(self, name, description="", tag_keys=None):
        self.name, self.tag_keys, self.values = name, tag_keys, []
        FakeGauge.made.append(self)

    def set(self, value, tags=None):
        assert set(tags) == set(self.tag_keys)
        self.values.append((value, dict(tags)))


def test_publish_is_a_no_op_outside_ray(monkeypatch):
    import ray

    assert not ray.is_initialized()
    monkeypatch.setattr(live_metrics, "_gauges", {})
    live_metrics.publish({"loss": 1.0, "step": 3}, {"trial": "t"})
    assert live_metrics._gauges == {}


def test_publish_sets_known_finite_metrics_with_the_three_tags(monkeypatch):
    import ray.util.metrics

    FakeGauge.made = []
    monkeypatch.setattr(live_metrics, "_gauges", {})
    monkeypatch.setattr(live_metrics, "_ray_ready", lambda: True)
    monkeypatch.setattr(ray.util.metrics, "Gauge", FakeGauge)
    import torch

    live_metrics.publish({"loss": 2.5, "step": 10, "lr": torch.tensor(1e-3), "ce_mid": float("nan"),
                          "eval_accuracy": 0.9, "trial_state": "x", "flag": True},
                         {"trial": "trial_1", "task": "sst2", "method": "lora_diffusion", "other": "ignored"})
    live_metrics.publish({"loss": 2.0}, {"trial": "trial_1"})
    by_name = {g.name: g for g in FakeGauge.made}
    assert set(by_name) == {"lora_diffusion_loss", "lora_diffusion_step", "lora_diffusion_lr"}  # created once each
    assert by_name["lora_diffusion_loss"].values == [
        (2.5, {"trial": "trial_1", "task": "sst2", "method": "lora_diffusion"}),
        (2.0, {"trial": "trial_1", "task": "unknown", "method": "unknown"})]
    assert by_name["lora_diffusion_lr"].values[0][0] == pytest.approx(1e-3)
    assert by_name["lora_diffusion_step"].tag_keys == ("trial", "task", "method")


def test_the_metric_names_are_the_shared_contract():
    for name in ("loss", "denoise_loss", "reg_rank", "reg_orth", "ce_early", "ce_mid", "ce_late", "lr",
                 "tokens_per_s", "samples_per_s", "peak_mem_mb", "trainable_params", "total_params", "step",
                 "epoch", "val_loss", "val_denoise_acc"):
        assert name in live_metrics.METRICS
        assert live_metrics.exported_name(name) == f"ray_lora_diffusion_{name}"


# --------------------------------------------------------------------------- Grafana JSON


def test_grafana_json_is_what_the_generator_writes(tmp_path):
    sys.path.insert(0, str(DASH))
    import build_grafana

    assert json.loads(json.dumps(build_grafana.dashboard())) == grafana(), \
        "dashboards/grafana_lora_diffusion.json is stale: run python dashboards/build_grafana.py"


def test_grafana_dashboard_structure():
    d = grafana()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    assert panels[0]["type"] == "row"
    names = {v["name"] for v in d["templating"]["list"]}
    assert names == {"datasource", "SessionName", "task", "method", "trial"}
    occupied = set()
    rows_with_panels = {}
    row = None
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{p['title']}: gridPos {g}"
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{p['title']} overlaps another panel"
        occupied |= cells
        if p["type"] == "row":
            row = p["title"]
            continue
        rows_with_panels.setdefault(row, 0)
        rows_with_panels[row] += 1
        assert p["type"] in {"timeseries", "stat", "bargauge", "table"}
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], f"{p['title']} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            for var in ("$SessionName", "$task", "$method", "$trial"):
                assert var in t["expr"], f"{p['title']}: query ignores {var}: {t['expr']}"
            assert t["expr"].count("(") == t["expr"].count(")") and t["expr"].count("{") == t["expr"].count("}")
    assert set(rows_with_panels) == set(ROWS) and all(n >= 1 for n in rows_with_panels.values())


def test_every_grafana_metric_is_one_live_metrics_exports():
    exported = {live_metrics.exported_name(m) for m in live_metrics.METRICS}
    used = used_metrics(grafana())
    assert used and used <= exported, f"unknown metrics in the dashboard: {used - exported}"
    # the per-phase losses, throughput and memory all have a panel
    for m in ("ce_early", "ce_mid", "ce_late", "tokens_per_s", "samples_per_s", "peak_mem_mb", "loss", "step"):
        assert live_metrics.exported_name(m) in used


# --------------------------------------------------------------------------- Prometheus configs


def test_prometheus_configs_are_valid_and_point_at_ray_service_discovery():
    import yaml
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    promtool = apt_install("prometheus", "promtool")
    for name in ("prometheus.yml", "prometheus_slurm.yml"):
        r = subprocess.run([promtool, "check", "config", str(DASH / name)], capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
    local = yaml.safe_load((DASH / "prometheus.yml").read_text())
    files = local["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert files == [str(RAY_TEMP_ROOT / PROMETHEUS_SERVICE_DISCOVERY_FILE)]
    slurm = yaml.safe_load((DASH / "prometheus_slurm.yml").read_text())
    assert slurm["scrape_configs"][0]["file_sd_configs"][0]["files"] == [PROMETHEUS_SERVICE_DISCOVERY_FILE]


# --------------------------------------------------------------------------- end to end

SPACE = """\
# a tiny real sweep: 3 lora_diffusion trials on builtin:tiny at once, all run to the end; each trains
# for long enough (~10 s here) that Prometheus scrapes it a few times at the shipped 5 s interval
name: dash-e2e
overrides:
  model.base: builtin:tiny
  model.max_length: 40
  task.name: sst2
  task.subset_size: 48
  task.eval_subset_size: 8
  train.max_steps: 300
  train.report_every: 30
  train.eval_every: 30
  train.batch_size: 8
  train.cpus_per_worker: 1
  train.warmup_steps: 1
params:
  method.lora_diffusion.rank_early: {type: categorical, choices: [8, 16, 32]}
  method.lora_diffusion.b1: {type: float, low: 0.2, high: 0.5}
  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
metric: val_loss
sampler: {name: random, seed: 0}
scheduler: {name: none}
num_samples: 3
max_concurrent: 3
"""


def write_data(folder: Path) -> None:
    import random

    rng = random.Random(0)
    good, bad = ["a good film", "great fun", "truly moving"], ["a bad film", "dull and slow", "truly awful"]
    (folder / "sst2").mkdir(parents=True)
    for split, n in (("train", 96), ("validation", 24)):
        with open(folder / "sst2" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = rng.randint(0, 1)
                f.write(json.dumps({"sentence": rng.choice(good if label else bad) + " .", "label": label, "idx": i}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, and its process group, by id."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def wait_for(what: str, check, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = check()
        if out:
            return out
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"{what}: the process exited with {proc.returncode} first\n{tail}")
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what}: not within {timeout_s} s\n{tail}")


def http_json(url: str, data: dict | None = None, timeout: float = 30) -> dict:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def prom(port: int, path: str, **params) -> dict:
    out = http_json(f"http://127.0.0.1:{port}{path}?" + urllib.parse.urlencode(params))
    assert out["status"] == "success", out
    return out["data"]


def check_prometheus(port: int, trials: set[str], start: float, end: float) -> None:
    """Every metric the dashboard uses has samples for every trial; every panel query answers."""
    dash = grafana()
    for metric in sorted(used_metrics(dash)):
        series = prom(port, "/api/v1/series", **{"match[]": metric, "start": f"{start:.0f}", "end": f"{end:.0f}"})
        seen = {s.get("trial") for s in series}
        assert trials <= seen, f"{metric}: no samples for trials {trials - seen} (has {seen})"
    for title, expr in queries(dash):
        q = re.sub(r"\$(SessionName|task|method|trial)\b", ".*", expr)
        data = prom(port, "/api/v1/query_range", query=q, start=f"{start:.0f}", end=f"{end:.0f}", step="2")
        assert data["result"], f"panel {title!r}: no data for {q}"
        if re.match(r"^\w+ by \(trial", q):  # one series per trial
            got = {r["metric"].get("trial") for r in data["result"]}
            assert trials <= got, f"panel {title!r}: trials {trials - got} missing"
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.match(r"label_values\((.+), (\w+)\)$", v["query"]["query"])
            sel = re.sub(r"\$\w+", ".*", m.group(1))
            values = prom(port, f"/api/v1/label/{m.group(2)}/values", **{"match[]": sel, "start": f"{start:.0f}",
                                                                          "end": f"{end:.0f}"})
            assert values, f"variable {v['name']}: no values"
            if v["name"] == "trial":
                assert trials <= set(values)


AXES_JS = "Array.from(document.querySelectorAll('.parcoords .axis-title')).map(e => e.textContent)"


def check_mlflow_server(uri: str, experiment: str, trials: dict, searched: list[str], tmp: Path) -> None:
    """`mlflow server` on 127.0.0.1 over the sweep's store: the REST API has what the UI compares."""
    port = free_port()
    log = tmp / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for("mlflow server /health", up, 120, server, log)
        exp = http_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?"
                        + urllib.parse.urlencode({"experiment_name": experiment}))["experiment"]
        runs = http_json(f"{base}/api/2.0/mlflow/runs/search",
                         {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags) if t.get("run_type") == "sweep"]
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        children = [(r, t) for r, t in zip(runs, tags) if t.get("run_type") == "trial"]
        assert {r["info"]["run_name"] for r, _ in children} == set(trials)
        param_keys = None
        for r, t in children:
            assert t["mlflow.parentRunId"] == parent_id
            assert t["trial_state"] and t["method"] == "lora_diffusion" and t["task"] == "sst2"
            params = {p["key"]: p["value"] for p in r["data"]["params"]}
            metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
            # the UI's compare view lines runs up by key: the same flat keys in every run
            param_keys = param_keys or set(params)
            assert set(params) == param_keys
            for k in ("method.lora_diffusion.rank_early", "method.lora_diffusion.b1", "train.lr"):
                assert k in params
            for k in ("objective", "loss", "val_loss", "ce_early", "ce_mid", "ce_late", "trainable_params"):
                assert k in metrics and math.isfinite(metrics[k]), f"{k} missing in {r['info']['run_name']}"
            hist = http_json(f"{base}/api/2.0/mlflow/metrics/get-history?"
                             + urllib.parse.urlencode({"run_id": r["info"]["run_id"], "metric_key": "loss"}))
            assert len(hist["metrics"]) >= 3, "the learning curve needs the metric at every report"
        # the UI itself is served (the runs page is the client-side route #/experiments/<id>/runs)
        with urllib.request.urlopen(base + "/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read(2000).lower()
        # the UI's Compare view of the trials opens its parallel-coordinates plot on the params
        # that differ between the runs (the first three, sorted) and the first metric the runs share:
        # with flat, stable names the differing params are exactly the searched ones
        ids = json.dumps([r["info"]["run_id"] for r, _ in children])
        url = f"{base}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(json.dumps([exp['experiment_id']]))}"
        page = open_page(url, timeout_s=90, expression=AXES_JS, ready=lambda v: bool(v) and len(v) >= 2)
        axes = page.value or []
        assert axes[:-1] == sorted(searched)[:3], f"parallel coordinates opened on {axes}"
        assert axes[-1] in metrics, f"parallel coordinates metric axis {axes[-1]!r} is not a logged metric"
    finally:
        stop(server)


@pytest.mark.ray
@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_end_to_end_sweep_prometheus_grafana_report_and_mlflow_ui(tmp_path):
    prometheus = apt_install("prometheus", "prometheus")
    apt_install("chromium", "chromium")
    write_data(tmp_path / "data")
    (tmp_path / "space.yaml").write_text(SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           # trials here last seconds: export gauges every second, not every 10 s (Ray's default)
           "RAY_metrics_report_interval_ms": "1000"}
    env.pop("RAY_ADDRESS", None)
    tune_log = tmp_path / "tune.log"
    started = time.time()
    sweep = subprocess.Popen([sys.executable, "-m", "lora_diffusion.tune", str(tmp_path / "space.yaml"),
                              "--data-dir", str(tmp_path / "data"), "--tracking-uri", uri,
                              "--storage-path", str(tmp_path / "tune_results"), "--num-cpus", "3"],
                             cwd=tmp_path, env=env, stdout=open(tune_log, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    prom_proc = None
    try:
        # Ray names the session folder after the process that started the cluster: this sweep's driver
        session = wait_for("the sweep's Ray session folder",
                           lambda: glob.glob(str(RAY_TEMP_ROOT / f"session_*_{sweep.pid}")), 300, sweep, tune_log)
        session = Path(session[0])
        sd_file = session / "prom_metrics_service_discovery.json"
        wait_for("Ray's Prometheus service-discovery file", sd_file.is_file, 300, sweep, tune_log)
        # the shipped per-cluster config, linked into the cluster's folder as its README says
        (session / "prometheus.yml").symlink_to(DASH / "prometheus_slurm.yml")
        port = free_port()
        prom_proc = subprocess.Popen([prometheus, f"--config.file={session / 'prometheus.yml'}",
                                      f"--web.listen-address=127.0.0.1:{port}",
                                      f"--storage.tsdb.path={tmp_path / 'prometheus-data'}"],
                                     stdout=open(tmp_path / "prometheus.log", "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

        def targets_up():
            try:
                active = prom(port, "/api/v1/targets")["activeTargets"]
            except OSError:
                return False
            return active and all(t["health"] == "up" for t in active)

        wait_for("Prometheus scraping the Ray cluster", targets_up, 120, prom_proc, tmp_path / "prometheus.log")
        rc = sweep.wait(timeout=600)
        assert rc == 0, tune_log.read_text()[-5000:]
        end = time.time()

        from lora_diffusion.report import load_sweep

        loaded = load_sweep("dash-e2e", uri)
        trials = {t.name: t for t in loaded.trials}
        assert len(trials) == 3, list(trials)
        check_prometheus(port, set(trials), started, end)
        stop(prom_proc)

        # the report from the sweep's MLflow store, in the browser
        from lora_diffusion.report import main as report_main

        out = tmp_path / "report.html"
        assert report_main(["--experiment", "dash-e2e", "--tracking-uri", uri, "--out", str(out)]) == 0
        assert loaded.metric == "val_loss" and loaded.mode == "min"
        assert set(loaded.searched) == {"method.lora_diffusion.rank_early", "method.lora_diffusion.b1", "train.lr"}
        res = open_page(out)
        (tmp_path / "report.png").write_bytes(res.screenshot)
        shot = os.environ.get("LORA_DIFFUSION_REPORT_SCREENSHOT")
        if shot:
            Path(shot).write_bytes(res.screenshot)
        scored = [t for t in loaded.trials if t.objective is not None and t.state != "FAILED"]
        expected = {"frontier", "curves", "phases"} | ({"parallel", "importance"} if len(scored) >= 3 else set())
        check_report_page(res, expected)

        check_mlflow_server(uri, "dash-e2e", trials, loaded.searched, tmp_path)
    finally:
        stop(sweep)
        if prom_proc is not None:
            stop(prom_proc)
