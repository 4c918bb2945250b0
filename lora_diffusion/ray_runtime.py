"""Starting Ray for our commands: a fresh local cluster that listens on 127.0.0.1 only, or the cluster at
$RAY_ADDRESS (e.g. the one cluster/ starts inside a SLURM allocation).

Owns: `start_ray` (used by `python -m lora_diffusion.train`, the sweep driver and `compare`), the loopback-only
start-up (`loopback_only`, `LOOPBACK`), and the hook that keeps Ray's SIGTERM exit quiet in the driver and in
every worker (`quiet_ray_sigterm_exit`, `QUIET_EXIT_RUNTIME_ENV`).

Ray's token authentication is on for a cluster we start: `ray.init` of a local cluster turns it on (Ray 2.60)
and nothing here turns it off; a multi-node cluster gets RAY_AUTH_MODE=token from cluster/ray_slurm.sh.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(num_cpus: int | None = None, dashboard: bool = True, reuse: bool = True) -> tuple[bool, str | None]:
    """Connect to $RAY_ADDRESS, or start a fresh local Ray cluster (token auth on, every process on 127.0.0.1,
    the dashboard on 127.0.0.1 unless `dashboard` is False, `num_cpus` CPUs or all); (this call connected,
    the dashboard's URL or None).

    The caller calls `ray.shutdown()` when this call connected. `reuse`: when Ray is already initialised in
    this process, use it (False, None); with reuse=False `ray.init` refuses instead (a sweep driver starts
    its own cluster). For a local cluster, RAY_API_SERVER_ADDRESS points at its own dashboard port: Ray
    Train's placement-group cleaner asks the state API, and without it could ask another Ray cluster on the
    same host (without a dashboard nothing listens there, so such a call fails here instead).
    """
    import ray

    if reuse and ray.is_initialized():
        return False, None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ctx = ray.init(address=address, log_to_driver=True)
        return True, _url(ctx.dashboard_url)
    # a local single-node cluster: every Ray process listens on 127.0.0.1 only (see loopback_only)
    kwargs: dict[str, Any] = {"num_cpus": num_cpus, "include_dashboard": dashboard, "_node_ip_address": LOOPBACK,
                              "runtime_env": QUIET_EXIT_RUNTIME_ENV}  # no SystemExit report at shutdown
    quiet_ray_sigterm_exit()
    port = free_port()
    if dashboard:
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    with loopback_only():
        ctx = ray.init(**kwargs)
    return True, _url(ctx.dashboard_url) if dashboard else None


def _url(u: str | None) -> str | None:
    if not u:
        return None
    return u if "://" in u else f"http://{u}"


@contextlib.contextmanager
def loopback_only():
    """Around `ray.init(..., _node_ip_address="127.0.0.1")` of a local single-node cluster: every Ray
    process then listens on 127.0.0.1 only.

    Ray 2.60 replaces `_node_ip_address="127.0.0.1"` by the machine's routable address unless
    `ray_constants.ENABLE_RAY_CLUSTER` is off (env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when
    `ray` is imported); with the node address on loopback, the GCS, raylet, agents and workers bind
    their gRPC and HTTP servers there. GLOO_SOCKET_IFNAME=lo keeps DDP's gloo pairs on loopback.
    The Ray processes inherit this environment when they start; the driver's is restored after.
    """
    import ray._private.ray_constants as ray_constants

    wanted = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    saved_env = {k: os.environ.get(k) for k in wanted}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(wanted)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


LOOPBACK = "127.0.0.1"  # the node address of a local cluster we start (see loopback_only)
# every worker of a local cluster we start runs this first (see quiet_ray_sigterm_exit)
QUIET_EXIT_RUNTIME_ENV = {"worker_process_setup_hook": "lora_diffusion.ray_runtime.quiet_ray_sigterm_exit"}


def quiet_ray_sigterm_exit() -> None:
    """Ray's SIGTERM handlers (driver and workers) raise SystemExit wherever Python happens to be. When that
    is a weakref or GC callback (WeakSet._remove while a process shuts down), the exception cannot
    propagate and Python prints it as "Exception ignored in ... Traceback ... SystemExit" at the end of a
    successful sweep. Such a report, and only one raised by a Ray `sigterm_handler`, is dropped: the process
    is already on its way out. Installed in the driver and, as a worker setup hook, in every Ray worker."""
    if getattr(sys.unraisablehook, "quiet_ray_sigterm", False):
        return
    default = sys.unraisablehook

    def hook(unraisable):
        tb = unraisable.exc_traceback
        from_ray = False
        while tb is not None:
            code = tb.tb_frame.f_code
            from_ray |= code.co_name == "sigterm_handler" and f"{os.sep}ray{os.sep}" in code.co_filename
            tb = tb.tb_next
        if isinstance(unraisable.exc_value, SystemExit) and from_ray:
            return
        default(unraisable)

    hook.quiet_ray_sigterm = True
    sys.unraisablehook = hook
