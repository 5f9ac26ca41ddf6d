"""A headless JupyterLab and a headless Chromium for the browser tests.

* ``jupyter_lab``: JupyterLab on a free port of 127.0.0.1 with a random token, started from this
  test run's Python (so the kernel is the kit's environment), serving a *copy* of ``notebooks/``
  from a temporary folder: running a lesson in the browser never touches the stored outputs.
  Its config, data, runtime and IPython folders are temporary too (the user's are left alone);
  the kernelspec the lessons name (``llmsys-lab``) is registered there and points at this Python.
  The server is stopped by its PID when the module's tests end, also when they fail.
* ``browser``: Debian's Chromium (``/usr/bin/chromium``, or ``$LLMSYS_CHROMIUM``) driven by
  Playwright; no browser is downloaded. Without Chromium the browser tests are skipped with the
  command that installs it, unless ``LLMSYS_REQUIRE_BROWSER=1`` (set by ``make test`` when
  Chromium is installed, and by ``make test-browser``), where a missing browser is a failure.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# Chromium as root needs --no-sandbox; the rest keeps it from calling home on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic"]
# JupyterLab settings for the test server: nothing is saved behind the test's back, no news
# pop-up over the widgets, every cell attached to the DOM (no windowing).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


def require_browser() -> bool:
    return os.environ.get("LLMSYS_REQUIRE_BROWSER", "") not in ("", "0")


def find_chromium() -> str | None:
    explicit = os.environ.get("LLMSYS_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return next((c for c in CHROMIUM_CANDIDATES if Path(c).exists()), None)


def skip_or_fail(reason: str):
    if require_browser():
        pytest.fail(f"{reason} (LLMSYS_REQUIRE_BROWSER is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    process: subprocess.Popen
    log: Path

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def notebook_url(self, relpath: str) -> str:
        return f"{self.url}/lab/tree/{relpath}?token={self.token}&reset"

    def shutdown_kernels(self) -> None:
        """End every session (and its kernel): one lesson's kernel never runs into the next."""
        for session in self.api("/api/sessions"):
            self.api(f"/api/sessions/{session['id']}", method="DELETE")

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


def _kernel_names() -> dict[str, str]:
    """kernelspec name -> display name, as the lessons' metadata give them."""
    names = {}
    from llmsys_lab import course

    for nb in course.lesson_notebooks(root=NOTEBOOKS.parent):
        spec = json.loads(nb.read_text()).get("metadata", {}).get("kernelspec", {})
        if spec.get("name"):
            names[spec["name"]] = spec.get("display_name", spec["name"])
    return names or {"python3": "Python 3"}


def _prepare_home(base: Path) -> dict[str, str]:
    """Temporary Jupyter folders, the lessons' kernelspecs pointing at this Python, lab settings."""
    config, data, runtime, ipython = (base / d for d in ("config", "data", "runtime", "ipython"))
    for d in (config, data, runtime, ipython):
        d.mkdir(parents=True)
    for name, display in _kernel_names().items():
        spec_dir = data / "kernels" / name
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": display, "language": "python", "metadata": {"debugger": True}}, indent=1))
    for plugin, values in LAB_SETTINGS.items():
        path = config / "lab" / "user-settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = dict(os.environ)
    env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_DATA_DIR=str(data), JUPYTER_RUNTIME_DIR=str(runtime),
               JUPYTER_PATH=str(data), IPYTHONDIR=str(ipython), JUPYTER_PLATFORM_DIRS="0")
    env.pop("JUPYTER_CONFIG_PATH", None)
    return env


def _stop(process: subprocess.Popen) -> None:
    """Stop the server by its PID: SIGTERM (it shuts its kernels down), SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def jupyter_lab(tmp_path_factory):
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        skip_or_fail("jupyterlab is not installed in this environment")
    base = tmp_path_factory.mktemp("jupyter")
    root = base / "lab-root"
    shutil.copytree(NOTEBOOKS, root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    env = _prepare_home(base / "home")
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")             # JupyterLab refuses to run as root without it
    log = base / "jupyterlab.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = LabServer(f"http://127.0.0.1:{port}", token, root, process, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {process.returncode}:\n{server.log_tail()}")
            try:
                server.api("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer on port {port} in 120 s:\n{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        _stop(process)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, ARTIFACTS / "jupyterlab.log")


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        skip_or_fail("Chromium is not installed: `make browser-deps` (Debian/Ubuntu: apt-get install chromium), "
                     "or set LLMSYS_CHROMIUM to a Chromium/Chrome executable")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("the Python package playwright is not installed: `make setup` installs it")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
