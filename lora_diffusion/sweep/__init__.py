"""The sweep driver behind `python -m lora_diffusion.tune` (lora_diffusion/tune.py only calls `cli.main`).

Read in this order:
- cli.py        the command, top to bottom: arguments, the checks, Ray and MLflow, the Tuner (new or restored),
                the results, the exit codes. Everything below is a piece it calls.
- checks.py     what is checked before any cluster time (`preflight`, storage path, restore ownership, the
                cluster's resources and shared paths); `SweepError` (exit code 2).
- runs.py       MLflow for the sweep: the parent run, the child runs of the trials, the artifact folder.
- trial.py      one trial, in a Ray worker (`run_trial`): its MLflow run, `objective`, in-process or TorchTrainer.
- states.py     the trial states recorded in MLflow (FINISHED, PRUNED, ...) and how a Tune trial maps to one.
- callbacks.py  the driver's Tune callback that records each ended trial's state in MLflow.
- search.py     Optuna (searcher) and ASHA (scheduler), and where the Optuna study lives.
- resume.py     continuing a sweep: its fingerprint, extending, warm start, Tune and MLflow put back in step.
- results.py    the trials read back, the best trial or Pareto front, best.json, the registered adapter.

Imports: cli uses the others and none of them imports cli; states.py imports none of them. Ray start-up is
lora_diffusion/ray_runtime.py; MLflow runs and experiments are lora_diffusion/tracking.py.
"""
