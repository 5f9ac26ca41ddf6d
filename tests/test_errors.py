"""One error base: every exception class the kit defines derives from llmsys_lab.errors.LabError (and from the
built-in class callers expect, so `except ValueError` keeps working)."""
import importlib
import inspect
import pkgutil

import pytest

import llmsys_lab
from llmsys_lab.errors import LabError

SKIP = ("llmsys_lab.__main__",)   # runs the command line when imported


def kit_modules():
    for info in pkgutil.walk_packages(llmsys_lab.__path__, "llmsys_lab."):
        if info.name in SKIP:
            continue
        try:
            yield importlib.import_module(info.name)
        except ImportError as err:   # a Triton-only module on a machine without Triton: its errors are checked elsewhere
            if "triton" not in str(err).lower():
                raise


def test_every_kit_exception_derives_from_lab_error():
    classes = {}
    for module in kit_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                classes[f"{module.__name__}.{name}"] = obj
    assert len(classes) >= 15, sorted(classes)             # the scan found the kit's errors
    strays = sorted(n for n, c in classes.items() if not issubclass(c, LabError))
    assert not strays, f"exception classes outside the one base: {strays}"


@pytest.mark.parametrize("name, builtin", [("llmsys_lab.validate.ConfigError", ValueError),
                                           ("llmsys_lab.validate.ShapeError", ValueError),
                                           ("llmsys_lab.checks.CheckFailed", AssertionError),
                                           ("llmsys_lab.scheduler.SchedulerStalled", RuntimeError),
                                           ("llmsys_lab.parallel.launcher.RankTimeout", RuntimeError)])
def test_kit_errors_keep_their_builtin_class(name, builtin):
    module, _, cls = name.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), cls), builtin)
