"""Shared by the benchmark scripts and the lessons: where results are saved, the hardware they
came from, and how a lesson reads them back.

The stored results (benchmarks/results/*.json, measured on an H200) travel inside the package as
``llmsys_lab/results/`` (setup.py maps the folder), so a lesson reads them with ``load_results``
the same way from a source checkout and from an installed wheel (Colab, ``pip install``).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path


def fingerprint(**extra) -> dict:
    """GPU, library versions and Python: stored with every result so numbers are never orphaned."""
    import torch
    import transformers

    from ._runtime import triton_available

    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "transformers": transformers.__version__, "python": platform.python_version(), **extra}


def save_results(path: Path, payload: dict, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"hardware": fingerprint(**extra), **payload}, indent=1, default=str))
    print(f"saved {path}")


def results_dir() -> Path:
    """Where the stored benchmark results are: inside the installed package (a wheel), else
    benchmarks/results/ of the source checkout (an editable install)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "results", here.parent / "benchmarks" / "results"):
        if folder.is_dir() and any(folder.glob("*.json")):
            return folder
    raise FileNotFoundError(f"no stored benchmark results next to {here}: reinstall llmsys-lab")


def load_results(name: str) -> dict:
    """The stored results of one benchmark, e.g. load_results("paged_attention")."""
    folder = results_dir()
    path = folder / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.json"))
        raise FileNotFoundError(f"no stored results named {name!r} in {folder}; known: {', '.join(known)}")
    return json.loads(path.read_text())
