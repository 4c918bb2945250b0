"""The page: `build_report` reads the sweep, makes the sections in page order and `render` writes them as one
self-contained HTML page (plotly.js inlined once: the page fetches nothing).
"""

from __future__ import annotations

import datetime as dt
import html

from lora_diffusion.report.sections import (Note, Section, best_table, efficiency_frontier, importances,
                                            learning_curves, parallel_coordinates, pareto_section, phase_losses,
                                            seed_study)
from lora_diffusion.report.sweep_data import Sweep, load_sweep

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:18px 32px}
header h1{margin:0 0 6px;font-size:22px} header p{margin:2px 0;font-size:13px;color:#cfd8dc}
nav{padding:8px 32px;background:#eceff1;font-size:14px} nav a{margin-right:16px;color:#263238}
main{padding:8px 32px 40px} section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:18px 0;padding:8px 18px 14px}
h2{font-size:18px;margin:10px 0 4px} h3{font-size:15px} .intro{font-size:13px;color:#555;margin:0 0 10px}
table.trials{border-collapse:collapse;font-size:12px;width:100%;overflow-x:auto;display:block}
table.trials th,table.trials td{border-bottom:1px solid #eee;padding:4px 8px;text-align:right;white-space:nowrap}
table.trials th{background:#f5f5f5;position:sticky;top:0} table.trials td:nth-child(2){text-align:left}
tr.best td{background:#e8f5e9;font-weight:600} td.state-failed{color:#c62828} td.state-pruned{color:#8d6e63}
p.note{background:#fff8e1;border-left:4px solid #ffb300;padding:8px 12px;font-size:13px}
code{font-size:12px} .plot{min-height:200px}
"""


def _figure_html(fig, div_id: str) -> str:
    import plotly.io as pio

    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def render(sweep: Sweep, sections: list[Section]) -> str:
    """The whole page, plotly.js inlined once."""
    from plotly.offline import get_plotlyjs

    body, n = [], 0
    for s in sections:
        chunks = [f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2><p class="intro">{s.intro}</p>']
        for part in s.parts:
            if isinstance(part, Note):
                chunks.append(f'<p class="note">{html.escape(part.text)}</p>')
            elif isinstance(part, str):
                chunks.append(part)
            else:
                n += 1
                chunks.append(f'<div class="plot" data-section="{s.anchor}">{_figure_html(part, f"plot-{n}")}</div>')
        chunks.append("</section>")
        body.append("".join(chunks))
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    parents = ", ".join(p.info.run_id for p in sweep.parents) or "(no sweep run)"
    notes = "".join(f'<p class="note">{html.escape(t)}</p>' for t in sweep.notes)
    generated = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(sweep.experiment)} — lora-diffusion report</title>
<style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<header><h1>Experiment {html.escape(sweep.experiment)}</h1>
<p>MLflow store <code>{html.escape(sweep.shown_uri)}</code> · experiment id {html.escape(sweep.experiment_id)} ·
sweep run {html.escape(parents)} · objective: {html.escape(sweep.metric)} ({sweep.mode}) · generated {generated}</p>
<p>Open the runs in the MLflow UI: <code>mlflow ui --backend-store-uri {html.escape(sweep.shown_uri)} --host 127.0.0.1</code>
then <code>http://127.0.0.1:5000/#/experiments/{html.escape(sweep.experiment_id)}/runs</code></p></header>
<nav>{nav}</nav>
<main>{notes}{"".join(body)}</main>
</body></html>
"""


def build_report(experiment: str, tracking_uri: str | None = None, metric: str | None = None,
                 mode: str | None = None, top: int = 5, top_table: int = 25) -> tuple[str, Sweep]:
    """The report page for an MLflow experiment, and the sweep it was read from."""
    sweep = load_sweep(experiment, tracking_uri, metric, mode)
    sections = [best_table(sweep, top_table), parallel_coordinates(sweep), efficiency_frontier(sweep),
                learning_curves(sweep, top), importances(sweep)]
    pareto = pareto_section(sweep)
    if pareto is not None:
        sections.insert(1, pareto)
    phases = phase_losses(sweep, top)
    if phases is not None:
        sections.append(phases)
    study = seed_study(sweep)
    if study is not None:  # a seed study: its table is the headline
        sections.insert(0, study)
    return render(sweep, sections), sweep
