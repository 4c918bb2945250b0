"""The package's layering, as the README's "Architecture" section draws it: a module imports only from its own
layer or the ones below, and the method core (layer 1) loads without Ray, MLflow or Optuna (a function may
import one lazily for an optional feature, as `adapter.py` imports mlflow only for an MLflow URI).

Read from the source with `ast` (every `import` and `from ... import`, also the ones inside functions), so a
violation fails here before it becomes an import cycle or a Ray dependency of `load_adapter`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_diffusion"

# Layer of each top-level module or subpackage (the README's picture, bottom to top).
LAYERS: dict[str, int] = {
    # 1. the method core: configs, tasks and data, the denoiser, the methods, sampling and scoring, adapter files
    **dict.fromkeys(("config", "tasks", "metrics", "stats", "diffusion", "collator", "data", "model", "methods",
                     "adapter", "checkpoint", "sampling", "scoring", "offline", "precision"), 1),
    # 2. one training run: the loop, where it reports, what it records
    **dict.fromkeys(("train", "train_reporters", "tracking", "live_metrics", "system_metrics", "faults",
                     "ray_runtime", "model_card"), 2),
    # 3. the service: sweeps, search spaces, seed studies, clusters, reports
    **dict.fromkeys(("sweep", "search_space", "compare", "cluster", "report"), 3),
    # 4. commands and benchmarks
    **dict.fromkeys(("tune", "evaluate", "generate", "pretrain", "bench"), 4),
}
LAYER_NAMES = {1: "method core", 2: "training run", 3: "service", 4: "commands"}
CORE_FORBIDDEN = ("ray", "mlflow", "optuna")


def _unit(module: str) -> str | None:
    """`lora_diffusion.sweep.cli` -> `sweep`; `lora_diffusion` itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "lora_diffusion" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        top = id(node) not in lazy
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, top))
            if node.module == "lora_diffusion":  # from lora_diffusion import x
                found += [(node.lineno, f"lora_diffusion.{a.name}", top) for a in node.names]
    return found


def _sources() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts == ("__init__.py",):
            continue
        out.append((rel.with_suffix("").parts[0], path))
    return out


def test_every_module_has_a_layer():
    missing = sorted({unit for unit, _ in _sources()} - set(LAYERS))
    assert not missing, f"add these modules to LAYERS (and to the README's picture): {missing}"


def violations(unit: str, path: Path) -> list[str]:
    """What `path` (in `unit`) imports against the layering, one line per import."""
    mine = LAYERS[unit]
    bad = []
    for line, module, top in _imports(path):
        other = _unit(module)
        if other is not None and other in LAYERS and LAYERS[other] > mine:
            bad.append(f"line {line}: {module} (layer {LAYERS[other]}, {LAYER_NAMES[LAYERS[other]]})")
        if mine == 1 and top and module.split(".")[0] in CORE_FORBIDDEN:
            bad.append(f"line {line}: {module} at module level (the method core loads without it)")
    return bad


@pytest.mark.parametrize("unit,path", _sources(), ids=lambda v: str(v.relative_to(PACKAGE)) if isinstance(v, Path) else v)
def test_imports_only_from_its_layer_or_below(unit, path):
    if unit not in LAYERS:
        pytest.skip("no layer (test_every_module_has_a_layer fails)")
    mine = LAYERS[unit]
    bad = violations(unit, path)
    assert not bad, f"{path.relative_to(PACKAGE)} is layer {mine} ({LAYER_NAMES[mine]}) and imports " + "; ".join(bad)


def test_the_check_sees_an_upward_import_and_a_core_ray_import(tmp_path):
    src = tmp_path / "model.py"
    src.write_text("import ray\nfrom lora_diffusion.sweep.cli import main\n"
                   "def f():\n    import mlflow\n    from lora_diffusion import train\n")
    bad = violations("model", src)
    assert bad == ["line 1: ray at module level (the method core loads without it)",
                   "line 2: lora_diffusion.sweep.cli (layer 3, service)",
                   "line 5: lora_diffusion.train (layer 2, training run)"]
