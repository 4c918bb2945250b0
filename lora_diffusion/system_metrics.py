"""System metrics of a run: CPU, memory, disk, network and (where present) GPU, in its MLflow run.

    monitor = start_monitor(tracking_uri, run_id, rank=0, interval_s=10.0)   # None when off / no run
    ...                                                                     # train
    stop_monitor(monitor)                                                   # flushes the last samples

MLflow's own `SystemMetricsMonitor` (what `mlflow.start_run(log_system_metrics=True)` starts; the
project addresses runs by id, so it starts the monitor itself): a thread samples every
`tracking.system_metrics_interval_s` seconds and logs `system/cpu_utilization_percentage`,
`system/system_memory_usage_megabytes`, `system/system_memory_usage_percentage`, disk and network
counters and, with an NVIDIA GPU and `nvidia-ml-py` installed (the `gpu` extra), `system/gpu_<i>_utilization_percentage`
and `system/gpu_<i>_memory_usage_megabytes`. The MLflow UI shows them in the run's System metrics
tab, so a user sees which trials starved. A run shorter than one interval still gets one sample, at its end.

Node tags: every monitored run gets `node_hostname` and `ray_node_id` (when under Ray) of its rank 0,
and `node.rank<r>` = "<hostname> <ray node id>" for each rank. Rank 0 logs as `system/...`; the
other ranks of a multi-worker trial (DDP, possibly on other nodes) log as `system/rank<r>/...`.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor


def ray_node_id() -> str | None:
    """The Ray node id of this process, or None outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not under Ray, or no runtime context
        return None
    return None


def node_tags(rank: int) -> dict[str, str]:
    host = socket.gethostname()
    node = ray_node_id()
    tags = {f"node.rank{rank}": f"{host} {node}" if node else host}
    if rank == 0:
        tags["node_hostname"] = host
        if node:
            tags["ray_node_id"] = node
    return tags


def start_monitor(tracking_uri: str | None, run_id: str | None, rank: int = 0, interval_s: float = 10.0):
    """Tag the run with this node and start MLflow's system-metrics thread for it; None without a run."""
    if not tracking_uri or not run_id:
        return None
    from lora_diffusion.tracking import client

    client(tracking_uri).log_batch(run_id, tags=_tags(node_tags(rank)))
    # the monitor says "Started monitoring system metrics." at INFO on every trial: keep the console quiet
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = Monitor(run_id, sampling_interval=interval_s, samples_before_logging=1, resume_logging=True,
                      node_id=None if rank == 0 else f"rank{rank}", tracking_uri=tracking_uri)
    monitor.start()
    return monitor


class Monitor(SystemMetricsMonitor):
    """MLflow's monitor, plus one sample at the end of a run shorter than one interval (MLflow's thread
    logs only after a full interval, so such a run would have no system metrics at all)."""

    published = 0

    def publish_metrics(self, metrics):
        super().publish_metrics(metrics)
        self.published += 1

    def finish(self):
        started = self._process is not None
        super().finish()
        if started and not self.published:
            self.collect_metrics()
            self.publish_metrics(self.aggregate_metrics())
            self.mlflow_logger.flush()


def stop_monitor(monitor: Any) -> None:
    """Stop the thread and flush what it sampled (never raises: bookkeeping must not fail a run)."""
    if monitor is None:
        return
    try:
        monitor.finish()
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("system metrics: could not stop the monitor: %s", e)


def _tags(tags: dict[str, str]):
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]
