"""Where the training loop sends its metrics and checkpoints: Ray Train, Ray Tune or a plain process.

The loop in `lora_diffusion.train` is written once against this small interface:

    reporter.report(metrics, checkpoint_dir=None)   # every rank calls it at every report
    reporter.get_checkpoint() -> str | None         # the checkpoint to resume from, if any
    reporter.world_rank, reporter.world_size, reporter.local_rank
    reporter.under_ray                              # live metrics are published only under Ray
    reporter.trial_id, reporter.run_name            # for MLflow tags and live-metric labels

- `RayTrainReporter`: inside a `TorchTrainer` worker (`ray.train.report` / `ray.train.get_checkpoint`).
- `TuneReporter`: inside a Ray Tune function trial that trains in-process, without a nested
  TorchTrainer (`ray.tune.report` / `ray.tune.get_checkpoint`); one rank.
- `LocalReporter`: a plain process, no Ray; keeps the reports in `.reports` and copies every
  checkpoint to `<folder>/checkpoint_<step>`; `resume_from` seeds `get_checkpoint()`.

`checkpoint_dir` is a folder the loop has just written; the reporter persists it (copies it
away) and the loop deletes its own copy afterwards.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps (sorts by step)."""
    return f"checkpoint_{step:07d}"


class LocalReporter:
    """Reports to a list and checkpoints to a folder, in a plain process (tests, benchmarks, notebooks)."""

    under_ray = False
    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, folder: str | Path | None = None, resume_from: str | Path | None = None,
                 run_name: str | None = None, verbose: bool = False):
        self.folder = Path(folder) if folder is not None else None
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []
        self._resume_from = str(resume_from) if resume_from is not None else None
        self.trial_id = None
        self.run_name = run_name
        self.verbose = verbose

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            if self.folder is None:
                raise ValueError("LocalReporter: a checkpoint was reported but no folder was given to keep it")
            step = int(metrics.get("step", len(self.reports)))
            dest = self.folder / checkpoint_name(step)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(checkpoint_dir, dest)
            self.checkpoints.append(dest)

    def get_checkpoint(self) -> str | None:
        """The latest checkpoint this reporter kept, else the `resume_from` folder it was given."""
        if self.checkpoints:
            return str(self.checkpoints[-1])
        return self._resume_from


class RayTrainReporter:
    """Inside a Ray Train (`TorchTrainer`) worker. Every rank must call `report` at the same points."""

    under_ray = True

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.run_name = ctx.get_experiment_name()
        self.trial_id = None
        self._restored: str | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        name = checkpoint_name(int(metrics["step"])) if checkpoint is not None and "step" in metrics else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def get_checkpoint(self) -> str | None:
        """A local copy of the checkpoint Ray restores from (after a worker failure or a driver restart)."""
        import ray.train

        if self._restored is None:
            self._restored = _local_path(ray.train.get_checkpoint())
        return self._restored or None


class TuneReporter:
    """Inside a Ray Tune function trial that trains in its own process (one rank, no TorchTrainer)."""

    under_ray = True
    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self):
        from ray import tune

        ctx = tune.get_context()
        self.trial_id = ctx.get_trial_id()
        self.run_name = ctx.get_trial_name()
        self._restored: str | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(metrics, checkpoint=checkpoint)

    def get_checkpoint(self) -> str | None:
        from ray import tune

        if self._restored is None:
            self._restored = _local_path(tune.get_checkpoint())
        return self._restored or None


def _local_path(ckpt) -> str:
    """The checkpoint's own folder when its storage is a local (or shared) filesystem, else a downloaded copy."""
    if ckpt is None:
        return ""
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem) and Path(ckpt.path).is_dir():
        return str(ckpt.path)
    return ckpt.to_directory()
