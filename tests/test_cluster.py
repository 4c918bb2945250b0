"""The SLURM launcher (`python -m lora_diffusion.cluster`) and ray_slurm.sh checks that need no SLURM.

Bad input must fail with a clear message before anything is written or submitted; the rendered job
script must be valid bash whose driver words survive quoting. The real submissions are in
test_cluster_slurm.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
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


def test_unknown_cluster_is_refused(capsys, tmp_path, space):
    rc, out, err = run_cli(capsys, "submit", "--nodes", "1", "--gpus-per-node", "0", "--time", "5", "--cluster", "owens2",
                           "--account", "PAS1234", "--space", str(space), "--results-dir", str(tmp_path / "runs"))
    assert rc == 2 and "--cluster 'owens2': unknown; choose one of pitzer, ascend, cardinal" in err, err
    assert out == "" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["owens", "Owens"])
def test_retired_owens_is_refused_clearly(capsys, tmp_path, space, name):
    rc, _, err = run_cli(capsys, "submit", "--nodes", "1", "--gpus-per-node", "1", "--time", "1:00:00", "--cluster", name,
                         "--account", "PAS1234", "--space", str(space), "--results-dir", str(tmp_path / "runs"), "--dry-run")
    assert rc == 2, err
    assert f"--cluster {name!r}: Owens was decommissioned on 2025-02-03; choose one of pitzer, ascend, cardinal" in err


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "TMPDIR"}
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


# --------------------------------------------------------------------------- OSC: clusters, limits, layouts


def test_launcher_and_ray_slurm_sh_name_the_same_clusters_and_login_hosts():
    """One definition on each side (CLUSTERS, OSC_LOGIN_HOSTS); bash itself reads the script's."""
    script = (REPO / "cluster" / "ray_slurm.sh").read_text()
    decl = [ln for ln in script.splitlines() if ln.startswith("declare -A OSC_LOGIN_HOSTS=")]
    assert len(decl) == 1, "ray_slurm.sh must define OSC_LOGIN_HOSTS exactly once"
    p = subprocess.run(["bash", "-c", decl[0] + '\nfor k in "${!OSC_LOGIN_HOSTS[@]}"; do echo "$k ${OSC_LOGIN_HOSTS[$k]}"; done'],
                       capture_output=True, text=True, check=True)
    in_script = dict(line.split() for line in p.stdout.splitlines())
    assert in_script == {name: c.login for name, c in cluster.CLUSTERS.items()}
    # no other place in the script maps a cluster name (Owens is retired)
    code = [ln for ln in script.splitlines() if not ln.lstrip().startswith("#")]
    assert not any("owens" in ln.lower() for ln in code)
    assert not any(".osc.edu" in ln for ln in code if not ln.startswith("declare -A OSC_LOGIN_HOSTS="))


def submit_argv(space: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["submit", "--account", "PAS1234", "--space", str(space), "--results-dir", str(tmp_path / "runs"),
            "--dry-run", *extra]


@pytest.mark.parametrize("nodes,time_,ok", [
    ("1", "168:00:00", True), ("1", "7-00:00:00", True), ("1", "7-00:00:01", False), ("1", "169:00:00", False),
    ("2", "96:00:00", True), ("2", "4-00:00:00", True), ("2", "96:00:01", False), ("3", "5-00:00:00", False),
])
def test_osc_walltime_limits(capsys, tmp_path, space, nodes, time_, ok):
    rc, out, err = run_cli(capsys, *submit_argv(space, tmp_path, "--cluster", "pitzer", "--nodes", nodes,
                                                "--gpus-per-node", "1", "--time", time_))
    if ok:
        assert rc == 0, err
        assert f"#SBATCH --time={time_}" in out.splitlines()
    else:
        limit = 168 if nodes == "1" else 96
        kind = "single-node" if nodes == "1" else "multi-node"
        assert rc == 2 and out == ""
        assert f"--time {time_} (" in err and f"OSC pitzer runs {kind} jobs for at most {limit} h" in err, err
        assert "single-node: 168 h, multi-node: 96 h" in err


def test_long_time_is_fine_off_osc(capsys, tmp_path, space):
    rc, _, err = run_cli(capsys, "submit", "--nodes", "2", "--gpus-per-node", "0", "--time", "200:00:00",
                         "--space", str(space), "--results-dir", str(tmp_path / "runs"), "--dry-run")
    assert rc == 0, err


@pytest.mark.parametrize("name,gpus", [("pitzer", 5), ("ascend", 8), ("cardinal", 6)])
def test_more_gpus_than_an_osc_node_has_is_refused(capsys, tmp_path, space, name, gpus):
    rc, _, err = run_cli(capsys, *submit_argv(space, tmp_path, "--cluster", name, "--nodes", "1",
                                              "--gpus-per-node", str(gpus), "--time", "1:00:00"))
    assert rc == 2 and f"--gpus-per-node {gpus}: no {name} node has more than 4 GPUs" in err, err


GPU_SPACE = SPACE + "resources: {workers: 2, cpus_per_worker: 4, gpus_per_worker: 1}\n"


@pytest.fixture
def gpu_space(tmp_path) -> Path:
    p = tmp_path / "gpu_space.yaml"
    p.write_text(GPU_SPACE)
    return p


def test_gpus_with_too_few_cores_warn_and_say_the_memory(capsys, tmp_path, gpu_space):
    rc, out, err = run_cli(capsys, *submit_argv(gpu_space, tmp_path, "--cluster", "pitzer", "--nodes", "2",
                                                "--gpus-per-node", "2", "--cpus-per-node", "4", "--time", "1:00:00"))
    assert rc == 0, err
    assert ("warning: --cpus-per-node 4 with --gpus-per-node 2: a trial worker takes 4 CPU(s) + 1 GPU(s) "
            "(resources: 2 worker(s) x 4 CPU(s) + 1 GPU(s)), so 1 worker(s) fit per node and 1 GPU(s) per node stay "
            "idle; ask for at least 8 CPUs per node") in err, err
    # memory follows the cores: Pitzer's dual-GPU nodes 7.562-9.074 GB per core, the quad-GPU ones 15.5
    assert "note: memory: a part of a node gets memory in proportion to its cores: 4 cores x 7.562-15.5 GB" in err, err
    assert "= about 30-62 GB per node" in err
    assert "#SBATCH --cpus-per-task=4" in out.splitlines()


def test_ascend_memory_note(capsys, tmp_path, space):
    rc, _, err = run_cli(capsys, *submit_argv(space, tmp_path, "--cluster", "ascend", "--nodes", "1",
                                              "--gpus-per-node", "1", "--cpus-per-node", "10", "--time", "1:00:00"))
    assert rc == 0, err
    assert "10 cores x 10.4726 GB per core (GPU (4 GPUs) nodes on ascend) = about 105 GB per node" in err, err


def test_fewer_cores_than_gpus_warns(capsys, tmp_path, space):
    rc, _, err = run_cli(capsys, *submit_argv(space, tmp_path, "--cluster", "ascend", "--nodes", "1",
                                              "--gpus-per-node", "4", "--cpus-per-node", "2", "--time", "1:00:00"))
    assert rc == 0, err
    assert "warning: --cpus-per-node 2 < --gpus-per-node 4: each GPU worker needs at least one core" in err, err


def test_more_cores_than_a_gpu_node_has_warns(capsys, tmp_path, space):
    rc, _, err = run_cli(capsys, *submit_argv(space, tmp_path, "--cluster", "pitzer", "--nodes", "1",
                                              "--gpus-per-node", "2", "--cpus-per-node", "64", "--time", "1:00:00"))
    assert rc == 0, err
    assert "warning: --cpus-per-node 64: no pitzer node with 2 GPU(s) has more than 48 cores" in err, err


@pytest.mark.parametrize("args,message", [
    (["--nodes", "1", "--gpus-per-node", "0"], "--gpus-per-node 0: the space's trials need GPUs"),
    (["--nodes", "2", "--gpus-per-node", "2", "--cpus-per-node", "2"],
     "--cpus-per-node 2: one trial worker needs 4 CPUs"),
    (["--nodes", "1", "--gpus-per-node", "1", "--cpus-per-node", "8"],
     "a trial needs 2 workers (resources: 2 worker(s) x 4 CPU(s) + 1 GPU(s)) but 1 node(s) x 8 CPUs x 1 GPUs hold at "
     "most 1; add --nodes or lower resources.workers"),
])
def test_a_trial_that_can_never_be_placed_is_refused(capsys, tmp_path, gpu_space, args, message):
    rc, out, err = run_cli(capsys, *submit_argv(gpu_space, tmp_path, "--time", "1:00:00", *args))
    assert rc == 2 and message in err, err
    assert out == ""


def test_a_layout_that_fits_has_no_warning(capsys, tmp_path, gpu_space):
    rc, _, err = run_cli(capsys, *submit_argv(gpu_space, tmp_path, "--nodes", "1", "--gpus-per-node", "2",
                                              "--cpus-per-node", "8", "--time", "1:00:00"))
    assert rc == 0 and "warning" not in err, err


# --------------------------------------------------------------------------- ray_slurm.sh: node-local temp dir


def test_helper_puts_rays_temp_dir_in_a_short_tmpdir(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    try:
        # the bad port range stops the script right after it chose the temp dir
        p = _helper({"SLURM_JOB_ID": "7", "TMPDIR": str(short), "RAY_SLURM_WORKER_PORTS": "x"})
    finally:
        short.rmdir()
    assert p.returncode == 2
    assert f"Ray temp dir: {short}/ray_7 ($TMPDIR: node-local, flushed at the job's end)" in p.stdout, p.stdout


def test_helper_falls_back_to_tmp_when_tmpdir_is_too_long(tmp_path):
    long = tmp_path / ("x" * 40)
    long.mkdir()
    p = _helper({"SLURM_JOB_ID": "7", "TMPDIR": str(long), "RAY_SLURM_WORKER_PORTS": "x"})
    assert p.returncode == 2
    assert "Ray temp dir: /tmp/ray_7 (/tmp: $TMPDIR (" in p.stdout and "too long for Ray's sockets" in p.stdout, p.stdout
    p = _helper({"SLURM_JOB_ID": "7", "RAY_SLURM_WORKER_PORTS": "x"})
    assert "Ray temp dir: /tmp/ray_7 (/tmp: $TMPDIR is not set)" in p.stdout, p.stdout


# --------------------------------------------------------------------------- shell injection


@pytest.mark.parametrize("flag,value,message", [
    ("--results-dir", "/x\ntouch pwned #", "--results-dir '/x\\ntouch pwned #': contains a control character"),
    ("--results-dir", "/x\rtouch pwned", "contains a control character"),
    ("--results-dir", '/tmp/a"b', "contains '\"', which #SBATCH --output / --chdir cannot hold"),
    ("--results-dir", "/tmp/a\\b", "which #SBATCH --output / --chdir cannot hold"),
    ("--results-dir", "/tmp/100%", "contains '%'"),
    ("--venv", "/v\ntouch pwned", "--venv '/v\\ntouch pwned': contains a control character"),
    ("--tracking-uri", "sqlite:////x.db\ntouch pwned", "--tracking-uri 'sqlite:////x.db\\ntouch pwned': contains a control"),
    ("--tracking-uri", "https://u:pw@h/\nx", "--tracking-uri 'https://u:***@h/\\nx': contains a control character"),
    ("--tracking-uri", "http://h:5000 touch", "not a URI (blank or contains spaces)"),
    ("--command", "python -c 'print(1)\ntouch pwned'", "--command 'print(1)\\ntouch pwned': contains a control character"),
    ("--job-name", "x\ntouch", "--job-name 'x\\ntouch'"),
    ("--name", "a$(touch pwned)", "--name 'a$(touch pwned)'"),
    ("--account", "PAS1\n#SBATCH --x", "not an account name"),
])
def test_unsafe_values_for_the_job_script_are_refused(capsys, tmp_path, space, flag, value, message):
    argv = ["submit", "--nodes", "1", "--gpus-per-node", "0", "--time", "10", "--results-dir", str(tmp_path / "runs"),
            "--dry-run"]
    argv += [flag, value] + (["--space", str(space)] if flag != "--command" else [])
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, err
    assert message in err, err
    assert out == "" and not (tmp_path / "runs").exists()


def test_newline_in_an_argument_after_dashdash_is_refused(capsys, tmp_path, space):
    rc, out, err = run_cli(capsys, "submit", "--nodes", "1", "--gpus-per-node", "0", "--time", "10", "--space", str(space),
                           "--results-dir", str(tmp_path / "runs"), "--dry-run", "--", "--data-dir", "/d\ntouch pwned")
    assert rc == 2 and "an argument after -- '/d\\ntouch pwned': contains a control character" in err, err


def test_injected_commands_are_inert_when_the_job_script_runs(tmp_path):
    """Quotes, $(...), backticks and ; in every free-text value: the rendered script runs (up to ray_slurm.sh,
    which stops outside a job) and none of the injected `touch pwned_*` ran."""
    work = tmp_path / "work"
    work.mkdir()
    payloads = ["$(touch pwned_p1)", "`touch pwned_p2`", "'; touch pwned_p3 #", '"; touch pwned_p4 #',
                "x;touch pwned_p5", "${IFS}$(touch pwned_p6)"]
    results = tmp_path / "r w $(touch pwned_r1) `touch pwned_r2` ';touch pwned_r3'"
    space = tmp_path / "s $(touch pwned_s1) '.yaml"
    space.write_text(SPACE)
    venv = tmp_path / "v $(touch pwned_v1)"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("echo venv activated\n")
    for command in (None, ["python", "-c", *payloads]):
        spec = JobSpec(nodes=1, gpus_per_node=0, time="30", space=None if command else space, command=command,
                       results_dir=results, venv=venv, sweep_name="ok-name",
                       tracking_uri=f"sqlite:///{tmp_path}/$(touch${{IFS}}pwned_u1).db", tune_args=payloads)
        assert cluster.validate(spec, need_sbatch=False) == []
        text = render(spec)
        script = tmp_path / "job.sbatch"
        script.write_text(text)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        # #SBATCH lines: the paths are kept whole (double quotes, as sbatch reads them)
        assert f'#SBATCH --chdir="{results}"' in text.splitlines()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        p = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert "venv activated" in p.stdout and "SLURM_JOB_ID is not set" in p.stderr, (p.stdout, p.stderr)
        assert list(tmp_path.rglob("pwned_*")) == [], "an injected command ran"
        assert results.is_dir()  # the script's own `mkdir -p "$RESULTS_DIR"` used the whole path


# --------------------------------------------------------------------------- secrets


SECRET_URIS = ["https://bob:s3cretpw@mlflow.example.org/", "https://s3cretpw@mlflow.example.org",
               "postgresql://bob:s3cretpw@db.example.org/mlflow"]


@pytest.mark.parametrize("uri", SECRET_URIS)
def test_tracking_credentials_never_reach_the_job_script(capsys, tmp_path, space, uri):
    rc, out, err = run_cli(capsys, "submit", "--nodes", "1", "--gpus-per-node", "0", "--time", "10", "--space", str(space),
                           "--results-dir", str(tmp_path / "runs"), "--tracking-uri", uri, "--dry-run")
    assert rc == 0, err
    assert "s3cretpw" not in out + err
    assert ("export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:?the tracking URI with its credentials comes from the "
            "environment sbatch was given}") in out.splitlines()
    spec = JobSpec(nodes=1, gpus_per_node=0, time="10", space=space, results_dir=tmp_path, tracking_uri=uri)
    assert cluster.sbatch_env(spec)["MLFLOW_TRACKING_URI"] == uri
    # the script passes such a URI to the driver by environment only, never on its command line
    text = render(spec)
    body = text[text.index("SPACE="):text.index("exec bash")]
    probe = tmp_path / "probe.sh"
    probe.write_text(f"RESULTS_DIR=x\nMLFLOW_TRACKING_URI={shlex.quote(uri)}\n{body}\nprintf '%s\\n' \"${{DRIVER[@]}}\"\n")
    words = subprocess.run(["bash", str(probe)], capture_output=True, text=True, check=True).stdout
    assert "s3cretpw" not in words and "--tracking-uri" not in words


def test_a_plain_tracking_uri_is_written_and_passed_as_before(tmp_path, space):
    spec = JobSpec(nodes=1, gpus_per_node=0, time="10", space=space, results_dir=tmp_path,
                   tracking_uri="http://127.0.0.1:5000")
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in render(spec).splitlines()
    assert "MLFLOW_TRACKING_URI" not in cluster.sbatch_env(spec) or \
        cluster.sbatch_env(spec)["MLFLOW_TRACKING_URI"] == os.environ.get("MLFLOW_TRACKING_URI")


@pytest.mark.parametrize("where", ["--", "--command"])
def test_credentials_in_arguments_are_refused(capsys, tmp_path, space, where):
    base = ["submit", "--nodes", "1", "--gpus-per-node", "0", "--time", "10", "--results-dir", str(tmp_path / "runs"),
            "--dry-run"]
    if where == "--":
        argv = base + ["--space", str(space), "--", "--tracking-uri", "https://bob:s3cretpw@h/"]
    else:
        argv = base + ["--command", "python -m lora_diffusion.train --tracking-uri https://s3cretpw@h/"]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and "s3cretpw" not in out + err, err
    assert "holds a user name, password or token" in err and "MLFLOW_TRACKING_USERNAME" in err, err


def test_submit_writes_the_script_mode_600_and_hands_credentials_to_sbatch_by_environment(capsys, monkeypatch, tmp_path,
                                                                                          space):
    """A stand-in sbatch (our logic only; the real one is in test_cluster_slurm.py) records what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "seen"
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!/bin/bash\nprintf '%s\\n' \"$MLFLOW_TRACKING_URI\" \"$@\" > {seen}\necho 4242\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(os, "umask", os.umask)  # restored after the test
    old = os.umask(0o022)
    try:
        rc, out, err = run_cli(capsys, "submit", "--nodes", "1", "--gpus-per-node", "0", "--time", "10", "--space",
                               str(space), "--results-dir", str(tmp_path / "runs"), "--tracking-uri", SECRET_URIS[0])
    finally:
        os.umask(old)
    assert rc == 0, err
    script = Path(next(ln for ln in out.splitlines() if ln.startswith("script: ")).split(": ", 1)[1])
    assert oct(script.stat().st_mode & 0o777) == "0o600"
    assert "s3cretpw" not in script.read_text() and "s3cretpw" not in out + err
    uri, *args = seen.read_text().splitlines()
    assert uri == SECRET_URIS[0] and args == ["--parsable", str(script)]


def test_ray_slurm_sh_redacts_uris_in_what_it_prints():
    script = (REPO / "cluster" / "ray_slurm.sh").read_text()
    redact = next(ln for ln in script.splitlines() if ln.startswith("redact()"))
    text = ("driver: python -m x --tracking-uri https://bob:pw@h/ https://tok@h2:443/p postgresql://u:p@ss@db/x "
            "sqlite:////a/b@c.db http://h:5000/")
    p = subprocess.run(["bash", "-c", f'{redact}\nredact "$1"', "_", text], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == ("driver: python -m x --tracking-uri https://bob:***@h/ https://***@h2:443/p "
                                "postgresql://u:***@db/x sqlite:////a/b@c.db http://h:5000/")
    assert "echo \"$MLFLOW_TRACKING_URI" not in script and "for $MLFLOW_TRACKING_URI" not in script
    assert "--backend-store-uri" not in script, "the store goes to mlflow server by environment, not in `ps`"
