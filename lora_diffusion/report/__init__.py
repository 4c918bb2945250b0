"""Experiment report: one self-contained HTML page comparing the trials of an MLflow experiment.

    python -m lora_diffusion.report --experiment NAME [--tracking-uri URI] --out report.html

Reads MLflow alone (a sweep's parent run `run_type=sweep` and its trial runs, named as in the
project's naming contract) and writes a page with: the best trials table; parallel coordinates of
the searched parameters against the objective; the objective against trainable parameters per
method (efficiency frontier); learning curves of the top trials; parameter importances (Optuna's
fANOVA on an in-memory study built from the trials); and, for lora_diffusion trials, the
loss per diffusion phase. For a seed study (`python -m lora_diffusion.compare`) the page opens with its
table (mean ± std, 95 % intervals, paired tests against the baseline). Plots are plotly with plotly.js
inlined: the page fetches nothing.

Read in this order:
- cli.py         the command (`main`): its arguments, the page built and written, the exit codes.
- page.py        `build_report`: the sweep read, the sections in page order; `render`: the HTML page.
- sections.py    one function per section of the page (best trials, Pareto front, parallel coordinates, ...).
- sweep_data.py  the sweep read from MLflow (`load_sweep` -> `Sweep` of `Trial`s); `ReportError` (exit code 2).
- __main__.py    `python -m lora_diffusion.report` runs `cli.main`.

Imports: cli -> page -> sections -> sweep_data; sweep_data imports none of them. The names below are the
package's interface (`from lora_diffusion.report import build_report`).
"""

from lora_diffusion.report.cli import main
from lora_diffusion.report.page import build_report, render
from lora_diffusion.report.sections import (Note, Section, best_table, efficiency_frontier, importances,
                                            learning_curves, nondominated, parallel_coordinates, pareto_front,
                                            pareto_section, phase_losses, seed_study)
from lora_diffusion.report.sweep_data import (ReportError, Sweep, Trial, load_sweep, metric_history, metric_mode,
                                              parse_value, resolve_uri, scored, varying_keys)

__all__ = ["main", "build_report", "render", "Note", "Section", "best_table", "efficiency_frontier", "importances",
           "learning_curves", "nondominated", "parallel_coordinates", "pareto_front", "pareto_section",
           "phase_losses", "seed_study", "ReportError", "Sweep", "Trial", "load_sweep", "metric_history",
           "metric_mode", "parse_value", "resolve_uri", "scored", "varying_keys"]
