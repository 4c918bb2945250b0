"""What a sweep checks before it spends cluster time: the space's base config, data, base model(s) and MLflow
store (`preflight`), the storage path, the ownership of a sweep to restore, and on a running Ray cluster the
resources and the paths every node must see.

Owns: `SweepError` (the sweep cannot start or continue: exit code 2), those checks, the default storage path.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_diffusion.search_space import Space
from lora_diffusion.sweep.runs import local_store_dir

DEFAULT_STORAGE = "tune_results"


class SweepError(RuntimeError):
    """The sweep cannot start or continue; the message says why and what to do."""


def check_shared_paths(paths: dict[str, Path], node_sees) -> None:
    """On a multi-node cluster every node must see `paths` (the MLflow store, the storage path).

    `node_sees(path_of_marker) -> {node: bool}` runs a check on every node. Raises SweepError naming
    the path, the nodes that do not see it and what to use instead.
    """
    for what, folder in paths.items():
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".lora_diffusion_shared_check_{os.getpid()}"
        marker.write_text("shared?")
        try:
            seen = node_sees(str(marker))
        finally:
            marker.unlink(missing_ok=True)
        blind = sorted(n for n, ok in seen.items() if not ok)
        if blind:
            hint = ("use an MLflow server (mlflow server --backend-store-uri ... --host <head ip>) and pass its http:// URI "
                    "with --tracking-uri, or put the SQLite file on storage every node mounts") if what == "tracking" else \
                   "pass --storage-path on storage every node mounts (e.g. $HOME or /fs/scratch on OSC)"
            raise SweepError(f"{what}: {folder} is not visible from node(s) {', '.join(blind)} of this {len(seen)}-node "
                             f"Ray cluster; {hint}")


def _ray_node_sees(marker: str) -> dict[str, bool]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def exists(path: str) -> bool:
        return os.path.exists(path)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})":
            exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
            for n in nodes}
    return {k: bool(ray.get(v, timeout=120)) for k, v in refs.items()}


def check_cluster(uri: str, storage: Path, space: Space) -> list[str]:
    """Multi-node checks and resource fit; returns warnings to print (raises SweepError for blocking problems)."""
    import ray

    warnings = []
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        paths = {"storage path": storage}
        store = local_store_dir(uri)
        if store is not None:
            paths["tracking"] = store
        check_shared_paths(paths, _ray_node_sees)
        if store is not None and uri.startswith("sqlite:///"):
            warnings.append(f"tracking: {len(nodes)} nodes write to one SQLite file ({uri}); it is shared, but SQLite on "
                            "network file systems locks poorly: an MLflow server is the safer choice")
    total = ray.cluster_resources()
    need = space.resources_per_trial()["total"]
    for res, amount in need.items():
        if amount and total.get(res, 0) < amount:
            raise SweepError(f"resources: one trial needs {amount:g} {res}, the Ray cluster has {total.get(res, 0):g}; "
                             "lower resources.cpus_per_worker / workers / gpus_per_worker in the space")
    return warnings


def preflight(space: Space, uri: str, check_resources: bool = True) -> None:
    """Everything that would fail later, checked now: tracking store, data, base model(s), resources (this
    machine's, for a local cluster; --dry-run skips those: a plan may be meant for a cluster)."""
    from lora_diffusion import train
    from lora_diffusion.tracking import check_tracking_uri

    if not space.base.tracking.enabled:
        raise SweepError("tracking.enabled: got False; the tuning service records every trial in MLflow "
                         "(set --tracking-uri to choose the store)")
    train.preflight(space.base, check_resources=check_resources)
    check_tracking_uri(uri)
    for p in space.params:
        if p.key == "model.base":
            for choice in p.choices:
                train.check_base(choice)
    if check_resources and os.environ.get("RAY_ADDRESS") is None:
        need = space.resources_per_trial()["total"]
        ncpu = os.cpu_count() or 1
        if need["CPU"] > ncpu:
            raise SweepError(f"resources: one trial needs {need['CPU']} CPUs, this machine has {ncpu}")


def check_storage_path(storage: Path) -> None:
    """--storage-path is a folder this user can write (or can create), checked before Ray starts; nothing is
    created here (a probe folder is made and removed in the nearest existing parent)."""
    from lora_diffusion.config import ConfigError, check_writable_folder

    try:
        check_writable_folder(storage, "--storage-path")
    except ConfigError as e:
        raise SweepError(f"{e} (the folder Tune keeps sweeps in; default ./{DEFAULT_STORAGE})") from None


def check_restore_ownership(storage: Path, exp_dir: Path) -> None:
    """Before `Tuner.restore` (which unpickles tuner.pkl, the trainable and trial state from `exp_dir`): the
    storage and experiment folders and every pickle in the experiment must belong to this user and be
    writable by nobody else, or someone else could have planted code that the restore runs."""
    import stat

    uid = os.getuid()
    paths = [storage, exp_dir]
    for folder, dirs, files in os.walk(exp_dir):
        paths += [Path(folder) / d for d in dirs] + [Path(folder) / f for f in files if f.endswith((".pkl", ".pickle"))]
    for p in paths:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise SweepError(f"--resume: {p} is a symbolic link; a sweep to restore must be plain files and folders of "
                             "yours (Ray unpickles them)")
        if st.st_uid != uid:
            raise SweepError(f"--resume: {p} belongs to user id {st.st_uid}, not to you ({uid}); restoring would unpickle "
                             "files someone else controls, so it is refused. Copy the sweep into a folder of yours")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            who = " and ".join(w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if st.st_mode & bit)
            raise SweepError(f"--resume: {p} is writable by {who} (mode {stat.filemode(st.st_mode)}); restoring would unpickle files others could have "
                             f"changed, so it is refused. If only you wrote them: chmod -R go-w {exp_dir} {storage}")
