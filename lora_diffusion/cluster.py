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

from lora_diffusion.tracking import redact_uri

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "cluster" / "ray_slurm.sbatch"
HELPER = REPO / "cluster" / "ray_slurm.sh"

# OSC clusters, from OSC's pages (batch-limit rules of each cluster, "Scheduling Policies and Limits",
# the Cardinal announcement): login host, node types (cores, GPUs, default memory per core), walltime
# limits. cluster/ray_slurm.sh names the same clusters and login hosts (OSC_LOGIN_HOSTS; a test checks
# that the two agree). Owens was decommissioned on 2025-02-03.


@dataclass(frozen=True)
class NodeType:
    name: str
    cores: int
    gpus: int
    mem_per_core_gb: float | None  # default (and max) memory per core; None: not on OSC's pages


@dataclass(frozen=True)
class OscCluster:
    login: str
    gpu: str
    nodes: tuple[NodeType, ...]
    single_node_max_h: int = 168  # "Serial jobs ... up to 168 hours, parallel jobs ... up to 96 hours"
    multi_node_max_h: int = 96

    @property
    def max_gpus(self) -> int:
        return max(n.gpus for n in self.nodes)

    def node_types_for(self, gpus: int) -> list[NodeType]:
        """The node types a job asking for `gpus` GPUs per node can land on."""
        return [n for n in self.nodes if (n.gpus >= gpus if gpus > 0 else n.gpus == 0)]


CLUSTERS: dict[str, OscCluster] = {
    "pitzer": OscCluster("pitzer.osc.edu", "V100", (
        NodeType("Skylake regular", 40, 0, 4.449), NodeType("Cascade Lake regular", 48, 0, 3.708),
        NodeType("large memory", 48, 0, 15.5), NodeType("huge memory", 80, 0, 37.362),
        NodeType("Skylake dual-GPU", 40, 2, 9.074), NodeType("Cascade Lake dual-GPU", 48, 2, 7.562),
        NodeType("quad-GPU", 48, 4, 15.5))),
    "ascend": OscCluster("ascend.osc.edu", "A100", (NodeType("GPU (4 GPUs)", 88, 4, 10.4726),)),
    # Cardinal: cores and GPUs per node from OSC's announcement; memory per core is not on the pages we
    # checked (see OSC's Cardinal batch-limit page), so no memory estimate is printed for it.
    "cardinal": OscCluster("cardinal.osc.edu", "H100", (
        NodeType("CPU", 104, 0, None), NodeType("GPU (4 H100)", 104, 4, None))),
}
RETIRED = {"owens": "Owens was decommissioned on 2025-02-03"}
# Characters refused in any value written into the job script: control characters (a newline ends
# the #SBATCH line or the shell line and starts a command).
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Paths in #SBATCH lines: sbatch splits them on blanks and only knows double quotes, and --output
# expands %-patterns; a path is put in double quotes, so it may hold spaces but not these.
SBATCH_PATH_BAD = set('"\\%')
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
    def osc(self) -> OscCluster | None:
        return CLUSTERS.get(self.cluster or "")

    @property
    def login_host(self) -> str | None:
        return self.osc.login if self.osc else None


def validate(spec: JobSpec, *, need_sbatch: bool = True) -> list[str]:
    """Every check that can fail before submission; raises ClusterError naming the flag and value.

    Returns warnings (a layout that fits but wastes what it asks for, the memory Ray will see)."""
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
    if spec.cluster is not None and spec.cluster.lower() in RETIRED:
        raise ClusterError(f"--cluster {spec.cluster!r}: {RETIRED[spec.cluster.lower()]}; choose one of "
                           f"{', '.join(CLUSTERS)}")
    if spec.cluster is not None and spec.cluster not in CLUSTERS:
        raise ClusterError(f"--cluster {spec.cluster!r}: unknown; choose one of {', '.join(CLUSTERS)}")
    if spec.cluster and not (spec.account or os.environ.get("SBATCH_ACCOUNT") or os.environ.get("SLURM_ACCOUNT")):
        raise ClusterError(f"--account: OSC ({spec.cluster}) needs your project code, e.g. --account PAS1234")
    if not NAME_RE.match(spec.job_name):
        raise ClusterError(f"--job-name {spec.job_name!r}: use 1-100 letters, digits, '.', '_' or '-'")
    if spec.sweep_name is not None and not NAME_RE.match(spec.sweep_name):
        raise ClusterError(f"--name {spec.sweep_name!r}: use 1-100 letters, digits, '.', '_' or '-'")
    _check_script_values(spec)
    if spec.osc is not None:
        _check_osc_limits(spec, limit)
    space = None
    if spec.command is None:
        if spec.space is None:
            raise ClusterError("--space FILE is required (the search space to sweep), or --command for any other driver")
        if not spec.space.is_file():
            raise ClusterError(f"--space {str(spec.space)!r}: file does not exist")
        from lora_diffusion.search_space import SpaceError, load_space

        try:
            space = load_space(spec.space, name=spec.sweep_name)
        except SpaceError as e:
            raise ClusterError(f"--space: {e}") from None
    elif not spec.command:
        raise ClusterError("--command: empty")
    if not (spec.venv / "bin" / "activate").is_file():
        raise ClusterError(f"--venv {str(spec.venv)!r}: no bin/activate there; make one with `bash cluster/install.sh` "
                           "on storage the compute nodes see")
    if not HELPER.is_file() or not TEMPLATE.is_file():
        raise ClusterError(f"{HELPER} or {TEMPLATE} not found: run this from a clone of the repository (pip install -e .)")
    warnings = layout_warnings(spec, space)
    if need_sbatch and shutil.which("sbatch") is None:
        raise ClusterError("sbatch is not on PATH: run this on a SLURM login node (or use --dry-run to see the script)")
    return warnings


def _check_script_values(spec: JobSpec) -> None:
    """Values rendered into the job script: no control characters anywhere (a newline would start a
    shell command); paths that go into #SBATCH lines also free of what sbatch cannot quote."""
    values: list[tuple[str, str]] = [("--results-dir", str(spec.results_dir)), ("--venv", str(spec.venv)),
                                     ("the repository path", str(REPO))]
    if spec.space is not None:
        values.append(("--space", str(spec.space)))
    if spec.tracking_uri is not None:
        values.append(("--tracking-uri", spec.tracking_uri))
    values += [("--command", w) for w in spec.command or []] + [("an argument after --", a) for a in spec.tune_args]
    for flag, value in values:
        if CONTROL_RE.search(value):
            shown = redact_uri(value) if flag == "--tracking-uri" else value
            raise ClusterError(f"{flag} {shown!r}: contains a control character (newline, tab, ...); "
                               "values written into the job script must not")
    for flag, word in [("--command", w) for w in spec.command or []] + [("an argument after --", a) for a in spec.tune_args]:
        if has_credentials(word):
            raise ClusterError(f"{flag} {redact_uri(word)!r}: holds a user name, password or token (scheme://...@host); "
                               "it would be written into the job script and shown in `ps` on the nodes. Give the "
                               "store as --tracking-uri (kept out of the script), or export MLFLOW_TRACKING_USERNAME "
                               "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) before submitting")
    if spec.tracking_uri is not None and (not spec.tracking_uri.strip() or any(c.isspace() for c in spec.tracking_uri)):
        raise ClusterError(f"--tracking-uri {redact_uri(spec.tracking_uri)!r}: not a URI (blank or contains spaces)")
    for flag, path in (("--results-dir", str(spec.results_dir)), ("the repository path", str(REPO))):
        bad = sorted(SBATCH_PATH_BAD & set(path))
        if bad:
            raise ClusterError(f"{flag} {path!r}: contains {' '.join(repr(c) for c in bad)}, which #SBATCH --output / "
                               "--chdir cannot hold (sbatch knows no escapes, and % starts a file-name pattern); "
                               "choose a folder without them")


def _check_osc_limits(spec: JobSpec, limit_s: int) -> None:
    osc = spec.osc
    assert osc is not None
    max_h = osc.single_node_max_h if spec.nodes == 1 else osc.multi_node_max_h
    if limit_s > max_h * 3600:
        kind = "single-node" if spec.nodes == 1 else "multi-node"
        raise ClusterError(f"--time {spec.time} ({limit_s / 3600:g} h): OSC {spec.cluster} runs {kind} jobs for at most "
                           f"{max_h} h (single-node: {osc.single_node_max_h} h, multi-node: {osc.multi_node_max_h} h); "
                           "ask for less and let the job requeue itself, or chain jobs (--no-requeue, --dependency)")
    if spec.gpus_per_node > osc.max_gpus:
        raise ClusterError(f"--gpus-per-node {spec.gpus_per_node}: no {spec.cluster} node has more than {osc.max_gpus} "
                           f"GPUs ({osc.gpu}); ask for at most {osc.max_gpus} and more --nodes")


def _memory_note(spec: JobSpec, types) -> str:
    """What SLURM grants a partial node: its cores times the node type's memory per core."""
    per_core = sorted({t.mem_per_core_gb for t in types if t.mem_per_core_gb})
    if not per_core or spec.cpus_per_node is None:
        return ""
    lo, hi = per_core[0] * spec.cpus_per_node, per_core[-1] * spec.cpus_per_node
    gb = f"{lo:.0f} GB" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} GB"
    rate = f"{per_core[0]:g} GB" if len(per_core) == 1 else f"{per_core[0]:g}-{per_core[-1]:g} GB"
    return (f"memory: a part of a node gets memory in proportion to its cores: {spec.cpus_per_node} cores x {rate} "
            f"per core ({', '.join(t.name for t in types)} nodes on {spec.cluster}) = about {gb} per node; Ray sees "
            "that (70 % for tasks, 30 % object store)")


def layout_warnings(spec: JobSpec, space=None) -> list[str]:
    """Refuse a trial that can never be placed; warn about requested GPUs or cores a trial cannot use."""
    warnings: list[str] = []
    types = spec.osc.node_types_for(spec.gpus_per_node) if spec.osc else []
    node_cpus = spec.cpus_per_node if spec.cpus_per_node is not None else (min(t.cores for t in types) if types else None)
    if spec.osc and spec.cpus_per_node is not None and types and spec.cpus_per_node > max(t.cores for t in types):
        warnings.append(f"--cpus-per-node {spec.cpus_per_node}: no {spec.cluster} node with {spec.gpus_per_node} "
                        f"GPU(s) has more than {max(t.cores for t in types)} cores; the job would never start")
    if spec.gpus_per_node > 0 and spec.cpus_per_node is not None and spec.cpus_per_node < spec.gpus_per_node:
        warnings.append(f"--cpus-per-node {spec.cpus_per_node} < --gpus-per-node {spec.gpus_per_node}: each GPU worker "
                        "needs at least one core, so some GPUs stay idle (and memory comes per core)")
    if spec.osc and spec.cpus_per_node is not None:
        note = _memory_note(spec, types)
        if note:
            warnings.append(note)
    if space is None:
        return warnings
    t = space.base.train
    cpw, gpw, workers = t.cpus_per_worker, t.gpus_per_worker, t.num_workers
    res = f"resources: {workers} worker(s) x {cpw} CPU(s)" + (f" + {gpw:g} GPU(s)" if gpw else "")
    if gpw > 0 and spec.gpus_per_node == 0:
        raise ClusterError(f"--gpus-per-node 0: the space's trials need GPUs ({res}); ask for GPUs or set "
                           "resources.gpus_per_worker: 0")
    if gpw > spec.gpus_per_node:
        raise ClusterError(f"--gpus-per-node {spec.gpus_per_node}: one trial worker needs {gpw:g} GPUs ({res}); "
                           "a worker runs on one node")
    if node_cpus is not None and cpw > node_cpus:
        raise ClusterError(f"--cpus-per-node {node_cpus}: one trial worker needs {cpw} CPUs ({res}); a worker runs "
                           "on one node")
    if node_cpus is None:
        return warnings
    per_node = node_cpus // cpw
    if gpw > 0:
        per_node = min(per_node, int(spec.gpus_per_node // gpw))
    if per_node * spec.nodes < workers:
        raise ClusterError(f"a trial needs {workers} workers ({res}) but {spec.nodes} node(s) x {node_cpus} CPUs"
                           + (f" x {spec.gpus_per_node} GPUs" if gpw else "") + f" hold at most {per_node * spec.nodes}; "
                           "add --nodes or lower resources.workers")
    if gpw > 0 and per_node * gpw < spec.gpus_per_node:
        idle = spec.gpus_per_node - per_node * gpw
        warnings.append(f"--cpus-per-node {node_cpus} with --gpus-per-node {spec.gpus_per_node}: a trial worker takes "
                        f"{cpw} CPU(s) + {gpw:g} GPU(s) ({res}), so {per_node} worker(s) fit per node and {idle:g} "
                        f"GPU(s) per node stay idle; ask for at least {int(spec.gpus_per_node / gpw * cpw)} CPUs per node")
    return warnings


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
        "output": str(out_dir) + "/%x-%j.out",
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
    if has_credentials(uri):
        # Never on disk: `submit` hands the URI to sbatch in its environment (the job, and a requeued
        # run, inherit it); the script only checks that it arrived.
        lines["export MLFLOW_TRACKING_URI="] = (
            "export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:?the tracking URI with its credentials comes from the "
            "environment sbatch was given}")
    else:
        lines["export MLFLOW_TRACKING_URI="] = f"export MLFLOW_TRACKING_URI={q(uri)}"
    if spec.command is not None:  # any driver: the command, then EXTRA_ARGS (no sweep name)
        lines["DRIVER=("] = "DRIVER=(" + " ".join(q(a) for a in spec.command) + ")"
        lines["[[ $MLFLOW_TRACKING_URI =~"] = "# (the driver finds the tracking store in MLFLOW_TRACKING_URI)"
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
    if CONTROL_RE.search(value) or '"' in value:  # validate() refuses these first; never render one
        raise ClusterError(f"#SBATCH --{key}={value!r}: a newline or quote cannot be written into an #SBATCH line")
    if any(c.isspace() for c in value):  # sbatch splits #SBATCH lines on blanks but keeps "..." together
        return f'#SBATCH --{key}="{value}"'
    return f"#SBATCH --{key}={value}"


def has_credentials(uri: str) -> bool:
    """True when the URI carries a user name, password or token before its host (scheme://secret@host)."""
    return redact_uri(uri) != uri


# --------------------------------------------------------------------------- SLURM commands


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise ClusterError(f"{cmd[0]} is not on PATH: run this on a SLURM login node")
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def sbatch_env(spec: JobSpec) -> dict[str, str]:
    """sbatch's environment (the job inherits it: --export=ALL): a tracking URI with credentials travels
    here rather than in the script; MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN set by you travel as they are."""
    env = dict(os.environ)
    if spec.tracking_uri and has_credentials(spec.tracking_uri):
        env["MLFLOW_TRACKING_URI"] = spec.tracking_uri
    return env


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
    """Validate, render, and (unless dry_run) sbatch the job. Returns {script, job_id, output, text, warnings}."""
    warnings = validate(spec, need_sbatch=not dry_run)
    text = render(spec)
    slurm_dir = spec.results_dir / "slurm"
    if dry_run:
        return {"script": None, "job_id": None, "output": None, "text": text, "warnings": warnings}
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script = _write_private(slurm_dir, f"{spec.job_name}-{time.strftime('%Y%m%d-%H%M%S')}", ".sbatch", text)
    proc = _run(["sbatch", "--parsable", str(script)], env=sbatch_env(spec))
    if proc.returncode != 0:
        raise ClusterError(f"sbatch {script} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    if not JOBID_RE.match(job_id):
        raise ClusterError(f"sbatch printed {proc.stdout.strip()!r}, not a job id")
    output = slurm_dir / f"{spec.job_name}-{job_id}.out"
    return {"script": script, "job_id": job_id, "output": output, "text": text, "warnings": warnings}


def _write_private(folder: Path, stem: str, suffix: str, text: str) -> Path:
    """A new file, mode 600 from the start (the job script names your account, paths and tracking store)."""
    for i in range(1000):
        path = folder / f"{stem}{'-' + str(i) if i else ''}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    raise ClusterError(f"{folder}: could not create a new {stem}*{suffix}")


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
    s.add_argument("--cluster", help=f"OSC cluster: {', '.join(CLUSTERS)} (login host, node sizes, time limits)")
    s.add_argument("--cpus-per-node", type=int, help="CPUs per node (default: whole nodes, --exclusive); a part of "
                   "an OSC node gets memory in proportion to its cores")
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
    for w in result["warnings"]:
        print(f"{'note' if w.startswith('memory:') else 'warning'}: {w}", file=sys.stderr)
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
