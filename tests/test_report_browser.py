"""The experiment report opened in Debian's headless Chromium, driven over the DevTools protocol.

`open_page` starts Chromium with the flags the project allows (no network services, a throwaway
profile), loads a page, waits until every plot container holds a rendered plotly SVG, and returns
the console errors, uncaught exceptions, requests that left the machine, and a full-page
screenshot. `apt_install` installs a Debian package when its binary is missing (CI machines
start bare; we are root there).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
    "--hide-scrollbars", "--mute-audio",
    # plotly's parallel coordinates draw with WebGL; without a GPU Chromium needs its software
    # renderer, which it no longer picks on its own
    "--enable-unsafe-swiftshader",
]
_apt_updated = False


def apt_install(package: str, binary: str) -> str:
    """Path of `binary`, installing Debian's `package` first when it is missing."""
    global _apt_updated
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail(f"{binary} is missing and installing Debian's {package} needs root: apt-get install -y {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # other engineers' fixtures may be installing too
    install = ["apt-get", *lock, "install", "-y", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        if not _apt_updated:
            subprocess.run(["apt-get", *lock, "update"], env=env, capture_output=True, check=False)
            _apt_updated = True
        r = subprocess.run(install, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"apt-get install {package} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    found = shutil.which(binary)
    if not found:
        pytest.fail(f"Debian's {package} installed but {binary} is not on PATH")
    return found


@dataclass
class PageResult:
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)  # one per div.plot: id, section, svg, width, height
    value: object = None  # the last value of the page expression
    screenshot: bytes = b""


LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "devtools:")

# Evaluated in the page: what each plot container holds once plotly has drawn it.
PLOTS_JS = """
Array.from(document.querySelectorAll('div.plot')).map(d => {
  const g = d.querySelector('.js-plotly-plot');
  const svg = d.querySelector('svg.main-svg');
  const r = (g || d).getBoundingClientRect();
  return {id: g ? g.id : null, section: d.dataset.section, svg: !!svg,
          traces: d.querySelectorAll('.trace, g.axis').length,  // g.axis: a parallel-coordinates dimension
          width: Math.round(r.width), height: Math.round(r.height)};
})
"""


def plots_ready(plots) -> bool:
    return bool(plots) and all(p["svg"] for p in plots)


async def _drive(ws_url: str, url: str, width: int, timeout_s: float, expression: str, ready) -> PageResult:
    import aiohttp

    res = PageResult()
    ids = itertools.count(1)
    pending: dict[int, asyncio.Future] = {}
    loaded = asyncio.Event()

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, max_msg_size=0) as ws:

            async def reader():
                async for msg in ws:
                    data = json.loads(msg.data)
                    if "id" in data and data["id"] in pending:
                        pending.pop(data["id"]).set_result(data)
                        continue
                    method, p = data.get("method"), data.get("params", {})
                    if method == "Page.loadEventFired":
                        loaded.set()
                    elif method == "Runtime.exceptionThrown":
                        d = p["exceptionDetails"]
                        res.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
                    elif method == "Runtime.consoleAPICalled":
                        text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                        (res.console_errors if p["type"] in ("error", "assert") else res.warnings
                         if p["type"] == "warning" else []).append(text)
                    elif method == "Log.entryAdded":
                        e = p["entry"]
                        (res.console_errors if e["level"] == "error" else res.warnings).append(
                            f"[{e['source']}] {e['text']}")
                    elif method == "Network.requestWillBeSent":
                        u = p["request"]["url"]
                        if not u.startswith(LOCAL_SCHEMES):
                            res.external_requests.append(u)

            task = asyncio.create_task(reader())

            async def call(method: str, **params):
                i = next(ids)
                fut = asyncio.get_running_loop().create_future()
                pending[i] = fut
                await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
                out = await asyncio.wait_for(fut, timeout_s)
                if "error" in out:
                    raise RuntimeError(f"{method}: {out['error']}")
                return out.get("result", {})

            for domain in ("Page", "Runtime", "Log", "Network"):
                await call(f"{domain}.enable")
            await call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1,
                       mobile=False)
            await call("Page.navigate", url=url)
            await asyncio.wait_for(loaded.wait(), timeout_s)
            deadline = time.monotonic() + timeout_s
            while True:
                out = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                res.value = out["result"].get("value")
                if ready(res.value) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            if expression == PLOTS_JS:
                res.plots = res.value or []
            await asyncio.sleep(1.0)  # let WebGL layers and transitions settle before the picture
            metrics = await call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                              clip={"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1})
            res.screenshot = base64.b64decode(shot["data"])
            task.cancel()
    return res


def open_page(target: Path | str, width: int = 1400, timeout_s: float = 60.0, expression: str = PLOTS_JS,
              ready=plots_ready) -> PageResult:
    """Open a local HTML file (or a URL) in headless Chromium; see the module docstring.

    Waits until `ready(value of expression)` (default: every plot container drew its SVG)."""
    chromium = apt_install("chromium", "chromium")
    profile = tempfile.mkdtemp(prefix="report-chromium-")
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "--remote-debugging-address=127.0.0.1", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        port_file = Path(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port within 60 s")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        import urllib.request

        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        url = target.resolve().as_uri() if isinstance(target, Path) else target
        return asyncio.run(_drive(page["webSocketDebuggerUrl"], url, width, timeout_s, expression, ready))
    finally:
        # stop what we started: the browser's own process group, by its id
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def check_report_page(res: PageResult, expected_sections: set[str]) -> None:
    """The assertions every rendered report must pass."""
    assert res.exceptions == [], f"uncaught exceptions in the page: {res.exceptions}"
    assert res.console_errors == [], f"console errors: {res.console_errors}"
    assert res.external_requests == [], f"the page fetched from the network: {res.external_requests}"
    assert res.plots, "no plot containers in the page"
    for p in res.plots:
        assert p["svg"], f"plot {p} in section {p['section']} did not render"
        assert p["width"] > 200 and p["height"] > 150, f"plot {p} rendered too small"
        assert p["traces"] > 0, f"plot {p} has no drawn traces"
    assert expected_sections <= {p["section"] for p in res.plots}, (
        f"sections without a rendered plot: {expected_sections - {p['section'] for p in res.plots}}")
    assert res.screenshot.startswith(b"\x89PNG"), "screenshot is not a PNG"


@pytest.mark.browser
@pytest.mark.timeout(240)
def test_report_renders_in_headless_chromium(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import make_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_store(uri, "mimic")
    out = tmp_path / "report.html"
    from lora_diffusion.report import main

    assert main(["--experiment", "mimic", "--tracking-uri", uri, "--out", str(out)]) == 0
    res = open_page(out)
    (tmp_path / "report.png").write_bytes(res.screenshot)
    check_report_page(res, {"parallel", "frontier", "curves", "importance", "phases"})
    # two methods: a parallel-coordinates plot and an importance plot each
    assert sum(p["section"] == "parallel" for p in res.plots) == 2
    assert sum(p["section"] == "importance" for p in res.plots) == 2
