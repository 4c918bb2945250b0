"""Submit a sweep to SLURM on a Ray cluster started inside the job (OSC Pitzer / Ascend / Cardinal).

    python -m lora_diffusion.cluster submit --nodes 2 --gpus-per-node 2 --time 04:00:00 \\
        --space tune_spaces/lora_diffusion_sst2.yaml --account PAS1234 --cluster pitzer [--dry-run] [-- TUNE ARGS]
    python -m lora_diffusion.cluster status JOBID
    python -m lora_diffusion.cluster cancel JOBID

`submit` renders `cluster/ray_slurm.sbatch` (the `#SBATCH` header and the marked shell settings)
into `RESULTS_DIR/slurm/`, shows it with `--dry-run`, or submits it with `sbatch` and prints the job
id, the output file and the `ssh -L` tunnel. Every input is checked before anything is submitted.
The job itself is `cluster/ray_slurm.sh`: see `cluster/README.md`.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "cluster" / "ray_slurm.sbatch"
HELPER = REPO / "cluster" / "ray_slurm.sh"

# OSC clusters: public login host (for the ssh tunnel) and a note on their GPU nodes.
CLUSTERS = {
    "pitzer": "pitzer.osc.edu",
    "ascend": "ascend.osc.edu",
    "cardinal": "cardinal.osc.edu",
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
PARTITION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(,[A-Za-z0-9][A-Za-z0-9_-]*)*$")
JOBID_RE = re.compile(r"^[0-9]+(_[0-9]+)?$")
DEPENDENCY_RE = re.compile(r"^(singleton|(after|afterany|afterok|afternotok|aftercorr|afterburstbuffer)(:[0-9]+(_[0-9]+)?(\+[0-9]+)?)+)"
                           r"([,?](singleton|(after|afterany|afterok|afternotok|aftercorr|afterburstbuffer)(:[0-9]+(_[0-9]+)?(\+[0-9]+)?)+))*$")


class ClusterError(ValueError):
    """Bad launcher input or a failed SLURM command; the message names the flag, the value and what is allowed."""


# --------------------------------------------------------------------------- time limits


def parse_time(value: str) -> int:
    """SLURM time limit -> seconds. Accepts MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    bad = ClusterError(f"--time {value!r}: not a SLURM time limit; use HH:MM:SS (e.g. 04:00:00), "
                       "MM, MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, rest = 0, value
    if "-" in value:
        d, rest = value.split("-", 1)
        if not d.isdigit():
            raise bad
        days = int(d)
    parts = rest.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise bad
    nums = [int(p) for p in parts]
    if "-" in value:  # D-HH[:MM[:SS]]
        h, mi, s = (nums + [0, 0])[:3]
        if h >= 24:
            raise ClusterError(f"--time {value!r}: hours must be < 24 after a day count")
    elif len(nums) == 3:
        h, mi, s = nums
    elif len(nums) == 2:  # MM:SS
        h, (mi, s) = 0, nums
    else:  # MM
        h, mi, s = 0, nums[0], 0
    if s >= 60 or (len(nums) == 3 and mi >= 60) or ("-" in value and mi >= 60):
        raise ClusterError(f"--time {value!r}: minutes and seconds must be < 60")
    total = days * 86400 + h * 3600 + mi * 60 + s
    if total <= 0:
        raise ClusterError(f"--time {value!r}: the time limit must be positive")
    return total


def default_signal_lead(limit_s: int) -> int:
    """Seconds before the limit at which SIGUSR1 asks the driver to save: 5 min, less for short jobs."""
    return min(300, max(60, limit_s // 4))


# --------------------------------------------------------------------------- the job description


@dataclass
class JobSpec:
    nodes: int
    gpus_per_node: int
    time: str
    space: Path | None = None
    command: list[str] | None = None  # run this instead of the sweep (any driver)
    account: str | None = None
    partition: str | None = None
    cluster: str | None = None
    cpus_per_node: int | None = None  # None: whole nodes (--exclusive)
    job_name: str = "lora-diffusion"
    sweep_name: str | None = None
    results_dir: Path = field(default_factory=lambda: Path("runs").resolve())
    venv: Path = field(default_factory=lambda: Path(sys.prefix))
    tracking_uri: str | None = None
    mlflow_ui: bool = True
    signal_lead: int | None = None
    requeue: bool = True  # False: stop at the time limit; chain with `dependency` instead
    dependency: str | None = None  # e.g. "afterany:12345"
    tune_args: list[str] = field(default_factory=list)

    @property
    def limit_s(self) -> int:
        return parse_time(self.time)

    @property
    def lead_s(self) -> int:
        return self.signal_lead if self.signal_lead is not None else default_signal_lead(self.limit_s)

    @property
    def drain_s(self) -> int:
        """Seconds the driver gets to save after SIGUSR1, leaving time to stop Ray and requeue."""
        return max(10, self.lead_s - 40)

    @property
    def login_host(self) -> str | None:
        return CLUSTERS.get(self.cluster or "")


def validate(spec: JobSpec, *, need_sbatch: bool = True) -> None:
    """Every check that can fail before submission; raises ClusterError naming the flag and value."""
    if spec.nodes < 1:
        raise ClusterError(f"--nodes {spec.nodes}: must be >= 1 (the first node runs the Ray head)")
    if spec.gpus_per_node < 0:
        raise ClusterError(f"--gpus-per-node {spec.gpus_per_node}: must be >= 0")
    if spec.cpus_per_node is not None and spec.cpus_per_node < 1:
        raise ClusterError(f"--cpus-per-node {spec.cpus_per_node}: must be >= 1 (or leave it out for whole nodes)")
    limit = parse_time(spec.time)
    if spec.signal_lead is not None and spec.signal_lead < 30:
        raise ClusterError(f"--signal-lead {spec.signal_lead}: must be >= 30 s (the driver needs time to save)")
    if spec.lead_s >= limit:
        raise ClusterError(f"--signal-lead {spec.lead_s} s: must be shorter than the time limit --time {spec.time} "
                           f"({limit} s)")
    if spec.partition is not None and not PARTITION_RE.match(spec.partition):
        raise ClusterError(f"--partition {spec.partition!r}: not a partition name; use letters, digits, '_' or '-', "
                           "several separated by commas (e.g. gpu or gpuserial,gpubackfill-serial)")
    if spec.dependency is not None and not DEPENDENCY_RE.match(spec.dependency):
        raise ClusterError(f"--dependency {spec.dependency!r}: not a SLURM dependency; use e.g. afterany:12345 "
                           "(after, afterany, afterok, afternotok, aftercorr with job ids, or singleton)")
    if spec.account is not None and not NAME_RE.match(spec.account):
        raise ClusterError(f"--account {spec.account!r}: not an account name; use your project code, e.g. PAS1234")
    if spec.cluster is not None and spec.cluster not in CLUSTERS:
        raise ClusterError(f"--cluster {spec.cluster!r}: unknown; choose one of {', '.join(CLUSTERS)}")
    if spec.cluster and not (spec.account or os.environ.get("SBATCH_ACCOUNT") or os.environ.get("SLURM_ACCOUNT")):
        raise ClusterError(f"--account: OSC ({spec.cluster}) needs your project code, e.g. --account PAS1234")
    if not NAME_RE.match(spec.job_name):
        raise ClusterError(f"--job-name {spec.job_name!r}: use 1-100 letters, digits, '.', '_' or '-'")
    if spec.sweep_name is not None and not NAME_RE.match(spec.sweep_name):
        raise ClusterError(f"--name {spec.sweep_name!r}: use 1-100 letters, digits, '.', '_' or '-'")
    if spec.command is None:
        if spec.space is None:
            raise ClusterError("--space FILE is required (the search space to sweep), or --command for any other driver")
        if not spec.space.is_file():
            raise ClusterError(f"--space {str(spec.space)!r}: file does not exist")
        from lora_diffusion.search_space import SpaceError, load_space

        try:
            load_space(spec.space, name=spec.sweep_name)
        except SpaceError as e:
            raise ClusterError(f"--space: {e}") from None
    elif not spec.command:
        raise ClusterError("--command: empty")
    if not (spec.venv / "bin" / "activate").is_file():
        raise ClusterError(f"--venv {str(spec.venv)!r}: no bin/activate there; make one with `bash cluster/install.sh` "
                           "on storage the compute nodes see")
    if not HELPER.is_file() or not TEMPLATE.is_file():
        raise ClusterError(f"{HELPER} or {TEMPLATE} not found: run from a clone of the repository (pip install -e .)")
    if need_sbatch and shutil.which("sbatch") is None:
        raise ClusterError("sbatch is not on PATH: run this on a SLURM login node (or use --dry-run to see the script)")


# --------------------------------------------------------------------------- rendering


def _sbatch_options(spec: JobSpec) -> dict[str, str | bool | None]:
    """Option -> value (True: a flag, None: disable the template's line)."""
    out_dir = spec.results_dir / "slurm"
    return {
        "job-name": spec.job_name,
        "account": spec.account,
        "nodes": str(spec.nodes),
        "ntasks-per-node": "1",
        "gpus-per-node": str(spec.gpus_per_node) if spec.gpus_per_node > 0 else None,
        "exclusive": True if spec.cpus_per_node is None else None,
        "cpus-per-task": str(spec.cpus_per_node) if spec.cpus_per_node is not None else None,
        "partition": spec.partition,
        "time": spec.time,
        "signal": f"B:USR1@{spec.lead_s}",
        "requeue": True if spec.requeue else None,
        "dependency": spec.dependency,
        "open-mode": "append",
        "output": str(out_dir / "%x-%j.out"),
        "chdir": str(spec.results_dir),
    }


def _shell_settings(spec: JobSpec) -> dict[str, str]:
    """Template line prefix -> rendered line, for the marked shell settings."""
    q = shlex.quote
    lines = {
        "LORA_DIFFUSION_REPO=": f"LORA_DIFFUSION_REPO={q(str(REPO))}",
        "LORA_DIFFUSION_VENV=": f"LORA_DIFFUSION_VENV={q(str(spec.venv))}",
        "RESULTS_DIR=": f"RESULTS_DIR={q(str(spec.results_dir))}",
        "export RAY_SLURM_MLFLOW_UI=": f"export RAY_SLURM_MLFLOW_UI={int(spec.mlflow_ui)}",
        "export RAY_SLURM_DRAIN_S=": f"export RAY_SLURM_DRAIN_S={spec.drain_s}",
        "export RAY_SLURM_REQUEUE=": f"export RAY_SLURM_REQUEUE={int(spec.requeue)}",
        "SPACE=": f"SPACE={q(str(spec.space)) if spec.space else ''}",
        "SWEEP_NAME=": f"SWEEP_NAME={q(spec.sweep_name) if spec.sweep_name else ''}",
        "EXTRA_ARGS=": "EXTRA_ARGS=(" + " ".join(q(a) for a in spec.tune_args) + ")",
    }
    uri = spec.tracking_uri or f"sqlite:///{spec.results_dir / 'mlflow.db'}"
    lines["export MLFLOW_TRACKING_URI="] = f"export MLFLOW_TRACKING_URI={q(uri)}"
    if spec.command is not None:  # any driver: the command, then EXTRA_ARGS (no sweep name)
        lines["DRIVER=("] = "DRIVER=(" + " ".join(q(a) for a in spec.command) + ")"
        lines["SWEEP_NAME="] = "SWEEP_NAME="
    return lines


def render(spec: JobSpec, template: str | None = None) -> str:
    """The job script: the template with its #SBATCH header and marked settings filled from `spec`."""
    text = TEMPLATE.read_text() if template is None else template
    options = _sbatch_options(spec)
    settings = _shell_settings(spec)
    seen_opts: set[str] = set()
    seen_settings: set[str] = set()
    out: list[str] = []
    last_sbatch = -1
    for line in text.splitlines():
        m = re.match(r"^#{1,2}SBATCH\s+--([a-z-]+)", line)
        if m and m.group(1) in options:
            key = m.group(1)
            seen_opts.add(key)
            line = _sbatch_line(key, options[key])
        elif m is None:
            for prefix, new in settings.items():
                if line.startswith(prefix):
                    seen_settings.add(prefix)
                    line = new
                    break
        if line.startswith(("#SBATCH", "##SBATCH")):
            last_sbatch = len(out)
        out.append(line)
    missing_settings = set(settings) - seen_settings
    if missing_settings:
        raise ClusterError(f"template {TEMPLATE}: lines starting with {sorted(missing_settings)} are missing; "
                           "restore them (the launcher fills them in)")
    extra = [_sbatch_line(k, v) for k, v in options.items() if k not in seen_opts and v is not None]
    out[last_sbatch + 1:last_sbatch + 1] = extra
    return "\n".join(out) + "\n"


def _sbatch_line(key: str, value: str | bool | None) -> str:
    if value is None:
        return f"##SBATCH --{key}"
    if value is True:
        return f"#SBATCH --{key}"
    return f"#SBATCH --{key}={value}"


# --------------------------------------------------------------------------- SLURM commands


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise ClusterError(f"{cmd[0]} is not on PATH: run this on a SLURM login node")
    return subprocess.run(cmd, capture_output=True, text=True)


def tunnel_hint(spec: JobSpec, job_id: str) -> str:
    """The ssh tunnel the job will print (its ports follow from the job id unless one is taken)."""
    base = 20000 + 100 * (int(job_id.split("_")[0]) % 100)
    user = getpass.getuser()
    login = spec.login_host or os.uname().nodename
    fwd = f"-L {base + 1}:127.0.0.1:{base + 1}"
    if spec.mlflow_ui:
        fwd += f" -L {base + 3}:127.0.0.1:{base + 3}"
    return (f"ssh -N {fwd} -J {user}@{login} {user}@<head node: squeue -j {job_id} -h -o %N | cut -d, -f1>\n"
            f"  Ray dashboard http://localhost:{base + 1}" + (f", MLflow UI http://localhost:{base + 3}" if spec.mlflow_ui else "")
            + "\n  (the job's output prints the exact command once the cluster is up)")


def submit(spec: JobSpec, dry_run: bool = False) -> dict:
    """Validate, render, and (unless dry_run) sbatch the job. Returns {script, job_id, output, text}."""
    validate(spec, need_sbatch=not dry_run)
    text = render(spec)
    slurm_dir = spec.results_dir / "slurm"
    script = slurm_dir / f"{spec.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    if dry_run:
        return {"script": None, "job_id": None, "output": None, "text": text}
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    proc = _run(["sbatch", "--parsable", str(script)])
    if proc.returncode != 0:
        raise ClusterError(f"sbatch {script} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    if not JOBID_RE.match(job_id):
        raise ClusterError(f"sbatch printed {proc.stdout.strip()!r}, not a job id")
    output = slurm_dir / f"{spec.job_name}-{job_id}.out"
    return {"script": script, "job_id": job_id, "output": output, "text": text}


def _check_jobid(job_id: str) -> str:
    if not JOBID_RE.match(job_id):
        raise ClusterError(f"JOBID {job_id!r}: not a SLURM job id (digits, e.g. 12345)")
    return job_id


def status(job_id: str) -> str:
    """squeue line (or scontrol record) for the job, plus its output file and tunnel command when known."""
    _check_jobid(job_id)
    proc = _run(["squeue", "-j", job_id, "-h", "-o", "%i %j %T %M/%l %D %R"])
    lines = []
    if proc.returncode == 0 and proc.stdout.strip():
        lines.append("JOBID NAME STATE ELAPSED/LIMIT NODES NODELIST(REASON)")
        lines.append(proc.stdout.strip())
    info = _run(["scontrol", "show", "job", job_id])
    if info.returncode != 0:
        if not lines:
            raise ClusterError(f"job {job_id}: not known to SLURM (finished long ago, or a wrong id): "
                               f"{info.stderr.strip()}")
        return "\n".join(lines)
    fields = dict(re.findall(r"(\w+)=(\S*)", info.stdout))
    if not lines:
        lines.append(f"job {job_id}: {fields.get('JobState', '?')} (exit {fields.get('ExitCode', '?')}, "
                     f"restarts {fields.get('Restarts', '0')})")
    out = fields.get("StdOut")
    if out:
        lines.append(f"output: {out}")
        try:
            watch = [ln for ln in Path(out).read_text(errors="replace").splitlines()
                     if "watch from your laptop:" in ln or "Ray dashboard:" in ln or "MLflow UI:" in ln]
            lines.extend(watch[-3:])
        except OSError:
            pass
    return "\n".join(lines)


def cancel(job_id: str) -> str:
    _check_jobid(job_id)
    proc = _run(["scancel", job_id])
    if proc.returncode != 0:
        raise ClusterError(f"scancel {job_id} failed: {proc.stderr.strip()}")
    return f"cancelled job {job_id} (its script stops the Ray cluster and the driver)"


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_diffusion.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit", help="render cluster/ray_slurm.sbatch and submit it",
                       description="Arguments after `--` go to `python -m lora_diffusion.tune` (or to --command).")
    s.add_argument("--nodes", type=int, required=True, help="nodes (Ray head on the first)")
    s.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0 for CPU nodes)")
    s.add_argument("--time", required=True, help="time limit, HH:MM:SS (or MM, D-HH:MM:SS, ...)")
    s.add_argument("--space", type=Path, help="search space YAML (tune_spaces/*.yaml)")
    s.add_argument("--command", help="run this driver instead of the sweep (a shell-quoted command line)")
    s.add_argument("--account", help="SLURM account (OSC project code, e.g. PAS1234)")
    s.add_argument("--partition", help="SLURM partition (usually not needed at OSC)")
    s.add_argument("--cluster", choices=sorted(CLUSTERS), help="OSC cluster (login host for the ssh tunnel)")
    s.add_argument("--cpus-per-node", type=int, help="CPUs per node (default: whole nodes, --exclusive)")
    s.add_argument("--job-name", default="lora-diffusion")
    s.add_argument("--name", dest="sweep_name", help="sweep name (default: the space's name); fixed, so a requeued job resumes it")
    s.add_argument("--results-dir", type=Path, help="shared folder for MLflow, Ray results, job output "
                   "(default: /fs/scratch/ACCOUNT/$USER/lora-diffusion at OSC, else ./runs)")
    s.add_argument("--venv", type=Path, help="venv the job activates (default: this Python's)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///RESULTS_DIR/mlflow.db)")
    s.add_argument("--no-mlflow-ui", dest="mlflow_ui", action="store_false", help="do not start mlflow server on the head")
    s.add_argument("--signal-lead", type=int, help="seconds before the limit to save and requeue (default: 300, less for short jobs)")
    s.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="at the time limit, save and stop without requeueing (chain with --dependency instead)")
    s.add_argument("--dependency", help="start after another job, e.g. afterany:12345 (chain a resumed sweep: add -- --resume)")
    s.add_argument("--dry-run", action="store_true", help="print the job script; submit nothing")
    for name in ("status", "cancel"):
        c = sub.add_parser(name, help=f"{'squeue/scontrol' if name == 'status' else 'scancel'} for a job")
        c.add_argument("job_id", metavar="JOBID")
    return p


def _default_results_dir(cluster: str | None, account: str | None) -> Path:
    if cluster and account and Path(f"/fs/scratch/{account}").is_dir():
        return Path(f"/fs/scratch/{account}") / getpass.getuser() / "lora-diffusion"
    return Path("runs").resolve()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "status":
            print(status(args.job_id))
            return 0
        if args.cmd == "cancel":
            print(cancel(args.job_id))
            return 0
        venv = args.venv or Path(sys.prefix)
        spec = JobSpec(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
            space=args.space.resolve() if args.space else None,
            command=shlex.split(args.command) if args.command is not None else None,
            account=args.account, partition=args.partition, cluster=args.cluster,
            cpus_per_node=args.cpus_per_node, job_name=args.job_name, sweep_name=args.sweep_name,
            results_dir=(args.results_dir or _default_results_dir(args.cluster, args.account)).resolve(),
            venv=venv.resolve(), tracking_uri=args.tracking_uri, mlflow_ui=args.mlflow_ui,
            signal_lead=args.signal_lead, requeue=args.requeue, dependency=args.dependency, tune_args=extra,
        )
        result = submit(spec, dry_run=args.dry_run)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(result["text"], end="")
        print(f"# dry run: nothing submitted (would write {spec.results_dir / 'slurm'}/{spec.job_name}-<time>.sbatch)",
              file=sys.stderr)
        return 0
    print(f"submitted job {result['job_id']}")
    print(f"script: {result['script']}")
    print(f"output: {result['output']}")
    print(f"watch:  {tunnel_hint(spec, result['job_id'])}")
    print(f"status: python -m lora_diffusion.cluster status {result['job_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
