"""Faults of the environment during a sweep: the MLflow tracking store stops answering, a disk fills up.

Such an error is not the trial's fault, and marking the trial FAILED would lose it for good (a restored
sweep keeps failed trials failed). So:

1. `fault_of(exc)` recognises one: no space left on a device, or MLflow's HTTP client giving up on the
   tracking server after its bounded retries.
2. The trial hands it to the driver (`hand_to_driver`: a small named Ray actor, so it works from any
   node) and waits to be stopped; its MLflow run is left as it was (RUNNING).
3. The driver (`FaultWatch`, a Tune callback that looks once a second) prints the error and stops the
   sweep the way Ctrl-C does: Tune saves its state, the running trials count as unfinished.
4. `lora_diffusion.tune` exits with EXIT_FAULT (75) and a message naming the store or the full folder;
   the same command with `--resume` continues once the store answers or space is freed.

A short outage never gets this far: MLflow's client retries every request (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
default 7, with MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR 2: about 4 minutes in all) and the sweep just waits.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_FAULT = 75  # sysexits' EX_TEMPFAIL: the environment failed, the sweep is saved; retry with --resume
DISK, TRACKING = "disk", "tracking"
_NO_SPACE = ("no space left on device", "disk quota exceeded", "database or disk is full", "errno 28")
_UNREACHABLE = ("max retries exceeded", "connection refused", "connectionerror", "remotedisconnected",
                "connection aborted", "failed with timeout exception", "error code 502", "error code 503", "error code 504")


@dataclass(frozen=True)
class Fault:
    kind: str      # DISK or TRACKING
    detail: str    # one line: what failed

    def __str__(self) -> str:
        return self.detail


def fault_of(exc: BaseException) -> Fault | None:
    """The environment fault behind `exc` (its cause and context chain included), or None for any other error."""
    texts, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or len(seen) > 50:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return Fault(DISK, "no space left on device" + (f" (writing {e.filename})" if e.filename else ""))
        texts.append(f"{type(e).__name__}: {e}".lower())
        todo += [e.__cause__, e.__context__]
    text = "\n".join(texts)
    if any(m in text for m in _NO_SPACE):
        return Fault(DISK, "no space left on device")
    if "api request to" in text and any(m in text for m in _UNREACHABLE):
        return Fault(TRACKING, "the MLflow tracking server stopped answering (MLflow's HTTP retries gave up)")
    return None


# --------------------------------------------------------------------------- trial side


NAMESPACE = "lora_diffusion"  # the fault box's Ray namespace (a detached actor needs a named one)


def _box_name(sweep: str) -> str:
    return f"faults_{sweep}"


def _box_class():
    import ray

    @ray.remote(num_cpus=0)
    class FaultBox:
        """Holds the faults trials met, until the driver takes them."""

        def __init__(self):
            self.items: list[tuple[str, str, str]] = []

        def put(self, where: str, kind: str, detail: str) -> None:
            self.items.append((where, kind, detail))

        def take(self) -> list[tuple[str, str, str]]:
            items, self.items = self.items, []
            return items

    return FaultBox


def hand_to_driver(sweep: str, where: str, fault: Fault, wait_s: float = 300.0) -> None:
    """Tell the driver of sweep `sweep` about `fault` and wait for it to stop this trial (then Ray ends
    this process). Raises the fault as an error if no stop comes within `wait_s` (the trial then fails)."""
    import ray

    print(f"[tune] {where}: {fault}; handing it to the driver, which stops the sweep with its state saved", flush=True)
    box = _box_class().options(name=_box_name(sweep), namespace=NAMESPACE, get_if_exists=True,
                                 lifetime="detached").remote()
    ray.get(box.put.remote(where, fault.kind, fault.detail), timeout=120)
    time.sleep(wait_s)
    raise RuntimeError(f"{where}: {fault}, and the driver did not stop the sweep within {wait_s:.0f} s")


# --------------------------------------------------------------------------- driver side


_DRIVER: "Faults | None" = None


def watch(sweep: str) -> "Faults":
    """The driver's record of faults for sweep `sweep` (one per driver process; callbacks find it by
    `driver_faults()`, also when Tune restored them from an earlier run's pickled state)."""
    global _DRIVER
    _DRIVER = Faults(sweep)
    return _DRIVER


def driver_faults() -> "Faults | None":
    return _DRIVER


class Faults:
    """The driver's record of faults; the first one stops the sweep (SIGINT: Tune's graceful stop)."""

    def __init__(self, sweep: str):
        self.sweep = sweep
        self.items: list[tuple[str, Fault]] = []

    def add(self, where: str, fault: Fault) -> None:
        first = not self.items
        self.items.append((where, fault))
        print(f"[tune] error: {where}: {fault}", file=sys.stderr, flush=True)
        if first:
            print("[tune] stopping the sweep; its state is saved", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGINT)

    @property
    def kinds(self) -> set[str]:
        return {f.kind for _, f in self.items}

    def callback(self):
        """A Tune callback that takes the trials' faults from their box, once a second."""
        from ray import tune

        class FaultWatch(tune.Callback):
            def __init__(self):
                self._last = 0.0

            def on_step_begin(self, iteration, trials, **info):
                now = time.monotonic()
                faults = driver_faults()
                if faults is None or now - self._last < 1.0:
                    return
                self._last = now
                for where, kind, detail in faults.take():
                    faults.add(where, Fault(kind, detail))

        return FaultWatch()

    def take(self) -> list[tuple[str, str, str]]:
        import ray

        try:
            box = ray.get_actor(_box_name(self.sweep), namespace=NAMESPACE)
        except ValueError:  # no trial met a fault: no box
            return []
        return ray.get(box.take.remote(), timeout=60)

    def close(self) -> None:
        """Remove the box (a detached actor outlives the trial that made it)."""
        import ray

        try:
            ray.kill(ray.get_actor(_box_name(self.sweep), namespace=NAMESPACE))
        except Exception:  # noqa: BLE001 - none was made, or Ray is gone
            pass


def space_report(folders: dict[str, Path]) -> str:
    """Free space of each folder ("storage path /x: 0 B free of 8.0 MiB (full)"), the full ones first."""
    rows = []
    for what, folder in folders.items():
        f = Path(folder)
        while not f.exists() and f != f.parent:
            f = f.parent
        try:
            u = shutil.disk_usage(f)
        except OSError:
            continue
        full = u.free < max(1 << 20, u.total // 100)
        rows.append((not full, f"{what} {folder}: {_size(u.free)} free of {_size(u.total)}" + (" (full)" if full else "")))
    return "; ".join(r for _, r in sorted(rows))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
