"""The command: `python -m lora_diffusion.report --experiment NAME [--tracking-uri URI] --out report.html`.

Checks its arguments (exit code 2 before MLflow is read), builds the page, writes it; a `ReportError`
(no such store or experiment, no metric to rank on) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_diffusion.report.page import build_report
from lora_diffusion.report.sweep_data import ReportError
from lora_diffusion.tracking import OBJECTIVE

DESCRIPTION = "Experiment report: one self-contained HTML page comparing the trials of an MLflow experiment."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_diffusion.report", description=DESCRIPTION)
    ap.add_argument("--experiment", required=True, help="MLflow experiment name (the sweep name)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    ap.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    ap.add_argument("--metric", default=None,
                    help=f"compare on this logged metric instead of {OBJECTIVE!r} (e.g. eval_accuracy)")
    ap.add_argument("--mode", choices=("min", "max"), default=None,
                    help="whether lower or higher is better (default: the sweep's mode, else min for losses)")
    ap.add_argument("--top", type=int, default=5, help="trials in the learning-curve and phase plots (default 5)")
    ap.add_argument("--top-table", type=int, default=25, help="rows of the best trials table (default 25)")
    args = ap.parse_args(argv)
    for name in ("top", "top_table"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; must be >= 1")
    out = Path(args.out)
    if not out.parent.is_dir():
        ap.error(f"--out: folder {str(out.parent)!r} does not exist")
    try:
        page, sweep = build_report(args.experiment, args.tracking_uri, args.metric, args.mode, args.top,
                                   args.top_table)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page) / 1e6:.1f} MB): {len(sweep.trials)} trials of {args.experiment!r}, "
          f"objective {sweep.metric} ({sweep.mode})")
    return 0
