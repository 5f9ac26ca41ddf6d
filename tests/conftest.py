"""Test-session set-up shared by unit tests and nbval.

The Triton mode is chosen before any kernel module is imported (interpreter on CPU),
exactly as `import llmsys_lab` does it in a notebook.
"""
from llmsys_lab._runtime import configure_triton, require_gpu_if_asked

configure_triton()
require_gpu_if_asked()

import os  # noqa: E402
from typing import NamedTuple  # noqa: E402

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


def _nbval_cell(item) -> bool:
    return type(item).__module__.startswith("nbval")


class NotebookRuns:
    """Hooks on nbval's lesson cells. They are a plugin registered in pytest_configure, not this conftest's own
    hooks: pytest calls a conftest's per-test hooks only for tests under its folder (tests/), and the lessons
    nbval runs are in notebooks/."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item):
        """nbval starts each lesson's kernel while setting up its first cell: start it in a plain
        environment, as JupyterLab does, so a lesson that defines a kernel before `import llmsys_lab`
        chooses the Triton mode fails here too, not only on students' machines."""
        if not _nbval_cell(item):
            yield
            return
        import time

        from nbpolicy import LESSON_RUNS

        LESSON_RUNS.setdefault(item.parent.path.resolve(), {"start": time.perf_counter(), "failed": False})
        saved = {k: os.environ.pop(k) for k in _NOT_IN_A_PLAIN_KERNEL if k in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        if _nbval_cell(item) and outcome.get_result().failed:
            from nbpolicy import LESSON_RUNS

            LESSON_RUNS.setdefault(item.parent.path.resolve(), {"start": None})["failed"] = True

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item, nextitem):
        """After a lesson's last cell, before nbval stops its kernel: ask the kernel for its CPU time, so
        tests/test_lesson_cpu_time.py reads this run instead of executing the lesson once more."""
        if _nbval_cell(item) and (nextitem is None or nextitem.parent is not item.parent):
            _probe_cpu_time(item)
        yield


def pytest_configure(config):
    config.pluginmanager.register(NotebookRuns(), "llmsys-notebook-runs")


def _probe_cpu_time(item) -> None:
    import time

    from nbpolicy import CPU_PROBE, LESSON_RUNS

    run = LESSON_RUNS.get(item.parent.path.resolve())
    kernel = getattr(item.parent, "kernel", None)
    if run is None or kernel is None or not kernel.is_alive():
        return
    try:
        msg_id = kernel.execute_cell_input(CPU_PROBE, allow_stdin=False)
        kernel.await_reply(msg_id, timeout=60)
        text = ""
        while True:
            msg = kernel.get_message("iopub", timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        run["cpu"] = float(text.split("CPU_SECONDS", 1)[1].split()[0])
        run["wall"] = time.perf_counter() - run["start"] if run.get("start") else None
    except Exception as exc:                    # no number: the CPU-time test executes the lesson itself
        run["probe_error"] = repr(exc)


def pytest_collection_modifyitems(config, items):
    """Markers nbval cannot set itself, and the CPU-time test after nbval's lesson runs (which it reads)."""
    for item in items:
        if _nbval_cell(item):
            item.add_marker(pytest.mark.notebook)
    late = [i for i in items if i.nodeid.startswith("tests/test_lesson_cpu_time.py::")]
    if late:
        ids = {id(i) for i in late}
        items[:] = [i for i in items if id(i) not in ids] + late


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- the bundled tiny model, shared by every test module ---------------------------------------------
# Loaded once per session. Tests only read it (generate, serve, hooks they remove again); a test that
# changes weights or modules works on its own copy (copy.deepcopy).
TINY_TEXTS = ["ROMEO.\n", "To be, or not", "KING.\nMy lords, I pray you", "HAMLET.\nWhat", "JULIET.\nO Romeo",
              "FIRST CITIZEN.\nWe are", "PORTIA.\nThe quality of mercy"]


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the bundled llmsys-tiny, on the CPU."""
    from llmsys_lab.model import load_tiny

    return load_tiny()


@pytest.fixture(scope="session")
def ktiny(tiny):
    """The tiny model where the paged kernel runs: compiled on a GPU, else (the same object as `tiny`) in the
    interpreter on a CPU (on a GPU machine Triton compiles for the GPU and cannot read CPU tensors)."""
    if not torch.cuda.is_available():
        return tiny
    from llmsys_lab.model import load_tiny

    return load_tiny(device="cuda")


@pytest.fixture(scope="session")
def tiny_prompts(tiny):
    """Token ids of TINY_TEXTS (seven prompts of 5 to 9 tokens)."""
    return [tiny[1](t).input_ids for t in TINY_TEXTS]


@pytest.fixture(scope="session")
def greedy():
    """greedy(model, prompt, n, **generate_kwargs) -> the new tokens `generate(model, [prompt], n, ...)` gives the
    prompt alone (greedy; generate's defaults, so it stops at token 0 unless eos_token_id says otherwise);
    memoised for the session, so every module that compares with generating alone pays for each once."""
    from llmsys_lab.generate import generate

    memo = {}

    def run(model, prompt, n, **kw):
        key = (id(model), tuple(prompt), n, tuple(sorted(kw.items())))
        if key not in memo:       # the model is kept in the entry, so its id is never reused by another
            memo[key] = (model, list(generate(model, [list(prompt)], n, **kw).new_tokens[0]))
        return list(memo[key][1])

    return run


# ---- the command line, in this process ------------------------------------------------------------
class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def cli():
    """cli(*argv) -> CliResult: `python -m llmsys_lab ARGV` run in this process (llmsys_lab.__main__.main, an
    argparse exit included), with what it printed. A new interpreter per call cost a second or two each; tests
    that are about a fresh process (imports, the installed wheel) start one themselves."""
    import contextlib
    import io

    from llmsys_lab.__main__ import main

    def run(*argv) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        return CliResult(code or 0, out.getvalue(), err.getvalue())

    return run


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs PyTorch on one intra-op thread. The kit's test models are tiny: one thread is fastest, and
    on a busy shared CPU much faster than several (generating 40 tokens with llmsys-tiny on 2 busy cores,
    measured: 0.05 s on one thread, 0.5 s on two). Notebook kernels and subprocesses keep PyTorch's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
