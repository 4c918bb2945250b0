"""The tuning service: a search space in, a Ray Tune sweep with Optuna + ASHA out, every trial in MLflow.

This module is the command (`python -m lora_diffusion.tune` runs its `main`): the arguments, the dry run,
the order of the steps below and the exit codes; the pieces it calls live beside it in lora_diffusion/sweep/.

    python -m lora_diffusion.tune tune_spaces/quick.yaml --data-dir /path/to/data
    python -m lora_diffusion.tune SPACE.yaml --dry-run              # resolved space, samples, resource plan; no Ray
    python -m lora_diffusion.tune SPACE.yaml --resume               # continue an interrupted sweep
    python -m lora_diffusion.tune SPACE.yaml train.max_steps=50     # overrides of the space's base config

What happens, top to bottom (`main`):
1. The space file is loaded and validated, the base config resolved (search_space/), the MLflow
   store, the data and the base model checked -- all before any cluster time is spent.
2. Ray: a fresh local cluster (dashboard on 127.0.0.1, its address printed), or the cluster at
   $RAY_ADDRESS (e.g. the one cluster/ starts inside a SLURM allocation). On several nodes the
   MLflow store and the storage path must be visible from every node: that is checked for real.
3. MLflow: one experiment per sweep name; a parent run for the sweep (the space file, later the
   Optuna study summary and the best trial); one nested child run per trial, found again by its
   `ray_trial_id` tag when a trial restarts, so a resumed sweep never duplicates a trial.
4. Tune: `Tuner` over `run_trial` with `OptunaSearch(space=define_by_run, metric="objective")`
   and ASHA (its own metric/mode). A one-worker trial runs the training loop in the trial
   process (`TuneReporter`); a multi-worker trial builds and fits a `TorchTrainer` and reports
   through `TuneReportCallback`. Experiment names are deterministic (`<storage>/<sweep name>`):
   an existing experiment is restored (`Tuner.restore`) -- finished and failed trials are kept,
   unfinished ones continue from their last checkpoint. SIGINT, SIGTERM or SIGUSR1 stop the
   sweep with its state saved, so a requeued job resumes with `--resume`.
5. At the end: the best trials table, `best.json`, the best adapter registered in the MLflow
   model registry (`models:/<model_name>/<version>`, lineage = its trial's run).

The sweep workflow around it:
- The Optuna study lives in `<experiment folder>/optuna_journal.log` (JournalStorage, file backend: safe on
  NFS/GPFS/Lustre) unless `--optuna-storage URL` names an RDB; `optuna-dashboard <journal>` browses it.
- `--resume --num-samples N` (N larger than before) extends a finished sweep: the saved search state's trial
  count is raised (`extend_search`), so the same study and the same MLflow parent run get the new trials.
- `initial_points:` in the space and `--warm-start SWEEP_OR_BEST_JSON` enqueue configs (OptunaSearch
  points_to_evaluate), each checked against the space's ranges, conditions and constraints first.
- Two metrics (`metric: [a, b]`, `mode: [max, min]`) make a multi-objective study: Optuna is told
  [`objective`, b]; ASHA compares its one scheduler metric; `best.json` holds the Pareto front.

Trial states in MLflow (tag `trial_state`): RUNNING, FINISHED, FAILED (with an `error` tag), PRUNED
(stopped early by ASHA: its last report came before `train.max_steps`), INTERRUPTED (the driver was
stopped; a resume continues it), LOST (started after the last saved sweep state of a driver that was
killed; its run is soft-deleted on resume and a new trial takes its place).

Restore decision: failed trials stay failed (`resume_errored=False`: a deterministic error would only
repeat); `--retry-failed` runs them again from their last checkpoint. A trial that ended after the
last state save of a killed driver is not retrained: its MLflow run says how it ended, and the trial
reports that result again.

Exit codes: 0 done; 2 bad input (nothing started); 130 (SIGINT / SIGUSR1) or 143 (SIGTERM) when
interrupted with the sweep saved -- rerun the same command (with --resume) to continue; 75 when a fault
of the environment stopped it with the sweep saved (the MLflow server stayed away longer than MLflow's
retries, or a disk filled up: faults.py) -- fix that, then rerun with --resume.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from lora_diffusion.ray_runtime import start_ray
from lora_diffusion.search_space import Space, SpaceError, load_space
from lora_diffusion.sweep.callbacks import trial_states_callback
from lora_diffusion.sweep.checks import (DEFAULT_STORAGE, SweepError, check_cluster, check_restore_ownership,
                                         check_storage_path, preflight)
from lora_diffusion.sweep.results import cell, finish_sweep, trials_table
from lora_diffusion.sweep.resume import (SWEEP_FILE, check_restorable, extend_search, fingerprint_storage,
                                         forget_lost_trials, record_missed_ends, save_tune_decisions,
                                         sweep_fingerprint, warm_start_points)
from lora_diffusion.sweep.runs import artifact_location, local_store_dir, mark_interrupted, start_parent_run
from lora_diffusion.sweep.search import (JOURNAL_FILE, asha_note, check_optuna_storage, make_scheduler, make_searcher,
                                         optuna_storage_spec, shown_storage, trial_name)
from lora_diffusion.sweep.states import FAILED, FINISHED, PRUNED, RUNNING
from lora_diffusion.sweep.trial import run_trial
from lora_diffusion.tracking import RunTracker, client, ensure_experiment, error_text, redact_uri

HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node (a TorchTrainer trial asks 0.001)
WARM_START_K = 3


def print_where(space: Space, exp_dir: Path, uri: str, experiment_id: str | None, dashboard: str | None,
                optuna_storage: str | None = None) -> None:
    """Where the sweep's things are: its folder, the Optuna study, the Ray dashboard, the MLflow experiment and UI."""
    print(f"[tune] experiment folder: {exp_dir}")
    if optuna_storage:
        shown = shown_storage(optuna_storage)
        print(f"[tune] Optuna study {space.name!r} in {shown}; browse it: optuna-dashboard {shown} --host 127.0.0.1 --port 8080")
    if dashboard:
        print(f"[tune] Ray dashboard: {dashboard}")
    print(f"[tune] MLflow: experiment {space.name!r}" + (f" (id {experiment_id})" if experiment_id else "")
          + f" at {redact_uri(uri)}")
    if uri.startswith("sqlite:///") or "://" not in uri:
        art = artifact_location(uri, space.name)
        print(f"[tune] MLflow UI: mlflow ui --backend-store-uri {uri}"
              + (f" --default-artifact-root {Path(art).parent}" if art else "") + " --host 127.0.0.1 --port 5000"
              + (f"  ->  http://127.0.0.1:5000/#/experiments/{experiment_id}/runs" if experiment_id else ""), flush=True)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m lora_diffusion.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("space", help="search space YAML (see tune_spaces/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the space's base config, e.g. train.max_steps=50")
    p.add_argument("--data-dir", help="local data folder (<dir>/<task>/<split>.jsonl); default $LORA_DIFFUSION_DATA_DIR, else the Hub")
    p.add_argument("--name", help="sweep name (default: the space's `name`); names the experiment folder and MLflow experiment")
    p.add_argument("--storage-path", help=f"where Tune keeps experiments (default ./{DEFAULT_STORAGE}); shared storage on a cluster")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.tracking_uri, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)")
    p.add_argument("--num-samples", type=int, help="number of trials (default: the space's num_samples); with --resume, "
                   "a larger count extends a finished sweep (same Optuna study, same MLflow parent run)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name (error if there is none)")
    p.add_argument("--optuna-storage", metavar="URL", help=f"Optuna RDB storage URL (postgresql://..., sqlite:///...); default: "
                   f"the journal file {JOURNAL_FILE} in the experiment folder (safe on cluster file systems)")
    p.add_argument("--warm-start", metavar="SWEEP_OR_BEST_JSON", help="try the best configs of an earlier sweep first "
                   "(its name under --storage-path, its folder, or its best.json)")
    p.add_argument("--warm-start-k", type=int, default=WARM_START_K, help=f"how many of its best configs (default {WARM_START_K})")
    p.add_argument("--retry-failed", action="store_true", help="with a restore: run failed trials again from their last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the resolved space, sample configs and the resource plan; start nothing")
    p.add_argument("--samples", type=int, default=5, help="configs to sample in --dry-run (default 5)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray cluster without its dashboard")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before or after the flags
    for flag in ("--samples", "--num-samples", "--num-cpus", "--warm-start-k"):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and value < 1:
            p.error(f"{flag}: got {value}; must be >= 1")  # exit code 2, before anything is loaded
    return args


def dry_run(space: Space, exp_dir: Path, uri: str, n: int) -> int:
    print(space.describe())
    print()
    samples = space.sample(n)
    print(f"first {len(samples)} of {space.spec.num_samples} sampled configs (seed {space.spec.sampler.seed}; constraints checked):")
    for i, s in enumerate(samples, 1):
        print(f"  {i}: " + ", ".join(f"{k.split('.')[-1]}={cell(v)}" for k, v in s.items()))
    print()
    print(space.resource_plan())
    print()
    state = "exists: it will be resumed" if (exp_dir / SWEEP_FILE).is_file() else "new"
    print(f"experiment folder: {exp_dir} ({state})")
    print(f"MLflow: experiment {space.name!r} at {redact_uri(uri)}; best adapter registered as {space.model_name!r}")
    print(f"trials: {space.spec.num_samples}")
    print(f"checked as a real run checks before it starts Ray: data files, base model(s), MLflow store "
          f"{redact_uri(uri)}, storage path {exp_dir.parent} (resources: against the cluster when the sweep starts)")
    print("dry run: nothing started")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lora_diffusion.config import ConfigError
    from lora_diffusion.tasks import DataError
    from lora_diffusion.tracking import TrackingError, resolve_tracking_uri

    # -- 1. the space, the paths, the checks (no Ray yet) -----------------------------------------
    try:
        data_dir = str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None
        space = load_space(args.space, overrides=args.overrides, name=args.name, num_samples=args.num_samples, data_dir=data_dir)
        from lora_diffusion.train import absolutize

        space.rebase(absolutize(space.base))
        storage = Path(args.storage_path or DEFAULT_STORAGE).expanduser().resolve()
        check_storage_path(storage)
        exp_dir = storage / space.name
        uri = resolve_tracking_uri(args.tracking_uri or space.base.tracking.tracking_uri)
        if args.warm_start:
            points, found = warm_start_points(args.warm_start, storage, space, args.warm_start_k)
            space.add_points(points, f"--warm-start {found}")
            print(f"[tune] warm start: the best {len(points)} config(s) of {found} are tried first", flush=True)
        if args.dry_run:  # the same checks a real run makes before Ray starts; a failure exits 2 as there
            preflight(space, uri, check_resources=False)
            return dry_run(space, exp_dir, uri, args.samples)
        if args.optuna_storage:
            check_optuna_storage(args.optuna_storage)
        storage_url = optuna_storage_spec(exp_dir, args.optuna_storage)
        fingerprint = fingerprint_storage(storage_url, exp_dir)
        restoring = (exp_dir / SWEEP_FILE).is_file()
        if args.resume and not restoring:
            raise SweepError(f"--resume: no sweep {space.name!r} in {storage} (no {exp_dir / SWEEP_FILE}); run without --resume to start it")
        extend_from = None
        if restoring:
            check_restore_ownership(storage, exp_dir)
            planned = check_restorable(exp_dir, space, fingerprint)
            if planned is not None and space.spec.num_samples < planned:
                raise SweepError(f"num_samples: sweep {space.name!r} is planned with {planned} trials, got {space.spec.num_samples}; "
                                 f"resume it with --num-samples {planned} (or more, to extend it): a sweep is never shrunk")
            if planned is not None and space.spec.num_samples > planned:
                extend_from = planned
        preflight(space, uri)
    except (SpaceError, SweepError, ConfigError, DataError, TrackingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # -- 2. Ray and MLflow ---------------------------------------------------------------------------
    import ray
    from ray import tune

    from lora_diffusion import faults as env_faults

    interrupted_by: list[int] = []

    def on_term(signum, frame):  # SIGTERM (SLURM, requeue) -> the graceful stop Tune gives SIGINT
        interrupted_by.append(signum)
        os.kill(os.getpid(), signal.SIGINT)

    # The objective exists only in reports that carry the space's metric (eval_* at the end; ASHA has its own).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Every report checkpoints, so Tune snapshots the sweep state often (what a resume needs); no warning for it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = time.time()
    connected = False
    parent_run_id = None
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        connected, dashboard = start_ray(args.num_cpus, not args.no_dashboard, reuse=False)
        signal.signal(signal.SIGTERM, on_term)  # after ray.init: Ray's core installs its own (abort) handler
        faults = env_faults.watch(space.name)  # a trial's tracking-store or disk fault stops the sweep resumably
        faults.close()  # a fault box left by an earlier driver of this sweep on a lasting cluster
        for w in check_cluster(uri, storage, space):
            print(f"[tune] warning: {w}", flush=True)
        experiment_id = ensure_experiment(uri, space.name, artifact_location(uri, space.name), "sweep name with --name")
        parent_run_id = start_parent_run(uri, space, experiment_id)
        print_where(space, exp_dir, uri, experiment_id, dashboard, storage_url)
        exp_dir.mkdir(parents=True, exist_ok=True)
        sweep = {"name": space.name, "base": space.base.to_dict(), "metric": space.metric, "tracking_uri": uri,
                 "experiment": space.name, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                 "trial_runner": space.trial_runner, "train_storage": str(exp_dir / "train"),
                 "retry_failed": args.retry_failed,
                 # Tune's trial table shows the first 4 metrics of the first report: make them these
                 "console_metrics": tuple(dict.fromkeys(["step", space.scheduler_metric or "loss", space.metric, "loss"]))}

        # -- 3. the Tuner (new or restored) ------------------------------------------------------------
        res = space.resources_per_trial()["trial"]
        resources = {k.lower(): v for k, v in res.items() if v or k == "CPU"}
        if space.trial_runner != "in_process":
            # The trial process only waits on its TorchTrainer, and Ray Train puts the trainer's controller on
            # the same node: keep both on the head (as Ray Train does with its state actor). A lost worker node
            # then costs the trial its Ray Train workers, which restart from the last checkpoint
            # (train.max_failures), not the trial itself (Tune would record it FAILED; cluster/README.md).
            resources[HEAD_NODE_RESOURCE] = 0.001
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), resources)
        can_restore = restoring and tune.Tuner.can_restore(str(exp_dir))
        if can_restore and extend_from is not None:
            extend_search(exp_dir, space.spec.num_samples)
            client(uri).set_tag(parent_run_id, "extended", f"{extend_from} -> {space.spec.num_samples} trials")
            print(f"[tune] extending sweep {space.name!r} from {extend_from} to {space.spec.num_samples} trials "
                  "(same Optuna study, same MLflow parent run)", flush=True)
        if not restoring or extend_from is not None:
            (exp_dir / SWEEP_FILE).write_text(json.dumps(sweep_fingerprint(space, fingerprint), indent=2))
        if space.multi_objective:
            print(f"[tune] objectives: {', '.join(f'{x} {m}' for m, x in zip(space.metrics, space.modes))} (Optuna "
                  f"{space.spec.sampler.name}, Pareto front); ASHA {asha_note(space)}", flush=True)
        if can_restore:
            forget_lost_trials(uri, experiment_id, parent_run_id, exp_dir)
            record_missed_ends(sweep, exp_dir)
            print(f"[tune] resuming sweep {space.name!r} from {exp_dir} (finished trials are kept"
                  + (", failed ones run again" if args.retry_failed else ", failed ones stay failed") + ")", flush=True)
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=args.retry_failed, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=make_searcher(space, storage_url), scheduler=make_scheduler(space),
                                            num_samples=space.spec.num_samples, max_concurrent_trials=space.spec.max_concurrent,
                                            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                            # an in-process trial imports torch/transformers/datasets: keep the process
                                            reuse_actors=space.trial_runner == "in_process"),
                run_config=tune.RunConfig(
                    name=space.name, storage_path=str(storage), callbacks=[trial_states_callback(sweep), faults.callback()],
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
            )
        fitted = tuner.fit()
        wall = time.time() - started
        if faults.items:  # stopped for a fault of the environment: say which, touch nothing more
            faults.close()
            return fault_exit(faults.items, uri, space, exp_dir, storage)
        for t in save_tune_decisions(exp_dir, fitted._experiment_analysis.trials):
            print(f"[tune] trial {t}: Tune's saved state corrected (its process was lost with its node)", flush=True)

        # -- 4. results --------------------------------------------------------------------------------
        rows_state = _states(exp_dir)
        interrupted = bool(interrupted_by) or rows_state["unfinished"] > 0 or rows_state["total"] < space.spec.num_samples
        result = finish_sweep(space, exp_dir, uri, experiment_id, parent_run_id, storage_url, interrupted, wall)
    except KeyboardInterrupt:
        print(f"[tune] interrupted before the sweep started; rerun with --resume", file=sys.stderr)
        return 130
    except (SweepError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        fault = env_faults.fault_of(e)
        if fault is not None:  # e.g. the Optuna study's disk filled up in the driver, or the store went away
            return fault_exit([("the sweep driver", fault)], uri, space, exp_dir, storage)
        if parent_run_id is not None:
            RunTracker(uri, parent_run_id, owned=True).end("FAILED", error=error_text(e))
        raise
    finally:
        if connected:
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous_term)

    c = result["counts"]
    print()
    print(f"[tune] sweep {space.name!r}: {c[FINISHED]} finished, {c[PRUNED]} stopped early by ASHA, {c[FAILED]} failed"
          + (f", {c[RUNNING]} unfinished" if c[RUNNING] else "") + f" in {wall:.0f} s")
    front = result.get("pareto_front")
    if result["trials"]:
        print(f"[tune] best trials by {space.mode} {space.metric}" + (" ('*': on the Pareto front)" if front is not None else "") + ":")
        print(trials_table(result["trials"], space, space.mode, front=front))
    if front is not None:
        print(f"[tune] Pareto front of {', '.join(f'{x} {m}' for m, x in zip(space.metrics, space.modes))}: {len(front)} trial(s)")
        for f in front:
            print(f"[tune]   {f['trial_name']}: " + ", ".join(f"{m}={cell(v)}" for m, v in f["values"].items())
                  + f"  MLflow run {f['run_id']}")
    b = result["best"]
    if b:
        print(f"[tune] best: {b['trial_name']} {space.metric}={b['objective']:.4g}  MLflow run {b['run_id']}")
        print(f"[tune] best adapter: {b['model_uri'] or b['adapter_uri']}  (lora_diffusion.adapter.load_adapter accepts it)")
    print(f"[tune] results: {exp_dir / 'best.json'}")
    print_where(space, exp_dir, uri, experiment_id, None, storage_url)
    if interrupted:
        print(f"[tune] the sweep was interrupted; its state is saved. Continue it with the same command plus --resume",
              flush=True)
        return 143 if signal.SIGTERM in interrupted_by else 130
    return 0


def fault_exit(items: list, uri: str, space: Space, exp_dir: Path, storage: Path) -> int:
    """The sweep was stopped for a fault of the environment (faults.py): say what and where, mark the MLflow
    runs INTERRUPTED when the store still answers, and return EXIT_FAULT. Nothing recorded is touched otherwise."""
    from lora_diffusion.faults import DISK, EXIT_FAULT, TRACKING, space_report

    kinds = {f.kind for _, f in items}
    where = "; ".join(dict.fromkeys(f"{w}: {f}" for w, f in items))
    lines = [f"error: the sweep stopped: {where}"]
    if TRACKING in kinds:
        lines.append(f"  tracking URI {redact_uri(uri)} does not answer; start the MLflow server again (same store)")
    if DISK in kinds:
        folders = {"storage path": exp_dir, "temporary folder": Path(tempfile.gettempdir())}
        store = local_store_dir(uri)
        if store is not None:
            folders["MLflow store"] = store
        art = artifact_location(uri, space.name)
        if art is not None:
            folders["MLflow artifacts"] = Path(art)
        lines.append(f"  free space: {space_report(folders)}; free some space there")
    if TRACKING not in kinds:
        import logging

        db_log = logging.getLogger("mlflow.store.db.utils")  # logs a full disk's SQL error with a traceback
        level = db_log.level
        db_log.setLevel(logging.CRITICAL)
        try:
            mark_interrupted(uri, space, exp_dir)
        except Exception as e:  # noqa: BLE001 - the message above matters more
            lines.append(f"  (the MLflow runs could not be marked INTERRUPTED: {e.__class__.__name__}; a resume does it)")
        finally:
            db_log.setLevel(level)
    lines.append(f"  the sweep's state is saved in {exp_dir}; then rerun the same command with --resume")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return EXIT_FAULT


def _states(exp_dir: Path) -> dict[str, int]:
    """How many of the saved sweep's trials are unfinished, and how many there are."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(exp_dir)).trials
    return {"unfinished": sum(1 for t in trials if t.status not in ("TERMINATED", "ERROR")), "total": len(trials)}

