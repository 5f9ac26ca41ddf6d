"""Test-session set-up shared by unit tests and nbval.

The Triton mode is chosen before any kernel module is imported (interpreter on CPU),
exactly as `import llmsys_lab` does it in a notebook.
"""
from llmsys_lab._runtime import configure_triton, require_gpu_if_asked

configure_triton()
require_gpu_if_asked()

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


try:                                       # property-based tests: how hard Hypothesis searches
    import os

    from hypothesis import HealthCheck, settings

    # ci: a fixed search (derandomized: the same examples on every run, no flakes), ~15 s in all
    settings.register_profile("ci", max_examples=40, stateful_step_count=40, deadline=None, derandomize=True,
                              database=None, suppress_health_check=[HealthCheck.too_slow])
    # stress (make test-stress): a long random search; failures are remembered in .hypothesis/ and replayed first
    settings.register_profile("stress", max_examples=2000, stateful_step_count=100, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:                        # only tests/test_properties.py needs it (the dev extra)
    pass


# Variables the test process sets for itself that a student's JupyterLab kernel would not have.
_NOT_IN_A_PLAIN_KERNEL = ("TRITON_INTERPRET",)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """nbval starts each lesson's kernel while setting up its first cell: start it in a plain
    environment, as JupyterLab does, so a lesson that defines a kernel before `import llmsys_lab`
    chooses the Triton mode fails here too, not only on students' machines."""
    if type(item).__module__.startswith("nbval"):
        saved = {k: os.environ.pop(k) for k in _NOT_IN_A_PLAIN_KERNEL if k in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)
    else:
        yield


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_terminal_summary(terminalreporter):
    """Show how many stored notebook outputs nbval compares and how many it ignores."""
    try:
        import nbval  # noqa: F401  (the counting uses nbval's own marker rules)
    except ImportError:
        return
    from nbpolicy import format_counts, lesson_notebooks, output_counts

    rows = [output_counts(p) for p in lesson_notebooks()]
    if rows:
        terminalreporter.section("notebook outputs: compared vs ignored")
        terminalreporter.write_line(format_counts(rows))


def _load_benchmark_module():
    """benchmarks/ is not a package: expose training_memory.py's model list to the tests."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "training_memory.py"
    spec = importlib.util.spec_from_file_location("benchmarks_training_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["benchmarks_training_memory"] = module


_load_benchmark_module()
