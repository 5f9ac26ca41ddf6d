#!/usr/bin/env python3
"""Create the kit's virtual environment and install the term's lock into it.

Called by `make setup` (and so by `make lab`, `make test` and `.ci/run`). Uses only the standard
library, so it runs on a bare Python >= 3.10.

Everything comes from `requirements.lock` (exact versions with hashes, written by `make lock` with
uv's universal resolver; see scripts/lock.py): `pip install --require-hashes --no-deps -r
requirements.lock`, then the kit itself, editable, without dependencies. A registry update cannot
change what a term installs. `--latest` (`make test-latest`) builds a separate environment from the
newest versions pyproject.toml allows instead: the canary to run before refreshing the lock.

The one delicate step is PyTorch, installed first at the lock's version. A bare `pip install torch`
on Linux pulls a CUDA build with several GB of NVIDIA packages, which is wasted on a CPU-only laptop. So:

1. If the environment already has the locked torch release (any build: CPU or CUDA), keep it.
2. If `LLMSYS_TORCH_SPEC` is set, install exactly that (e.g. "torch==2.13.0" or a path to a wheel);
   `LLMSYS_TORCH_INDEX` adds an index URL (PyTorch's CUDA index on Windows, say).
3. macOS and native Windows: nothing here; the lock's own torch line (PyPI's build for that platform:
   CPU, and Apple's MPS on macOS) is installed with the rest, hash-checked.
4. Linux with an NVIDIA GPU (nvidia-smi answers): the locked release from PyPI, a CUDA build (it
   brings the CUDA runtime packages it names; the lock leaves those out, scripts/lock.py says why).
5. Linux without one: the locked release's CPU build, from a wheel already on disk (pip's find-links
   folders, the repository's `wheels/`), else PyTorch's CPU index, else PyPI as a last resort.

Triton is installed on Linux only (the lock's marker): PyPI has no Triton wheel for macOS or Windows,
and there the lessons show the PyTorch reference where a kernel would run.

Last, the lessons' Jupyter kernel `llmsys-lab` is registered inside the environment
(`ipykernel install --sys-prefix`: <venv>/share/jupyter/kernels/llmsys-lab, running this
venv's Python), so `jupyter nbconvert --execute` and JupyterLab started from the venv find it
right after `make setup`, and two clones with two environments never overwrite each other's.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_RANGE = "torch>=2.5,<3"          # = pyproject.toml's torch requirement (tests/test_environment.py)


def locked_torch(lock: Path = LOCK) -> str:
    """The lock's torch release, e.g. '2.13.0' (one line, no marker: the same release everywhere)."""
    found = re.findall(r"^torch==([0-9][^ ;\\]*)\s*(;.*)?\\?$", lock.read_text(), re.M)
    if len(found) != 1 or found[0][1]:
        raise SystemExit(f"[setup] {lock.name} must pin torch once, with no marker (found {found}): run `make lock`")
    return found[0][0]


def base_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0'."""
    return version.split("+")[0]


def say(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=check)


def venv_python(venv: Path, windows: bool | None = None) -> Path:
    """The interpreter of a virtual environment: Scripts\\python.exe on Windows, bin/python elsewhere."""
    windows = os.name == "nt" if windows is None else windows
    return venv / ("Scripts/python.exe" if windows else "bin/python")


def platform_kind(platform: str | None = None) -> str:
    """'linux', 'macos' or 'windows' (sys.platform by default); WSL2 reports linux."""
    platform = sys.platform if platform is None else platform
    if platform.startswith("linux"):
        return "linux"
    if platform == "darwin":
        return "macos"
    if platform in ("win32", "cygwin"):
        return "windows"
    raise SystemExit(f"[setup] unsupported platform {platform!r}: the kit runs on Linux, macOS and Windows")


INTEL_MAC = ("this is an Intel Mac: PyTorch publishes no macOS x86_64 wheel after torch 2.2 and the kit needs "
             "torch>=2.5. Use Google Colab (the lessons' \"Open in Colab\" badges) or a Linux machine.")


def check_supported(platform: str | None = None, machine: str | None = None) -> None:
    """Stop early, with the way out, where torch itself cannot be installed."""
    import platform as _platform

    machine = (machine or _platform.machine()).lower()
    if platform_kind(platform) == "macos" and machine in ("x86_64", "amd64", "i386"):
        raise SystemExit(f"[setup] {INTEL_MAC}")


def has_triton_wheel(platform: str | None = None) -> bool:
    """PyPI publishes Triton wheels for Linux (x86_64 and aarch64) only."""
    return platform_kind(platform) == "linux"


def smoke_imports(platform: str | None = None) -> str:
    """What must import once the environment is ready (triton only where it can be installed).

    The kit first: `import llmsys_lab` chooses the Triton mode (the interpreter without a GPU), which
    must happen before `triton.language` is imported (the kit refuses otherwise)."""
    mods = ["llmsys_lab", "torch", "transformers", "nbval", "ipywidgets", "llmsys_lab.kernels"]
    if has_triton_wheel(platform):
        mods.insert(2, "triton")
    return "import " + ", ".join(mods)


def has_nvidia_gpu() -> bool:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def torch_version_in(py: Path) -> str | None:
    out = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def find_links_dirs(py: Path) -> list[Path]:
    """Folders pip is configured to search (PIP_FIND_LINKS, pip config), plus wheels/."""
    dirs: list[str] = []
    dirs += os.environ.get("PIP_FIND_LINKS", "").split()
    out = subprocess.run([str(py), "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith("find-links"):
            dirs += value.strip().strip("'\"").split()
    dirs.append(str(ROOT / "wheels"))
    seen, result = set(), []
    for d in dirs:
        d = d.removeprefix("file://")
        p = Path(d)
        if p.is_dir() and p not in seen:
            seen.add(p)
            result.append(p)
    return result


def local_cpu_torch_wheel(py: Path, version: str | None = None) -> Path | None:
    """The torch-<version>+cpu wheel on disk that this interpreter can install (the newest one
    within pyproject's range when no version is given)."""
    tag = subprocess.run(
        [str(py), "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
        capture_output=True, text=True, check=True).stdout.strip()
    machine = sysconfig.get_platform().split("-")[-1]  # e.g. x86_64
    candidates = []
    for d in find_links_dirs(py):
        for whl in d.glob("torch-*+cpu-*.whl"):
            name = whl.name
            if f"-{tag}-" in name and machine in name:
                m = re.match(r"torch-(\d+)\.(\d+)\.(\d+)", name)
                if not m:
                    continue
                if version is not None and ".".join(m.groups()) != version:
                    continue
                if (2, 5) <= tuple(map(int, m.groups()[:2])) < (3, 0):
                    candidates.append((tuple(map(int, m.groups())), whl))
    return max(candidates)[1] if candidates else None


def install_torch(py: Path, latest: bool = False) -> None:
    """Install torch the way this machine needs (see the module docstring); `latest`: the newest in range."""
    pip = [str(py), "-m", "pip", "install"]
    want = None if latest else locked_torch()
    spec = TORCH_RANGE if latest else f"torch=={want}"
    have = torch_version_in(py)
    if have and (latest or base_version(have) == want):
        say(f"torch {have} already installed: keeping it")
        return
    if have:
        say(f"torch {have} is installed but the lock says {want}: installing {want}")
    env_spec = os.environ.get("LLMSYS_TORCH_SPEC")
    index = os.environ.get("LLMSYS_TORCH_INDEX")
    if env_spec or index:
        run(pip + [env_spec or spec] + (["--index-url", index] if index else []))
        return
    kind = platform_kind()
    if kind != "linux":
        say(f"{kind}: torch comes from PyPI (its {kind} build) with the rest; no Triton wheel exists here, "
            "so lessons show the PyTorch reference where a Triton kernel would run (python -m llmsys_lab doctor)")
        if latest:
            run(pip + [spec])
        return
    if has_nvidia_gpu():
        say(f"NVIDIA GPU found: installing a CUDA build of {spec} from PyPI")
        run(pip + [spec])
        return
    # The CPU build's own dependencies (filelock, sympy, ...) come from the lock, at its versions.
    no_deps = [] if latest else ["--no-deps"]
    wheel = local_cpu_torch_wheel(py, want)
    if wheel:
        say(f"no GPU: installing the local CPU wheel {wheel.name}")
        run(pip + no_deps + [str(wheel)])
        return
    say("no GPU and no local CPU wheel: trying PyTorch's CPU index")
    if run(pip + no_deps + [spec, "--index-url", CPU_INDEX], check=False).returncode != 0:
        say("the CPU index could not be reached: falling back to PyPI (a large CUDA build)")
        run(pip + [spec])


def install_locked(py: Path) -> None:
    """The lock, hash-checked, nothing else; then the kit, editable, without dependencies."""
    pip = [str(py), "-m", "pip"]
    run(pip + ["install", "--require-hashes", "--no-deps", "-r", str(LOCK)])
    run(pip + ["install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    run(pip + ["check"])


def install_latest(py: Path) -> None:
    """The newest versions pyproject.toml allows (torch stays the build installed above)."""
    torch = torch_version_in(py)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={torch}\n")
    try:
        run([str(py), "-m", "pip", "install", "--upgrade", "--upgrade-strategy", "eager", "-c", f.name,
             "-e", f"{ROOT}[dev]"])
    finally:
        os.unlink(f.name)
    out = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                         capture_output=True, text=True)
    (Path(py).parent.parent / "resolved.txt").write_text(out.stdout)
    say("resolved (newest allowed): " + ", ".join(l for l in out.stdout.split()
                                                  if l.split("==")[0].lower() in KEY_PACKAGES))


KEY_PACKAGES = {"torch", "triton", "transformers", "kernels", "numpy", "jupyterlab", "nbgrader", "nbval",
                "ipywidgets", "matplotlib"}


KERNEL_NAME = "llmsys-lab"                  # the kernelspec name every lesson and assignment names


def kernel_command(py: Path, prefix: Path | None = None) -> list[str]:
    """Register the lessons' kernel for this environment only: --sys-prefix puts it in the venv
    (<venv>/share/jupyter/kernels/llmsys-lab), never in the user-wide folder another clone shares."""
    where = ["--prefix", str(prefix)] if prefix is not None else ["--sys-prefix"]
    return [str(py), "-m", "ipykernel", "install", *where, "--name", KERNEL_NAME,
            "--display-name", "Python (llmsys-lab)"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=str(ROOT / ".venv"))
    ap.add_argument("--python", default=sys.executable, help="interpreter that creates the venv")
    ap.add_argument("--latest", action="store_true",
                    help="the newest versions pyproject.toml allows instead of the lock (make test-latest)")
    args = ap.parse_args()

    check_supported()
    venv = Path(args.venv)
    py = venv_python(venv)
    if not py.exists():
        say(f"creating virtual environment {venv}")
        run([args.python, "-m", "venv", str(venv)])
    install_torch(py, latest=args.latest)
    if args.latest:
        install_latest(py)
    else:
        install_locked(py)
    run([str(py), "-c", smoke_imports()])
    run(kernel_command(py))
    say("environment ready: " + str(venv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
