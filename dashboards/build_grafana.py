"""Writes `grafana_lora_diffusion.json`, the Grafana dashboard for the live training metrics.

Run `python dashboards/build_grafana.py` after changing the panels; a test checks that the
committed JSON is what this script writes. Every query names a metric exported by
`lora_diffusion.live_metrics` (Ray prefixes it with `ray_`: `ray_lora_diffusion_<metric>`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_diffusion.live_metrics import exported_name  # noqa: E402

OUT = Path(__file__).with_name("grafana_lora_diffusion.json")
UID = "loraDiffusionTraining"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every query is filtered by the dashboard's variables.
FILTER = 'SessionName=~"$SessionName",task=~"$task",method=~"$method",trial=~"$trial"'
BY_TRIAL = "trial"


def m(metric: str) -> str:
    """`ray_lora_diffusion_<metric>{<variables>}`."""
    return f"{exported_name(metric)}{{{FILTER}}}"


def per_trial(metric: str, agg: str = "max") -> str:
    # Each DDP worker of a trial exports its own series (label WorkerId) of the same all-reduced
    # values (peak memory is per worker): fold them per trial.
    return f"{agg} by ({BY_TRIAL}) ({m(metric)})"


class Layout:
    """Hands out panel ids and grid positions, 24 columns wide, row by row."""

    def __init__(self) -> None:
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1
        self.panels: list[dict] = []

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {"type": "row", "id": self._id(), "title": title, "collapsed": False, "panels": [],
             "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}}
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def panel(self, kind: str, title: str, description: str, targets: list[tuple[str, str]],
              unit: str = "short", w: int = 8, h: int = 8, instant: bool = False, **options) -> None:
        if self.x + w > 24:
            self._newline()
        panel = {
            "type": kind,
            "id": self._id(),
            "title": title,
            "description": description,
            "datasource": DATASOURCE,
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": options,
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                 "legendFormat": legend, "instant": instant, "range": not instant}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1,
                                                          "showPoints": "auto", "spanNulls": True}
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                "tooltip": {"mode": "multi", "sort": "desc"}, **options}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def variable(name: str, label: str, description: str) -> dict:
    # each variable's choices are narrowed by the variables before it
    others = ",".join(f'{k}=~"${k}"' for k in order_before(name))
    selector = exported_name("step") + (f"{{{others}}}" if others else "")
    query = f"label_values({selector}, {name})"
    return {
        "name": name, "label": label, "type": "query", "description": description,
        "datasource": DATASOURCE, "definition": query,
        "query": {"query": query, "refId": "StandardVariableQuery"},
        "refresh": 2, "hide": 0, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def order_before(name: str) -> tuple[str, ...]:
    order = ("SessionName", "task", "method", "trial")
    return order[: order.index(name)]


def dashboard() -> dict:
    L = Layout()

    L.row("Progress")
    L.panel("timeseries", "Optimizer step", "Step reached by each trial (the gauge `step`).",
            [(per_trial("step"), "{{trial}}")])
    L.panel("timeseries", "Training loss", "Total loss (denoising + regularisers) at each report.",
            [(per_trial("loss", "avg"), "{{trial}}")])
    L.panel("timeseries", "Validation loss", "Periodic validation loss (train.eval_every > 0).",
            [(per_trial("val_loss", "avg"), "{{trial}}")])
    L.panel("stat", "Trials reporting", "Trials whose workers currently export metrics.",
            [(f"count(max by ({BY_TRIAL}) ({m('step')}))", "trials")], w=6, h=5,
            reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}, colorMode="value")
    L.panel("timeseries", "Epoch", "Epoch of each trial.", [(per_trial("epoch"), "{{trial}}")], w=9, h=5)
    L.panel("timeseries", "Validation denoising accuracy", "Token-level denoising accuracy on validation.",
            [(per_trial("val_denoise_acc", "avg"), "{{trial}}")], unit="percentunit", w=9, h=5)

    L.row("Throughput & memory")
    L.panel("timeseries", "Tokens per second", "Training throughput of each trial, summed over its workers by the loop.",
            [(per_trial("tokens_per_s"), "{{trial}}")], unit="none", w=6)
    L.panel("timeseries", "Samples per second", "Training examples per second of each trial, summed over its workers by the loop.",
            [(per_trial("samples_per_s"), "{{trial}}")], unit="none", w=6)
    L.panel("timeseries", "Peak memory", "Peak memory of the busiest worker of each trial (GPU if any, else RSS).",
            [(per_trial("peak_mem_mb"), "{{trial}}")], unit="decmbytes", w=6)
    L.panel("timeseries", "Learning rate", "Scheduled learning rate.",
            [(per_trial("lr"), "{{trial}}")], unit="none", w=6)

    L.row("Loss by phase")
    for phase, span in (("early", "t > b2"), ("mid", "b1 < t <= b2"), ("late", "t <= b1")):
        L.panel("timeseries", f"CE {phase} ({span})",
                f"Masked cross-entropy on {phase}-phase timesteps ({span}), per trial.",
                [(per_trial(f"ce_{phase}", "avg"), "{{trial}}")])
    L.panel("timeseries", "Phase means over selected trials",
            "Mean per-phase cross-entropy over the selected trials: which part of the trajectory is hardest.",
            [(f"avg({m('ce_' + p)})", p) for p in ("early", "mid", "late")], w=12)
    L.panel("timeseries", "Denoising loss and regularisers",
            "Denoising loss and LoRA-Diffusion's rank and orthogonality regularisers (0 for other methods).",
            [(per_trial("denoise_loss", "avg"), "denoise {{trial}}"),
             (per_trial("reg_rank", "avg"), "rank {{trial}}"),
             (per_trial("reg_orth", "avg"), "orth {{trial}}")], w=12)

    L.row("Trial comparison")
    bars = {"displayMode": "gradient", "orientation": "horizontal",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    L.panel("bargauge", "Latest training loss by trial", "Last reported loss; lower is better.",
            [(f"avg by (trial, method) ({m('loss')})", "{{trial}} ({{method}})")], instant=True, **bars)
    L.panel("bargauge", "Latest validation loss by trial", "Last validation loss; lower is better.",
            [(f"avg by (trial, method) ({m('val_loss')})", "{{trial}} ({{method}})")], instant=True, **bars)
    L.panel("bargauge", "Trainable parameters by trial", "Parameters the method trains (adapters + encoder).",
            [(f"max by (trial, method) ({m('trainable_params')})", "{{trial}} ({{method}})")],
            instant=True, **bars)
    L.panel("table", "Trials", "One line per trial: method, task, step, loss, trainable and total parameters.",
            [(f"max by (trial, task, method) ({m('step')})", "step"),
             (f"avg by (trial, task, method) ({m('loss')})", "loss"),
             (f"max by (trial, task, method) ({m('trainable_params')})", "trainable"),
             (f"max by (trial, task, method) ({m('total_params')})", "total")],
            w=24, h=8, instant=True, showHeader=True)
    # a table shows one frame per query; merge them into one line per trial
    L.panels[-1]["transformations"] = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": {"Time": True},
                                       "renameByName": {"Value #A": "step", "Value #B": "loss",
                                                        "Value #C": "trainable params",
                                                        "Value #D": "total params"}}},
    ]
    for t in L.panels[-1]["targets"]:
        t["format"] = "table"

    return {
        "title": "LoRA-Diffusion training",
        "uid": UID,
        "description": "Live training metrics of lora-diffusion trials (lora_diffusion.live_metrics via Ray's Prometheus export).",
        "tags": ["ray", "lora-diffusion"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "description": "The Prometheus that scrapes the Ray cluster (Ray's Grafana set-up names it Prometheus).",
             "current": {"selected": True, "text": "Prometheus", "value": "Prometheus"},
             "hide": 0, "includeAll": False, "multi": False, "refresh": 1, "regex": ""},
            variable("SessionName", "Ray session", "The Ray cluster session (one per ray start / ray.init)."),
            variable("task", "Task", "Task of the trials."),
            variable("method", "Method", "Adaptation method of the trials."),
            variable("trial", "Trial", "Ray Tune trial (or training run) name."),
        ]},
        "panels": L.panels,
    }


def main() -> None:
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
