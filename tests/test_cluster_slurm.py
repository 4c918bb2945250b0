"""The SLURM bootstrap against a real SLURM: Debian's slurmctld + two slurmd (simulated nodes n1, n2) on
this machine, started by cluster/local/slurm_up.sh. Every job is submitted through the launcher
(`python -m lora_diffusion.cluster submit`) from the real template, and starts a real 2-node Ray cluster.

1. A driver that prints ray.nodes(): both nodes are seen; the dashboard answers on 127.0.0.1 only and
   refuses requests without the job's token (401); the MLflow UI answers; `cancel` (scancel) mid-run
   leaves no process of the job within 30 s, with nothing left for the node epilog to kill.
2. A tiny sweep (builtin:tiny, local data written here) that hits its time limit: SLURM's --signal
   makes the driver save, the job requeues itself, the requeued run resumes the same sweep and
   finishes it without re-running finished trials; the job ends COMPLETED and every trial has one
   MLflow run.
3. Node loss mid-trial: a sweep whose one trial runs 2 Ray Train workers across both nodes; every Ray
   process of the worker node killed after the trial's second checkpoint; the job starts that node's Ray
   again, Ray Train restarts the trial from its last checkpoint (not from step 0), the trial is recorded
   FINISHED once, the job ends COMPLETED leaving nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
EPILOG_LOG = Path("/var/log/slurm/epilog.log")


# --------------------------------------------------------------------------- the local SLURM


@pytest.fixture(scope="module")
def local_slurm():
    """Install (when missing) and start the 2-node local SLURM; stop it after if this fixture started it."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM harness needs root (it installs and starts slurmctld/slurmd/munged)")
    p = subprocess.run(["bash", str(REPO / "cluster/local/slurm_up.sh")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"slurm_up.sh failed:\n{p.stdout}\n{p.stderr}"
    started = p.stdout.strip().splitlines()[-1] == "started"
    yield
    if started:
        subprocess.run(["bash", str(REPO / "cluster/local/slurm_down.sh")], capture_output=True, timeout=180)


# --------------------------------------------------------------------------- helpers


def submit(results: Path, *args: str) -> tuple[str, Path, float]:
    """Submit through the launcher; returns (job id, output file, submit time)."""
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "lora_diffusion.cluster", "submit", "--nodes", "2", "--gpus-per-node", "0",
                        "--results-dir", str(results), *args], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    job = re.search(r"^submitted job (\d+)$", p.stdout, re.M).group(1)
    out = Path(re.search(r"^output: (.+)$", p.stdout, re.M).group(1))
    assert "ssh -N -L" in p.stdout, p.stdout
    return job, out, t


def wait_for(what: str, pred, timeout: float, every: float = 1.0, on_timeout=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{on_timeout()}")


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def job_fields(job: str) -> dict[str, str]:
    p = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout)) if p.returncode == 0 else {}


def job_pids(job: str) -> list[str]:
    """Processes of this job on this host: environment carries SLURM_JOB_ID=<job> or its RAY_SLURM_TAG."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in env or any(e.startswith(f"RAY_SLURM_TAG={job}.".encode()) for e in env):
            found.append(f"{d.name} {cmd}")
    return found


def epilog_kills(job: str, since: int) -> list[str]:
    lines = EPILOG_LOG.read_text(errors="replace")[since:].splitlines() if EPILOG_LOG.exists() else []
    return [ln for ln in lines if f" job={job} " in ln]


def epilog_offset() -> int:
    return len(EPILOG_LOG.read_text(errors="replace")) if EPILOG_LOG.exists() else 0


def http_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


# --------------------------------------------------------------------------- 1. boot, dashboard, scancel

DRIVER = """\
import sys, time
print(f"DRIVER first line {time.time():.3f}", flush=True)
import ray
ray.init()
nodes = [n for n in ray.nodes() if n["Alive"]]
print(f"DRIVER sees {len(nodes)} nodes, {ray.cluster_resources().get('CPU', 0):g} CPUs", flush=True)
time.sleep(900)
"""


@pytest.mark.timeout(480)
def test_two_node_cluster_dashboard_token_and_scancel(local_slurm, tmp_path):
    drv = tmp_path / "driver.py"
    drv.write_text(DRIVER)
    since = epilog_offset()
    job, out, t_submit = submit(tmp_path / "runs", "--time", "10", "--command", f"python {drv}")
    try:
        wait_for("the driver to see the cluster", lambda: "DRIVER sees" in text(out), 300,
                 on_timeout=lambda: text(out))
        log = text(out)
        first = float(re.search(r"DRIVER first line ([\d.]+)", log).group(1))
        print(f"\nsbatch -> driver's first line: {first - t_submit:.1f} s "
              f"({re.search(r'cluster up: .*', log).group(0)})")
        assert "DRIVER sees 2 nodes, 4 CPUs" in log, log

        # ports and token from the job's output; the token file is private
        m = re.search(r"ports: GCS (\d+), dashboard (\d+) \(127\.0\.0\.1\), client (\d+), MLflow UI (\d+)", log)
        gcs, dash, _, mlflow_port = map(int, m.groups())
        token_file = Path(re.search(r"token: (\S+ray_token)\)", log).group(1))
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        assert oct(token_file.parent.stat().st_mode & 0o777) == "0o700"
        token = token_file.read_text().strip()
        assert token not in log, "the token must never be printed"
        head_ip = re.search(r"head n1 \(([\d.]+)\)", log).group(1)
        assert re.search(rf"watch from your laptop: ssh -N -L {dash}:127\.0\.0\.1:{dash} -L {mlflow_port}:127\.0\.0\.1:"
                         rf"{mlflow_port} -J \S+@\S+ \S+@n1", log), log

        # the dashboard: 127.0.0.1 only, 401 without the token, 200 with it
        assert http_status(f"http://127.0.0.1:{dash}/api/jobs/") == 401
        assert http_status(f"http://127.0.0.1:{dash}/api/jobs/", token) == 200
        assert http_status(f"http://127.0.0.1:{dash}/api/jobs/", "0" * 64) in (401, 403)
        if head_ip != "127.0.0.1":
            with pytest.raises(OSError):
                socket.create_connection((head_ip, dash), timeout=5).close()
        # the MLflow UI started by the job on the head, bound to 127.0.0.1
        wait_for("the MLflow UI", lambda: http_status(f"http://127.0.0.1:{mlflow_port}/health") == 200, 180, every=2,
                 on_timeout=lambda: text(next((out.parent.parent / ".ray_slurm" / job).rglob("mlflow.log"), out)))
        if head_ip != "127.0.0.1":
            with pytest.raises(OSError):
                socket.create_connection((head_ip, mlflow_port), timeout=5).close()

        st = subprocess.run([sys.executable, "-m", "lora_diffusion.cluster", "status", job], capture_output=True,
                            text=True, timeout=60)
        assert st.returncode == 0 and "RUNNING" in st.stdout and "watch from your laptop" in st.stdout, st.stdout
        assert job_pids(job), "the job's processes carry SLURM_JOB_ID"
    finally:
        t_cancel = time.time()
        c = subprocess.run([sys.executable, "-m", "lora_diffusion.cluster", "cancel", job], capture_output=True,
                           text=True, timeout=60)
    assert c.returncode == 0, c.stderr
    wait_for("every process of the job to end", lambda: not job_pids(job), 30, every=0.5,
             on_timeout=lambda: "\n".join(job_pids(job)) + "\n" + text(out)[-3000:])
    print(f"scancel -> no process of job {job} left: {time.time() - t_cancel:.1f} s")
    wait_for("the job to leave the queue", lambda: job_fields(job).get("JobState") in ("CANCELLED", None), 60)
    time.sleep(2)  # the node epilogs run after the job's processes are gone
    assert epilog_kills(job, since) == [], "ray_slurm.sh must stop its own processes; the epilog had to kill these"
    assert not Path(f"/tmp/ray_{job}").exists()
    assert "no process of this run is left" in text(out)


@pytest.mark.timeout(300)
def test_nodes_not_joining_in_time_is_a_clear_error(local_slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_SLURM_JOIN_TIMEOUT", "1")  # sbatch passes the environment to the job
    since = epilog_offset()
    job, out, _ = submit(tmp_path / "runs", "--time", "10", "--no-mlflow-ui", "--command", "python -c 'print(1)'")
    wait_for("the job to fail", lambda: job_fields(job).get("JobState") in ("FAILED", "COMPLETED"), 240, every=2,
             on_timeout=lambda: text(out))
    log = text(out)
    assert job_fields(job)["JobState"] == "FAILED" and job_fields(job)["ExitCode"] == "2:0", job_fields(job)
    assert re.search(r"only \d of 2 nodes joined the Ray cluster within 1 s \(RAY_SLURM_JOIN_TIMEOUT\)", log), log
    assert "error: Ray cluster did not come up" in log and "driver:" not in log
    assert "no process of this run is left" in log
    assert not job_pids(job) and epilog_kills(job, since) == []


SECRET_DRIVER = """\
import os, sys
from pathlib import Path
uri = os.environ.get("MLFLOW_TRACKING_URI", "")
hits = 0
for d in Path("/proc").iterdir():
    try:
        hits += b"s3cretpw" in (d / "cmdline").read_bytes()
    except OSError:
        pass
print(f"DRIVER uri-ok={uri == Path(sys.argv[1]).read_text()} cmdlines-with-secret={hits} cwd={os.getcwd()}", flush=True)
"""


@pytest.mark.timeout(300)
def test_spaces_in_the_results_path_and_credentials_by_environment(local_slurm, tmp_path):
    """A results folder with a space (#SBATCH --output/--chdir quoted), and a tracking URI with a password: it
    reaches the driver by environment, never the job script (mode 600), the job output or any command line."""
    results = tmp_path / "runs with space"
    drv = tmp_path / "driver.py"
    drv.write_text(SECRET_DRIVER)
    uri = "http://bob:s3cretpw@127.0.0.1:9/"
    expected = tmp_path / "expected.txt"
    expected.write_text(uri)
    job, out, _ = submit(results, "--time", "10", "--tracking-uri", uri, "--command", f"python {drv} {expected}")
    wait_for("the job to end", lambda: job_fields(job).get("JobState") in ("COMPLETED", "FAILED"), 240, every=2,
             on_timeout=lambda: text(out))
    log = text(out)
    assert out.parent == results / "slurm" and job_fields(job)["JobState"] == "COMPLETED", log
    assert f"DRIVER uri-ok=True cmdlines-with-secret=0 cwd={results}" in log, log
    assert "s3cretpw" not in log
    assert "MLflow UI: not started (MLFLOW_TRACKING_URI='http://bob:***@127.0.0.1:9/' is not a local store)" in log
    scripts = list((results / "slurm").glob("*.sbatch"))
    assert len(scripts) == 1 and oct(scripts[0].stat().st_mode & 0o777) == "0o600"
    assert "s3cretpw" not in scripts[0].read_text()


# --------------------------------------------------------------------------- 2. time limit, requeue, resume

def tiny_sweep_space(comment: str, name: str, max_steps: int, report_every: int, num_samples: int, workers: int,
                     cpus_per_worker: int, extra: str = "") -> str:
    """A space file for a tiny sweep on builtin:tiny (random lr, metric loss, no scheduler, one trial at a time)."""
    return f"""{comment}name: {name}
overrides:
  model.base: builtin:tiny
  model.max_length: 32
  task.name: sst2
  task.eval_subset_size: 8
  train.max_steps: {max_steps}
  train.report_every: {report_every}
  train.batch_size: 8
  train.warmup_steps: 0
{extra}params:
  train.lr: {{type: log_float, low: 1.0e-4, high: 1.0e-2}}
metric: loss
mode: min
sampler: {{name: random, seed: 0}}
scheduler: {{name: none}}
num_samples: {num_samples}
max_concurrent: 1
resources: {{workers: {workers}, cpus_per_worker: {cpus_per_worker}}}
"""


def sweep_files(tmp_path: Path, space_text: str) -> tuple[Path, Path, Path, Path]:
    """The tiny data folder, the space file, the results folder and its MLflow store for one sweep test."""
    data = tmp_path / "data"
    write_tiny_sst2(data)
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    results = tmp_path / "runs"
    return data, space, results, results / "mlflow.db"


# builtin:tiny, 3 trials one at a time, 2000 optimizer steps each (~22 s on an idle 2-core machine, 80-160 s on a
# busy one), so that the two trials after the first outlast SLURM's 30 s time-limit check: SIGUSR1 always finds
# the sweep unfinished.
SPACE = tiny_sweep_space("", "slurm-requeue", 2000, 250, 3, 1, 1)

WORDS = ["good", "bad", "movie", "film", "great", "awful", "fun", "boring", "the", "a", "very", "not"]


def write_tiny_sst2(folder: Path) -> None:
    for split, n in (("train", 64), ("validation", 16)):
        (folder / "sst2").mkdir(parents=True, exist_ok=True)
        with open(folder / "sst2" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4 + i % 5)]
                f.write(json.dumps({"sentence": " ".join(words), "label": i % 2, "idx": i}) + "\n")


def finished_trials(db: Path) -> dict[str, int]:
    """MLflow child runs tagged trial_state=FINISHED: run id -> end time (read-only SQLite)."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
            rows = c.execute("SELECT r.run_uuid, r.end_time FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                             "WHERE t.key = 'trial_state' AND t.value = 'FINISHED' AND r.status = 'FINISHED'").fetchall()
        return dict(rows)
    except sqlite3.Error:
        return {}


@pytest.mark.timeout(900)
def test_sweep_hits_time_limit_requeues_and_resumes(local_slurm, tmp_path):
    data, space, results, db = sweep_files(tmp_path, SPACE)
    since = epilog_offset()
    # --signal-lead 150: SIGUSR1 150 s before the limit; the limit is lowered below once a trial has finished.
    job, out, _ = submit(results, "--time", "15", "--signal-lead", "150", "--space", str(space), "--no-mlflow-ui",
                         "--", "--data-dir", str(data))
    wait_for("a finished trial", lambda: finished_trials(db), 420, every=2, on_timeout=lambda: text(out)[-4000:])
    # Bring the time limit close (a user may lower their own job's limit): end - now in (80, 140] s, less
    # than the 150 s lead, so SLURM sends SIGUSR1 at its next time-limit check (every 30 s).
    elapsed = parse_runtime(job_fields(job)["RunTime"])
    minutes = math.floor((elapsed + 140) / 60)
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], check=True)

    wait_for("the job to requeue itself",
             lambda: job_fields(job).get("Restarts") == "1" and job_fields(job).get("JobState") == "PENDING", 300,
             on_timeout=lambda: text(out)[-4000:])
    before = finished_trials(db)
    run0 = text(out)
    assert "SIGUSR1: time limit near" in run0 and "requeueing job" in run0, run0[-3000:]
    assert "TIMEOUT" not in job_fields(job).get("JobState", "")
    # Give the requeued run its full limit back (lowering it above was this test's shortcut to the time
    # limit), and start it soon: SLURM holds a requeued job for ~2 minutes (BeginTime). Not at once: slurmd
    # refuses a launch credential issued in the same second as the old run's revocation ("Killing
    # non-startable batch JobId=N: Job credential revoked", seen once when the start came 0.6 s after the
    # requeue), so the new run starts a few seconds later.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=15"], check=True)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+5"], check=True)
    wait_for("the requeued job to complete", lambda: job_fields(job).get("JobState") == "COMPLETED", 420, every=2,
             on_timeout=lambda: str(job_fields(job)) + "\n" + text(out)[-4000:])

    log = text(out)
    run1 = log[len(run0):]
    assert f"job {job} (run 1)" in run1, run1
    assert re.search(r"driver: python -m lora_diffusion\.tune .* --resume$", run1, re.M), run1
    assert "[tune] resuming sweep 'slurm-requeue'" in run1, run1
    assert "[tune] sweep 'slurm-requeue': 3 finished" in run1, run1
    assert "driver exited with 0" in run1

    # MLflow: one run per trial, all finished; the runs finished before the requeue were not touched again.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("slurm-requeue")
    runs = client.search_runs([exp.experiment_id], "tags.run_type = 'trial'")
    trial_ids = [r.data.tags["ray_trial_id"] for r in runs]
    assert len(runs) == 3 and len(set(trial_ids)) == 3, trial_ids
    assert all(r.data.tags["trial_state"] == "FINISHED" for r in runs)
    after = {r.info.run_id: r.info.end_time for r in runs}
    assert before, "no trial had finished before the time limit"
    assert len(before) < 3, "the sweep finished before the time limit; nothing was resumed"
    assert {k: after[k] for k in before} == before, "a trial finished before the requeue ran again"
    print(f"\n{len(before)} trial(s) finished before the time limit, {3 - len(before)} after the requeue")

    assert not job_pids(job), job_pids(job)
    assert epilog_kills(job, since) == []


def parse_runtime(value: str) -> int:
    """SLURM RunTime ([D-]HH:MM:SS) -> seconds."""
    days, _, hms = value.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


# --------------------------------------------------------------------------- 3. node loss

def kill_worker_node_ray(job: str) -> list[str]:
    """SIGKILL every Ray process of the job's worker node (node mode tags them <job>.<run>.<pid>.node<N>),
    all at once; the node's supervising shell and srun are left (the node itself stays allocated)."""
    victims = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        tag = next((e.decode() for e in env if e.startswith(b"RAY_SLURM_TAG=")), "")
        if tag.startswith(f"RAY_SLURM_TAG={job}.") and ".node" in tag and comm not in ("bash", "srun", "sleep"):
            victims.append((int(d.name), comm))
    for pid, _ in victims:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return [f"{pid} {comm}" for pid, comm in victims]


# One trial of 2 Ray Train workers of 2 CPUs each: on the local SLURM's 2-CPU nodes the workers must sit on
# different nodes (rank 0 and rank 1 span n1 and n2). A checkpoint every 20 steps; max_failures 1 lets Ray Train
# restart the worker group once, from the last checkpoint. 300 steps: many reports after the kill at step 40, so
# the kill lands mid-trial even on a fast machine.
NODE_LOSS_SPACE = tiny_sweep_space("", "slurm-node-loss", 300, 20, 1, 2, 2, extra="  train.max_failures: 1\n")


def trial_loss_steps(db: Path) -> list[int]:
    """The steps of every `loss` the sweep's trial runs logged, in the order they were logged (read-only SQLite)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
            rows = c.execute("SELECT m.step FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid WHERE t.key = "
                             "'run_type' AND t.value = 'trial' AND m.key = 'loss' ORDER BY m.timestamp, m.step").fetchall()
        return [int(r[0]) for r in rows]
    except sqlite3.Error:
        return []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_node_loss_mid_trial_resumes_from_checkpoint(local_slurm, tmp_path):
    """A sweep whose one trial runs 2 DDP workers across n1 and n2; every Ray process of n2 is killed after
    the trial's second checkpoint. ray_slurm.sh starts n2's Ray again; Ray Train (train.max_failures 1)
    restarts the worker group on both nodes from the last checkpoint, not from step 0; the sweep records
    the trial FINISHED once; the job ends COMPLETED and nothing of it is left."""
    data, space, results, db = sweep_files(tmp_path, NODE_LOSS_SPACE)
    since = epilog_offset()
    job, out, _ = submit(results, "--time", "15", "--space", str(space), "--no-mlflow-ui", "--", "--data-dir", str(data))
    try:
        # two checkpoints (steps 20, 40) written: rank 0 logs a report's loss before it hands the checkpoint on
        wait_for("the trial's second report", lambda: max(trial_loss_steps(db), default=0) >= 40, 480, every=0.5,
                 on_timeout=lambda: text(out)[-4000:])
        killed = kill_worker_node_ray(job)
        t_kill, step_at_kill = time.time(), max(trial_loss_steps(db))
        assert any(k.endswith(" raylet") for k in killed), killed
        assert any("RayTrainWo" in k for k in killed), f"no training worker on n2: {killed}"  # comm: 15 characters
        wait_for("the job to end", lambda: job_fields(job).get("JobState") in ("COMPLETED", "FAILED"), 600, every=2,
                 on_timeout=lambda: text(out)[-6000:])
    finally:
        if job_fields(job).get("JobState") in ("RUNNING", "PENDING", "CONFIGURING"):
            subprocess.run([sys.executable, "-m", "lora_diffusion.cluster", "cancel", job], capture_output=True, timeout=60)
    log = text(out)
    print(f"\nkilled {len(killed)} Ray processes of n2 at step {step_at_kill}; the job ended "
          f"{time.time() - t_kill:.0f} s later")
    assert job_fields(job)["JobState"] == "COMPLETED", log[-6000:]
    assert re.search(r"worker on n2: its Ray stopped \(srun pid \d+ ended\); restarting it \(1 of 3", log), log[-6000:]
    assert "driver exited with 0" in log

    # Ray Train (not Tune: the trial process lives on the head) restarted the workers from the last checkpoint,
    # a step > 0 at or before the kill; that worker group of 2 x 2 CPUs needs both 2-CPU nodes: n2 came back.
    # (Each worker line shows twice on this one-host cluster, once per node's log monitor it seems: both nodes
    # use the one temp dir; a single-node sweep shows it once.)
    assert re.search(r"\[FailurePolicy\] RETRY\s+.*Source: worker group", log), log[-6000:]
    resumed = {int(s) for s in re.findall(r"\[train\] resumed from \S+/checkpoint_\d+ at step (\d+)", log)}
    assert len(resumed) == 1, (resumed, log[-6000:])
    resumed_at = resumed.pop()
    assert 0 < resumed_at <= step_at_kill + 20 and resumed_at % 20 == 0, (resumed_at, step_at_kill)
    assert "[tune] sweep 'slurm-node-loss': 1 finished, 0 stopped early by ASHA, 0 failed" in log, log[-4000:]

    # MLflow: the trial once, FINISHED; its loss history went on from the checkpoint (step 20 logged once)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("slurm-node-loss")
    runs = client.search_runs([exp.experiment_id], "tags.run_type = 'trial'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["trial_state"] == "FINISHED", runs[0].data.tags
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert steps.count(20) == 1 and max(steps) == 300, steps
    assert set(range(20, 301, 20)) <= set(steps), steps
    print(f"resumed at step {resumed_at}; loss logged at steps {steps}")

    wait_for("every process of the job to end", lambda: not job_pids(job), 30, every=0.5,
             on_timeout=lambda: "\n".join(job_pids(job)))
    assert epilog_kills(job, since) == []
