"""The Triton mode is chosen before any kernel module is imported, in every entry point."""
import os
import subprocess
import sys

import pytest
import torch

CHECK = ("import os, {mod}; from llmsys_lab.kernels import softmax as s; "
         "print(os.environ.get('TRITON_INTERPRET'), type(s._softmax_kernel).__name__)")


def run_clean(mod: str, extra_env=None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", CHECK.format(mod=mod)], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("mod", ["llmsys_lab", "torch"])
def test_first_import_decides_the_mode(mod):
    """Importing the kernels (directly, or through llmsys_lab) switches to the interpreter
    on a CPU-only machine before the @triton.jit decorators run."""
    out = run_clean(mod)
    if torch.cuda.is_available():
        assert out == "None JITFunction"
    else:
        assert out == "1 InterpretedFunction"


def test_user_choice_is_kept():
    assert run_clean("llmsys_lab", {"TRITON_INTERPRET": "1"}).startswith("1 ")


def test_require_gpu_fails_loudly_without_one(monkeypatch):
    from llmsys_lab._runtime import require_gpu_if_asked

    monkeypatch.setenv("LLMSYS_REQUIRE_GPU", "1")
    if torch.cuda.is_available():
        require_gpu_if_asked()
    else:
        with pytest.raises(RuntimeError, match="LLMSYS_REQUIRE_GPU=1 but torch sees no CUDA device"):
            require_gpu_if_asked()
