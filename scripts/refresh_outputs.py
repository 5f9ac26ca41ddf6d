#!/usr/bin/env python3
"""Re-execute lesson notebooks in place so their stored outputs become the new reference.

Run it on a GPU (``make refresh-outputs``): the stored outputs are the ones self-learners
read and the ones nbval compares on every machine. Each notebook runs top to bottom in a
fresh kernel of *this* Python (so the GPU node's torch is used), with its widget state
stored; a cell that raises stops the run and the notebook file is left untouched.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KERNEL_SPEC = {"name": "llmsys-lab", "display_name": "Python (llmsys-lab)", "language": "python"}


def provenance() -> dict:
    """Where the stored outputs came from; tests/test_notebook_policy.py checks it says a GPU."""
    import platform

    import torch
    import transformers
    import triton

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"device": "cuda" if gpu else "cpu", "gpu": gpu, "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def refresh(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    nb.metadata["kernelspec"] = KERNEL_SPEC   # students' JupyterLab picks the kit's kernel
    nb.metadata["llmsys_lab"] = {"reference_run": provenance()}
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="refresh on a machine without a GPU (outputs then differ from the GPU reference)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA GPU: stored outputs must come from a GPU run (pass --allow-cpu to override)")
        return 2
    os.environ.setdefault("PYTHONHASHSEED", "0")
    for path in args.notebooks:
        print(f"executing {path} ...", flush=True)
        print(f"  done in {refresh(path, args.timeout):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
