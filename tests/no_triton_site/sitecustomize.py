"""Makes this Python behave like a machine without Triton (macOS, native Windows).

tests/test_no_triton.py puts this folder on PYTHONPATH, so every interpreter started with that
environment (a subprocess, a Jupyter kernel started by nbclient) runs it at start-up: a finder at
the front of sys.meta_path refuses `triton` and every `triton.*` module.
"""
import sys


class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: emulating a machine without Triton)",
                                      name=name)
        return None


sys.meta_path.insert(0, _NoTriton())
