#!/usr/bin/env python3
"""Create the kit's virtual environment and install everything into it.

Called by `make setup` (and so by `make lab` and `make test`). Uses only the standard
library, so it runs on a bare Python >= 3.10.

The one delicate step is PyTorch. A bare `pip install torch` on Linux pulls a CUDA
build with several GB of NVIDIA packages, which is wasted on a CPU-only laptop. So:

1. If the environment already has a torch that satisfies pyproject.toml, keep it.
2. If `LLMSYS_TORCH_SPEC` is set, install exactly that (e.g. "torch==2.5.1" or a path
   to a wheel); `LLMSYS_TORCH_INDEX` adds an index URL.
3. macOS and native Windows: PyPI's torch is the right build there (CPU, and Apple's MPS on
   macOS; PyPI has no CUDA build for Windows: use WSL2 for an NVIDIA GPU, or set
   LLMSYS_TORCH_INDEX to PyTorch's CUDA index). There is no nvidia-smi to ask on a Mac.
4. Linux with an NVIDIA GPU (nvidia-smi answers): torch from PyPI, a CUDA build.
5. Linux without one: prefer a CPU wheel already on disk (pip's find-links folders, the
   repository's `wheels/`), else PyTorch's CPU index, else PyPI as a last resort.

Last, the lessons' Jupyter kernel `llmsys-lab` is registered inside the environment
(`ipykernel install --sys-prefix`: <venv>/share/jupyter/kernels/llmsys-lab, running this
venv's Python), so `jupyter nbconvert --execute` and JupyterLab started from the venv find it
right after `make setup`, and two clones with two environments never overwrite each other's.

Then the package itself is installed in editable mode with its dependencies; the
torch chosen above already satisfies the `torch` requirement, so pip keeps it. Triton is
installed on Linux only (pyproject.toml's marker): PyPI has no Triton wheel for macOS or
Windows, and there the lessons show the PyTorch reference where a kernel would run.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_RANGE = "torch>=2.5,<3"


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


def local_cpu_torch_wheel(py: Path) -> Path | None:
    """Newest torch-*+cpu wheel on disk that this interpreter can install."""
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
                if m and (2, 5) <= tuple(map(int, m.groups()[:2])) < (3, 0):
                    candidates.append((tuple(map(int, m.groups())), whl))
    return max(candidates)[1] if candidates else None


def install_torch(py: Path) -> None:
    pip = [str(py), "-m", "pip", "install"]
    have = torch_version_in(py)
    if have:
        say(f"torch {have} already installed: keeping it")
        return
    spec = os.environ.get("LLMSYS_TORCH_SPEC")
    index = os.environ.get("LLMSYS_TORCH_INDEX")
    if spec or index:
        run(pip + [spec or TORCH_RANGE] + (["--index-url", index] if index else []))
        return
    kind = platform_kind()
    if kind != "linux":
        say(f"{kind}: installing torch from PyPI (its {kind} build); no Triton wheel exists here, "
            "so lessons show the PyTorch reference where a Triton kernel would run (python -m llmsys_lab doctor)")
        run(pip + [TORCH_RANGE])
        return
    if has_nvidia_gpu():
        say("NVIDIA GPU found: installing a CUDA build of torch from PyPI")
        run(pip + [TORCH_RANGE])
        return
    wheel = local_cpu_torch_wheel(py)
    if wheel:
        say(f"no GPU: installing the local CPU wheel {wheel.name}")
        run(pip + [str(wheel)])
        return
    say("no GPU and no local CPU wheel: trying PyTorch's CPU index")
    if run(pip + [TORCH_RANGE, "--index-url", CPU_INDEX], check=False).returncode != 0:
        say("the CPU index could not be reached: falling back to PyPI (a large CUDA build)")
        run(pip + [TORCH_RANGE])


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
    args = ap.parse_args()

    check_supported()
    venv = Path(args.venv)
    py = venv_python(venv)
    if not py.exists():
        say(f"creating virtual environment {venv}")
        run([args.python, "-m", "venv", str(venv)])
    install_torch(py)
    run([str(py), "-m", "pip", "install", "-e", f"{ROOT}[dev]"])
    run([str(py), "-c", smoke_imports()])
    run(kernel_command(py))
    say("environment ready: " + str(venv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
