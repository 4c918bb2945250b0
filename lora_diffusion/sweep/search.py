"""The searcher and the scheduler of a sweep: Optuna (through Ray Tune's OptunaSearch) and ASHA, and where the
Optuna study lives.

Owns: `make_searcher`, `make_scheduler`, the trial naming, the Optuna storage (the journal file in the experiment
folder, or the --optuna-storage RDB URL: chosen, checked, opened, shown) and what ASHA compares (`asha_note`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lora_diffusion.search_space import Space
from lora_diffusion.sweep.checks import SweepError
from lora_diffusion.tracking import OBJECTIVE, is_finite_number, redact_uri

# The Optuna study: a journal file in the experiment folder (appends under a symlink lock: works on NFS, GPFS
# and Lustre, where SQLite's locking does not), or the RDB URL given with --optuna-storage.
JOURNAL_FILE = "optuna_journal.log"
LEGACY_STUDY_DB = "optuna_study.db"  # sweeps started before the journal was the default keep using theirs
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def searcher_metrics(space: Space) -> list[str]:
    """The result keys Optuna is told: `objective` (the first metric), then the second metric by its name."""
    return [OBJECTIVE, *space.metrics[1:]]


def open_optuna_storage(spec: str):
    """An Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or the path of a journal file."""
    import optuna

    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(spec))


def optuna_storage_spec(exp_dir: Path, url: str | None) -> str:
    """What the sweep's study lives in: the --optuna-storage URL, else the experiment folder's journal file
    (or the SQLite file of a sweep started before the journal was the default)."""
    if url:
        return url
    if (exp_dir / LEGACY_STUDY_DB).is_file() and not (exp_dir / JOURNAL_FILE).exists():
        return f"sqlite:///{exp_dir / LEGACY_STUDY_DB}"
    return str(exp_dir / JOURNAL_FILE)


def check_optuna_storage(url: str) -> None:
    """--optuna-storage: an RDB URL Optuna can open (checked by connecting, before any cluster time)."""
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else None
    if scheme not in RDB_SCHEMES:
        raise SweepError(f"--optuna-storage: got {redact_uri(url)!r}; give an RDB URL ({', '.join(s + '://...' for s in RDB_SCHEMES)}), "
                         f"or leave it out for the journal file {JOURNAL_FILE} in the experiment folder")
    if scheme == "sqlite":
        path = url.split(":///", 1)[-1]
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            raise SweepError(f"--optuna-storage: {url}: folder {str(Path(path).parent)!r} does not exist")
    try:
        open_optuna_storage(url)
    except Exception as e:  # noqa: BLE001 - any driver / connection problem, said plainly
        raise SweepError(f"--optuna-storage: cannot open {redact_uri(url)!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def make_searcher(space: Space, storage_url: str):
    from ray.tune.search.optuna import OptunaSearch

    class Search(OptunaSearch):
        """OptunaSearch that ignores reports without the objective (e.g. an eval_* metric exists only at the end)
        and tells a two-objective study a trial without both final values (stopped by ASHA) as pruned."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if OBJECTIVE in result and not self._finished_in_study(trial_id):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if isinstance(self.metric, list) and result and not all(is_finite_number(result.get(m)) for m in self.metric):
                result = None  # Optuna: PRUNED (or FAIL when error); a multi-objective study takes no partial values
            if not self._finished_in_study(trial_id):
                super().on_trial_complete(trial_id, result, error)

        def restore(self, checkpoint_path: str) -> None:  # what Tuner.restore reaches (via restore_from_dir)
            super().restore(checkpoint_path)
            self._restored = True

        def _finished_in_study(self, trial_id: str) -> bool:
            """The study already holds this trial as ended: the driver died after Optuna stored the trial's
            end but before Tune saved its own state, so the restored Tune runs the trial again. Optuna
            refuses to update an ended trial (UpdateFinishedTrialError), which would stop the sweep.
            Only a restored searcher can meet this, so a fresh one does not query the study per report."""
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or not getattr(self, "_restored", False):
                return False
            state = self._ot_study._storage.get_trial(ot_trial._trial_id).state
            return state.is_finished()

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, mode = (searcher_metrics(space), space.modes) if space.multi_objective else (OBJECTIVE, space.mode)
    search = Search(space=space.define_by_run, metric=metric, mode=mode, sampler=space.make_sampler(),
                    storage=open_optuna_storage(storage_url), study_name=space.name,
                    points_to_evaluate=space.points or None)
    with warnings.catch_warnings():  # experimental in some Optuna versions; names the objectives in optuna-dashboard
        warnings.simplefilter("ignore")
        search._ot_study.set_metric_names(space.metrics)
    return search


def make_scheduler(space: Space):
    if space.scheduler_metric is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = space.spec.scheduler
    # stop_last_trials=False: a trial that reaches max_t ends by itself (finishing its evaluation and MLflow run).
    return ASHAScheduler(time_attr="training_iteration", metric=space.scheduler_metric, mode=space.scheduler_mode,
                         max_t=space.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                         stop_last_trials=False)


def trial_name(trial) -> str:
    """A trial's name and its folder's name in the Tune experiment: trial_<trial id>."""
    return f"trial_{trial.trial_id}"


def asha_note(space: Space) -> str:
    """What ASHA compares, said plainly (a two-objective sweep's scheduler sees one metric only)."""
    if space.scheduler_metric is None:
        return "off: every trial runs to the end"
    note = f"on {space.scheduler_mode} {space.scheduler_metric}"
    if space.multi_objective:
        note += (f" (one metric; the Pareto front is of the final {' and '.join(space.metrics)}; a trial ASHA stops "
                 "has no final values and is not on it)")
    return note


def shown_storage(spec: str) -> str:
    """The Optuna storage as printed and recorded: a URL with its credentials masked, or the journal's path."""
    return redact_uri(spec) if "://" in spec else str(Path(spec))
