#!/usr/bin/env python3
"""Create the kit's virtual environment and install everything into it.

Called by `make setup` (and so by `make lab` and `make test`). Uses only the standard
library, so it runs on a bare Python >= 3.10.

The one delicate step is PyTorch. A bare `pip install torch` on Linux pulls a CUDA
build with several GB of NVIDIA packages, which is wasted on a CPU-only laptop. So:

1. If the environment already has a torch that satisfies pyproject.toml, keep it.
2. If `LLMSYS_TORCH_SPEC` is set, install exactly that (e.g. "torch==2.5.1" or a path
   to a wheel); `LLMSYS_TORCH_INDEX` adds an index URL.
3. With an NVIDIA GPU (nvidia-smi answers), install torch from PyPI: a CUDA build.
4. Without one, prefer a CPU wheel already on disk (pip's find-links folders, the
   repository's `wheels/`), else PyTorch's CPU index, else PyPI as a last resort.

Then the package itself is installed in editable mode with its dependencies; the
torch chosen above already satisfies the `torch` requirement, so pip keeps it.
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


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


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
    if spec:
        index = os.environ.get("LLMSYS_TORCH_INDEX")
        run(pip + [spec] + (["--index-url", index] if index else []))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=str(ROOT / ".venv"))
    ap.add_argument("--python", default=sys.executable, help="interpreter that creates the venv")
    args = ap.parse_args()

    venv = Path(args.venv)
    py = venv_python(venv)
    if not py.exists():
        say(f"creating virtual environment {venv}")
        run([args.python, "-m", "venv", str(venv)])
    install_torch(py)
    run([str(py), "-m", "pip", "install", "-e", f"{ROOT}[dev]"])
    run([str(py), "-c", "import torch, triton, transformers, nbval, ipywidgets, llmsys_lab.kernels"])
    say("environment ready: " + str(venv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
