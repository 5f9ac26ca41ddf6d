"""Shared by the benchmark scripts: where results are saved, and the hardware they came from."""
from __future__ import annotations

import json
import platform
from pathlib import Path


def fingerprint(**extra) -> dict:
    """GPU, library versions and Python: stored with every result so numbers are never orphaned."""
    import torch
    import transformers
    import triton

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), **extra}


def save_results(path: Path, payload: dict, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"hardware": fingerprint(**extra), **payload}, indent=1, default=str))
    print(f"saved {path}")
