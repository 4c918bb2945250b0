"""The SLURM launcher (`python -m lora_diffusion.cluster`) and ray_slurm.sh checks that need no SLURM.

Bad input must fail with a clear message before anything is written or submitted; the rendered job
script must be valid bash whose driver words survive quoting. The real submissions are in
test_cluster_slurm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_diffusion import cluster
from lora_diffusion.cluster import ClusterError, JobSpec, parse_time, render

REPO = Path(__file__).resolve().parents[1]

SPACE = """\
name: launcher-check
overrides:
  model.base: builtin:tiny
  task.name: sst2
  train.max_steps: 4
  train.report_every: 2
params:
  train.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
metric: loss
mode: min
num_samples: 2
scheduler: {name: none}
"""


@pytest.fixture
def space(tmp_path) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(SPACE)
    return p


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cluster.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- time limits


@pytest.mark.parametrize("value,seconds", [
    ("2", 120), ("02:30", 150), ("04:00:00", 14400), ("1-00", 86400), ("1-02:03", 93780), ("1-02:03:04", 93784),
])
def test_parse_time_accepts_slurm_formats(value, seconds):
    assert parse_time(value) == seconds


@pytest.mark.parametrize("value,message", [
    ("4h", "not a SLURM time limit"), ("", "not a SLURM time limit"), ("1:2:3:4", "not a SLURM time limit"),
    ("04:61:00", "must be < 60"), ("00:00:60", "must be < 60"), ("1-25", "hours must be < 24"),
    ("00:00:00", "must be positive"), ("-3", "not a SLURM time limit"),
])
def test_parse_time_rejects_bad_limits(value, message):
    with pytest.raises(ClusterError, match=message):
        parse_time(value)


# --------------------------------------------------------------------------- bad input, nothing submitted


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0"], "--nodes 0: must be >= 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node -1: must be >= 0"),
    (["--partition", "gpu serial"], "--partition 'gpu serial': not a partition name"),
    (["--partition", "gpu;rm -rf"], "not a partition name"),
    (["--time", "4h"], "--time '4h': not a SLURM time limit"),
    (["--time", "04:61:00"], "minutes and seconds must be < 60"),
    (["--account", "PAS 1234"], "--account 'PAS 1234': not an account name"),
    (["--cluster", "pitzer"], "--account: OSC (pitzer) needs your project code"),
    (["--time", "5", "--signal-lead", "300"], "must be shorter than the time limit"),
    (["--cpus-per-node", "0"], "--cpus-per-node 0: must be >= 1"),
    (["--name", "bad name"], "--name 'bad name'"),
    (["--dependency", "after 12"], "--dependency 'after 12': not a SLURM dependency"),
])
def test_bad_input_is_refused_before_submission(capsys, monkeypatch, tmp_path, space, args, message):
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    base = {"--nodes": "2", "--gpus-per-node": "1", "--time": "01:00:00", "--space": str(space),
            "--results-dir": str(tmp_path / "runs")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["submit"] + [x for kv in base.items() for x in kv]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert message in err, err
    assert out == ""
    assert not (tmp_path / "runs").exists(), "nothing may be written before the input is valid"


def test_missing_space_file(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "submit", "--nodes", "1", "--gpus-per-node", "0", "--time", "10",
                         "--space", str(tmp_path / "nope.yaml"), "--results-dir", str(tmp_path / "runs"))
    assert rc == 2 and "nope.yaml': file does not exist" in err, err
    assert not (tmp_path / "runs").exists()


def test_invalid_space_is_refused_with_its_key(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPACE.replace("train.lr:", "train.learning_rate:"))
    rc, _, err = run_cli(capsys, "submit", "--nodes", "1", "--gpus-per-node", "0", "--time", "10",
                         "--space", str(bad), "--results-dir", str(tmp_path / "runs"), "--dry-run")
    assert rc == 2 and "--space:" in err and "train.learning_rate" in err, err


def test_no_sbatch_on_path(capsys, monkeypatch, tmp_path, space):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    rc, _, err = run_cli(capsys, "submit", "--nodes", "2", "--gpus-per-node", "1", "--time", "1:00:00",
                         "--space", str(space), "--results-dir", str(tmp_path / "runs"))
    assert rc == 2 and "sbatch is not on PATH" in err, err
    assert not (tmp_path / "runs").exists()
    # --dry-run needs no SLURM at all
    rc, out, _ = run_cli(capsys, "submit", "--nodes", "2", "--gpus-per-node", "1", "--time", "1:00:00",
                         "--space", str(space), "--results-dir", str(tmp_path / "runs"), "--dry-run")
    assert rc == 0 and "#SBATCH --nodes=2" in out


def test_unknown_cluster_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cluster.main(["submit", "--nodes", "1", "--gpus-per-node", "0", "--time", "5", "--cluster", "owens2"])
    assert e.value.code == 2
    assert "invalid choice: 'owens2'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["status", "cancel"])
def test_status_and_cancel_check_the_job_id(capsys, cmd):
    rc, _, err = run_cli(capsys, cmd, "12; rm")
    assert rc == 2 and "not a SLURM job id" in err


def test_status_without_slurm_commands(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc, _, err = run_cli(capsys, "status", "123")
    assert rc == 2 and "squeue is not on PATH" in err


# --------------------------------------------------------------------------- rendering


def test_dry_run_renders_the_template(capsys, tmp_path, space):
    results = tmp_path / "runs"
    rc, out, err = run_cli(capsys, "submit", "--nodes", "3", "--gpus-per-node", "2", "--time", "04:00:00",
                           "--space", str(space), "--account", "PAS1234", "--partition", "gpu", "--cluster", "pitzer",
                           "--name", "sweep-a", "--results-dir", str(results), "--dry-run", "--", "--num-samples", "7")
    assert rc == 0, err
    for line in ["#SBATCH --nodes=3", "#SBATCH --gpus-per-node=2", "#SBATCH --time=04:00:00",
                 "#SBATCH --account=PAS1234", "#SBATCH --partition=gpu", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --requeue", "#SBATCH --exclusive", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={results}/slurm/%x-%j.out", f"#SBATCH --chdir={results}",
                 f"RESULTS_DIR={results}", f"SPACE={space}", "SWEEP_NAME=sweep-a", "EXTRA_ARGS=(--num-samples 7)",
                 "export RAY_SLURM_DRAIN_S=260", f"export MLFLOW_TRACKING_URI=sqlite:///{results}/mlflow.db",
                 f"LORA_DIFFUSION_REPO={REPO}"]:
        assert line in out.splitlines(), line
    assert "dry run: nothing submitted" in err
    assert not results.exists()
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_cpus_per_node_replaces_exclusive_and_no_gpus_drops_the_line(tmp_path, space):
    text = render(JobSpec(nodes=1, gpus_per_node=0, time="30", space=space, cpus_per_node=8, results_dir=tmp_path))
    lines = text.splitlines()
    assert "#SBATCH --cpus-per-task=8" in lines
    assert "##SBATCH --exclusive" in lines and "#SBATCH --exclusive" not in lines
    assert not any(ln.startswith("#SBATCH --gpus-per-node") for ln in lines)
    assert not any(ln.startswith("#SBATCH --account") for ln in lines)
    # all #SBATCH lines come before the first command (sbatch stops reading at the first one)
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")) < first_cmd


def test_no_requeue_and_dependency_chain(tmp_path, space):
    spec = JobSpec(nodes=2, gpus_per_node=1, time="04:00:00", space=space, results_dir=tmp_path, requeue=False,
                   dependency="afterany:4242", tune_args=["--resume"])
    lines = render(spec).splitlines()
    assert "#SBATCH --dependency=afterany:4242" in lines
    assert "##SBATCH --requeue" in lines and "#SBATCH --requeue" not in lines
    assert "export RAY_SLURM_REQUEUE=0" in lines and "EXTRA_ARGS=(--resume)" in lines


def test_driver_words_survive_quoting(tmp_path):
    """The rendered DRIVER array, evaluated by bash, is exactly the command plus the extra arguments."""
    spec = JobSpec(nodes=1, gpus_per_node=0, time="30", command=["python", "-c", "print('a b'); x = \"$HOME\""],
                   tune_args=["--flag", "two words", "it's"], results_dir=tmp_path / "r w")
    text = render(spec)
    body = text[text.index("SPACE="):text.index("exec bash")]
    probe = tmp_path / "probe.sh"
    probe.write_text(f"RESULTS_DIR=x\nMLFLOW_TRACKING_URI=y\n{body}\nprintf '%s\\n' \"${{DRIVER[@]}}\"\n")
    words = subprocess.run(["bash", str(probe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert words == ["python", "-c", "print('a b'); x = \"$HOME\"", "--flag", "two words", "it's"]


def test_signal_lead_and_drain_follow_the_time_limit(space, tmp_path):
    short = JobSpec(nodes=1, gpus_per_node=0, time="2", space=space, results_dir=tmp_path)
    assert (short.lead_s, short.drain_s) == (60, 20)
    long = JobSpec(nodes=1, gpus_per_node=0, time="12:00:00", space=space, results_dir=tmp_path)
    assert (long.lead_s, long.drain_s) == (300, 260)


# --------------------------------------------------------------------------- ray_slurm.sh refuses bad setups


def _helper(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra)
    return subprocess.run(["bash", str(REPO / "cluster" / "ray_slurm.sh"), "echo", "hi"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_helper_refuses_to_run_outside_a_job():
    p = _helper({})
    assert p.returncode == 2 and "SLURM_JOB_ID is not set" in p.stderr


def test_helper_refuses_a_long_ray_temp_dir(tmp_path):
    p = _helper({"SLURM_JOB_ID": "7", "RAY_SLURM_TMP_ROOT": "/tmp/" + "x" * 60})
    assert p.returncode == 2 and "AF_UNIX" in p.stderr and "RAY_SLURM_TMP_ROOT" in p.stderr


def test_helper_refuses_a_bad_worker_port_range():
    p = _helper({"SLURM_JOB_ID": "7", "RAY_SLURM_WORKER_PORTS": "30000"})
    assert p.returncode == 2 and "RAY_SLURM_WORKER_PORTS='30000'" in p.stderr


def test_module_runs_as_a_command():
    p = subprocess.run([sys.executable, "-m", "lora_diffusion.cluster", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "submit" in p.stdout and "status" in p.stdout and "cancel" in p.stdout
