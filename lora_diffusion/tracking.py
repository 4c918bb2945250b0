"""MLflow for one run, through `MlflowClient` and explicit run ids (safe for many runs in one process).

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)    # config, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db
    check_tracking_uri(uri)                                   # TrackingError naming the URI, before any training
    run = RunTracker.start(uri, "my-experiment", tags=run_tags(cfg, "train"))   # or parent_run_id=... / run_id=...
    run.log_params(cfg.flat()); run.log_metrics({"loss": 1.2}, step=10)
    run.log_artifacts("ckpt/adapter", "adapter"); run.end("FINISHED")   # or run.end("FAILED", error="...")

`with tracked_run(...) as run:` ends the run FINISHED, or FAILED with an `error` tag when the
block raises, so a run is never left RUNNING. A run given by `run_id` belongs to whoever
created it: the tracker logs into it and does not end it unless told (`owned=True`).

Names that look like secrets (token, secret, password, key, ...) are never logged as params
or tags; credentials inside a URI (a password, a token as user name) are masked in every param,
tag, error text and message. `check_tracking_uri` fails within seconds (no MLflow retries) and
creates no store.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

DEFAULT_URI = "sqlite:///mlflow.db"
RUN_TYPES = ("sweep", "trial", "train")
# The metric every sweep trial reports to Tune and logs to its MLflow run: the sweep's metric under one name
# (written by tune, ranked by report).
OBJECTIVE = "objective"
_SECRET_PARTS = {"token", "secret", "password", "passwd", "pwd", "key", "apikey", "credential", "credentials", "auth"}


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and what to do."""


# --------------------------------------------------------------------------- URIs


def resolve_tracking_uri(configured: str | None = None, cwd: str | os.PathLike | None = None) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    Relative SQLite and file paths become absolute (Ray workers run in another directory).
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    base = Path(cwd) if cwd is not None else Path.cwd()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and path != ":memory:":
            uri = "sqlite:///" + str((base / path).resolve())
    elif "://" not in uri:  # a plain folder: MLflow's file store
        uri = str((base / uri).resolve())
    elif uri.startswith("file://") and not uri.startswith("file:///"):
        uri = str((base / uri[len("file://"):]).resolve())
    return uri


_PASSWORD_RE = re.compile(r"(://)([^/?#\s:@]*):[^?#\s]*@")  # scheme://user:password@ (to the last '@')
_TOKEN_RE = re.compile(r"(://)[^/?#\s:@]+@")  # scheme://token@


def redact_uri(uri: str) -> str:
    """The URI (or any text holding URIs) with its credentials masked: a password (postgresql://user:***@host/db)
    and a token given as the user name (https://***@host)."""
    return _TOKEN_RE.sub(r"\1***@", _PASSWORD_RE.sub(r"\1\2:***@", uri))


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError (naming the URI, what is wrong and what to do) unless the tracking store can be used.

    Fast (seconds, not MLflow's minutes of retries) and leaves nothing behind: a SQLite file that does
    not exist yet is not created here (a probe file shows that its folder takes one); an http(s) server
    gets one short request to /health and one search without retries.
    """
    shown = redact_uri(uri)
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        path = Path(uri[len("sqlite:///"):])
        _check_sqlite_file(path, shown, timeout_s)
        if not path.exists():
            return  # a new store: MLflow creates it when the first run starts
    elif uri.startswith(("http://", "https://")):
        import requests

        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as e:
            raise TrackingError(f"tracking URI {shown} is not reachable ({e.__class__.__name__}); "
                                "start the MLflow server or set tracking.tracking_uri / MLFLOW_TRACKING_URI") from None
        if r.status_code != 200:
            raise TrackingError(f"tracking URI {shown}: /health answered HTTP {r.status_code}, not an MLflow server that is up")
    try:
        with _no_http_retries(timeout_s):
            client(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; we name the URI and the cause
        raise TrackingError(f"tracking URI {shown}: the MLflow store does not answer ({e.__class__.__name__}: "
                            f"{redact_uri(str(e).splitlines()[0]) if str(e) else ''})") from None


def _check_sqlite_file(path: Path, shown: str, timeout_s: float) -> None:
    """A SQLite store MLflow can open and write: an existing database file, or a folder that takes a new one."""
    import sqlite3
    import tempfile

    hint = "give a file path such as sqlite:///<folder>/mlflow.db in tracking.tracking_uri / MLFLOW_TRACKING_URI"
    if path.is_dir():
        raise TrackingError(f"tracking URI {shown}: {str(path)!r} is a folder, not a SQLite file; {hint}")
    if not path.parent.is_dir():
        raise TrackingError(f"tracking URI {shown}: folder {str(path.parent)!r} does not exist; "
                            "create it or set tracking.tracking_uri / MLFLOW_TRACKING_URI")
    if path.exists():
        if not path.is_file():
            raise TrackingError(f"tracking URI {shown}: {str(path)!r} is not a regular file; {hint}")
        try:
            con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout_s)
            try:
                con.execute("PRAGMA schema_version").fetchone()  # "file is not a database" for anything else
                con.execute("BEGIN IMMEDIATE")  # a write lock: read-only files and folders fail here
                con.rollback()
            finally:
                con.close()
        except sqlite3.Error as e:
            raise TrackingError(f"tracking URI {shown}: {str(path)!r} cannot be used as a SQLite store ({e}); "
                                f"check the file's permissions or {hint}") from None
        return
    try:  # no store yet: show that the folder takes a SQLite file, without leaving one behind
        fd, probe = tempfile.mkstemp(prefix=".mlflow_probe_", suffix=".db", dir=path.parent)
        os.close(fd)
        try:
            con = sqlite3.connect(probe, timeout=timeout_s)
            con.execute("CREATE TABLE probe (x)")
            con.commit()
            con.close()
        finally:
            for leftover in (probe, probe + "-journal"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
    except (OSError, sqlite3.Error) as e:
        raise TrackingError(f"tracking URI {shown}: cannot create the SQLite file {str(path)!r} in "
                            f"{str(path.parent)!r} ({e.__class__.__name__}: {e}); choose a writable folder") from None


@contextlib.contextmanager
def _no_http_retries(timeout_s: float):
    """MLflow's REST client without its retries (7 by default, minutes with backoff) and a short timeout."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout_s)))}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


# --------------------------------------------------------------------------- names and values


def is_secret_name(name: str) -> bool:
    """True for names such as RAY_AUTH_TOKEN, api_key, db.password, client-secret."""
    parts = [p for p in re.split(r"[^a-z0-9]+", name.lower()) if p]
    return any(p in _SECRET_PARTS or "secret" in p or "passw" in p or p.endswith(("token", "apikey")) for p in parts)


def is_finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is finite: what is logged as a metric and compared as an objective."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def without_secrets(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not is_secret_name(str(k))}


def _param_value(v: Any) -> str:
    """A param's text: credentials inside URIs masked (tracking.tracking_uri may hold a password), cut to MLflow's limit."""
    s = "None" if v is None else redact_uri(str(v))
    return s if len(s) <= 6000 else s[:5990] + "…"


def git_commit(path: str | os.PathLike | None = None, short: bool = False) -> str | None:
    """The commit of the checkout holding this package (or `path`), or None outside git; `short`: git's short form."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=where,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(cfg, run_type: str, **extra: Any) -> dict[str, str]:
    """The standard tags of a run of `cfg` (task, method, base, git_commit, run_type) plus `extra`."""
    if run_type not in RUN_TYPES:
        raise ValueError(f"run_type: got {run_type!r}; allowed: {', '.join(RUN_TYPES)}")
    tags = {"task": cfg.task.name, "method": cfg.method.name, "base": cfg.model.base, "run_type": run_type}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


# --------------------------------------------------------------------------- one run


class RunTracker:
    """One MLflow run addressed by id. Build it with `RunTracker.start(...)`."""

    def __init__(self, uri: str, run_id: str, owned: bool):
        self.uri = uri
        self.run_id = run_id
        self.owned = owned
        self.client = client(uri)
        self.ended = False

    @classmethod
    def start(cls, uri: str, experiment: str, *, run_id: str | None = None, parent_run_id: str | None = None,
              run_name: str | None = None, tags: dict[str, Any] | None = None, owned: bool | None = None) -> "RunTracker":
        """Reuse `run_id`, or create a run in `experiment` (a nested child of `parent_run_id` if given).

        `owned` (default: True for a run created here, False for a reused `run_id`) says whether
        `end()` terminates the run.
        """
        c = client(uri)
        if run_id is not None:
            tracker = cls(uri, run_id, owned=bool(owned))
            c.get_run(run_id)  # fails early with MLflow's message if the id is wrong
        else:
            exp_id = ensure_experiment(uri, experiment)
            all_tags = {}
            if parent_run_id is not None:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = c.create_run(exp_id, tags=all_tags, run_name=run_name)
            tracker = cls(uri, run.info.run_id, owned=True if owned is None else owned)
        if tags:
            tracker.set_tags(tags)
        return tracker

    # -- logging ----------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in without_secrets(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Finite numeric values only (a phase with no tokens in a window has no value, not NaN)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            if not is_finite_number(v):
                continue
            items.append(Metric(str(k), float(v), now, int(step)))
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), redact_uri(str(v))[:7990]) for k, v in without_secrets(tags).items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_checkpoint(self, folder: str | os.PathLike) -> None:
        """The files of a checkpoint folder a run keeps: adapter/ (weights and model card), config.yaml, eval/."""
        folder = Path(folder)
        self.log_artifacts(folder / "adapter", "adapter")
        if (folder / "config.yaml").is_file():
            self.log_artifact(folder / "config.yaml")
        if (folder / "eval").is_dir():
            self.log_artifacts(folder / "eval", "eval")

    # -- the end ------------------------------------------------------------------------------
    def end(self, status: str = "FINISHED", error: str | None = None, force: bool = False) -> None:
        """Terminate the run (FINISHED / FAILED / KILLED) if this tracker owns it (or `force`)."""
        if error is not None:
            self.set_tags({"error": error})
        if (self.owned or force) and not self.ended:
            self.client.set_terminated(self.run_id, status=status)
            self.ended = True


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None,
                      other_name: str = "experiment name (tracking.experiment)") -> str:
    """The id of the MLflow experiment `name`, created if new (in `artifact_location`, else where the store
    puts artifacts). A deleted experiment is a TrackingError: restore it or choose another `other_name`."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted at {redact_uri(uri)}; restore it (mlflow experiments "
                                f"restore) or choose another {other_name}")
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created meanwhile by another process (parallel trials)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def error_text(exc: BaseException) -> str:
    """A one-paragraph description of an exception for the `error` tag."""
    text = redact_uri(f"{exc.__class__.__name__}: {exc}".strip())
    return text if len(text) <= 4000 else text[:2000] + " … " + text[-1990:]


@contextlib.contextmanager
def tracked_run(uri: str, experiment: str, **kwargs: Any) -> Iterator[RunTracker]:
    """A run that ends FINISHED when the block completes and FAILED (with an `error` tag) when it raises."""
    run = RunTracker.start(uri, experiment, **kwargs)
    try:
        yield run
    except BaseException as e:
        run.end("FAILED", error=error_text(e))
        raise
    else:
        run.end("FINISHED")
