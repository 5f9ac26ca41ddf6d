"""The grading sandbox (llmsys_lab.grading.sandbox): what a submission's processes can and cannot do.

Each test runs real commands in a real bubblewrap sandbox and observes the effect from outside it.
"""
import os
import sys
import shutil
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from llmsys_lab.grading import sandbox

ROOT = Path(__file__).resolve().parent.parent
ok, why = sandbox.available()
needs_sandbox = pytest.mark.skipif(not ok and os.environ.get("LLMSYS_REQUIRE_SANDBOX") != "1",
                                   reason=f"no grading sandbox on this machine: {why}")


request_cleanup: list = []


@pytest.fixture(autouse=True)
def _cleanup():
    yield
    while request_cleanup:
        shutil.rmtree(request_cleanup.pop(), ignore_errors=True)


def py(code: str, tmp_path, **kwargs):
    return sandbox.run([sys.executable, "-c", code], work=tmp_path, **kwargs)


def _running(marker: str) -> list[str]:
    """Command lines of live processes (on the host) that contain marker."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                found.append(f"{proc.name}: {cmd}")
    return found


@needs_sandbox
def test_the_environment_and_the_kit_are_read_only_the_job_folder_is_writable(tmp_path):
    purelib = sysconfig.get_paths()["purelib"]
    code = (f"import os\n"
            f"for place in ({purelib!r}, {str(ROOT / 'llmsys_lab')!r}, {sys.prefix!r}):\n"
            "    try:\n"
            "        open(os.path.join(place, 'planted.pth'), 'w').write('import os')\n"
            "        print('WROTE', place)\n"
            "    except OSError as err:\n"
            "        print('refused', err.errno)\n"
            "open('answer.txt', 'w').write('42')\n")
    done = py(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "WROTE" not in done.stdout and done.stdout.count("refused") == 3, done.stdout
    assert not (Path(purelib) / "planted.pth").exists()
    assert (tmp_path / "answer.txt").read_text() == "42"


@needs_sandbox
def test_tmp_and_home_are_private_and_empty(tmp_path):
    marker = Path("/tmp") / f"host-secret-{uuid.uuid4().hex}"
    marker.write_text("secret")
    try:
        done = py(f"import os, pathlib\nprint(os.path.exists({str(marker)!r}), os.environ['HOME'], "
                  "sorted(os.listdir('/tmp')))\n"
                  "pathlib.Path('/tmp/filler').write_bytes(b'x' * 10_000_000)\n", tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[:2] == ["False", sandbox.HOME], done.stdout
        assert "host-secret" not in done.stdout
        assert not Path("/tmp/filler").exists()          # what it wrote to its /tmp is gone with it
    finally:
        marker.unlink()


@needs_sandbox
def test_hidden_folders_and_files_are_absent_even_through_a_directory_fd(tmp_path):
    kit = Path(tempfile.mkdtemp(prefix="llmsys-kit-", dir="/var/tmp"))     # outside /tmp, which is private anyway
    request_cleanup.append(kit)
    (kit / "solutions").mkdir(parents=True)
    (kit / "solutions" / "answer.ipynb").write_text("the solution")
    (kit / "reference.py").write_text("SECRET = 1\n")
    job = tmp_path / "job"
    job.mkdir()
    code = (f"import os\nfd = os.open({str(kit)!r}, os.O_RDONLY)\n"
            "print(os.listdir(os.path.join('/proc/self/fd', str(fd), 'solutions')))\n"
            "try:\n"
            "    print(os.read(os.open('solutions/answer.ipynb', os.O_RDONLY, dir_fd=fd), 100))\n"
            "except OSError as err:\n"
            "    print('refused', err.errno)\n"
            "try:\n"
            f"    print(repr(open({str(kit / 'reference.py')!r}).read()))\n"
            "except OSError as err:\n"
            "    print('refused', err.errno)\n"
            f"print(sorted(os.listdir({str(kit)!r})))\n")
    done = sandbox.run([sys.executable, "-c", code], work=job, hide=[kit / "solutions", kit / "reference.py"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == ["[]", "refused 2", "refused 13", "['reference.py', 'solutions']"], \
        done.stdout
    assert "the solution" not in done.stdout and "SECRET" not in done.stdout


@needs_sandbox
def test_no_network(tmp_path):
    code = ("import socket\nprint(sorted(n for _, n in socket.if_nameindex()))\n"
            "for host in (('1.1.1.1', 53), ('8.8.8.8', 443)):\n"
            "    try:\n"
            "        socket.create_connection(host, timeout=3)\n"
            "        print('CONNECTED')\n"
            "    except OSError as err:\n"
            "        print('refused')\n")
    done = py(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["['lo']", "refused", "refused"], done.stdout


@needs_sandbox
def test_every_process_it_started_dies_with_it(tmp_path):
    marker = f"{time.time_ns() % 10**6}.{os.getpid()}"
    code = ("import os, subprocess\n"
            f"subprocess.Popen(['setsid', 'sleep', '{marker}1'], start_new_session=True)\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execvp('sleep', ['sleep', '{marker}2'])\n"
            "    os._exit(0)\n"
            "print('started')\n")
    done = py(code, tmp_path)
    assert done.returncode == 0 and "started" in done.stdout, done.stderr
    time.sleep(0.5)
    assert _running(marker) == []


@needs_sandbox
def test_wall_time_limit_kills_the_whole_sandbox(tmp_path):
    marker = f"{time.time_ns() % 10**6}.{os.getpid()}"
    start = time.monotonic()
    done = sandbox.run(["sh", "-c", f"(setsid sleep {marker}3 &); sleep {marker}4"], work=tmp_path,
                       limits=sandbox.Limits(wall_s=2))
    assert done.timed_out and time.monotonic() - start < 30
    time.sleep(0.5)
    assert _running(marker) == []


@needs_sandbox
def test_memory_and_cpu_limits(tmp_path):
    done = py("import sys\ntry:\n    b = bytearray(3 << 30)\n    print('ALLOCATED')\nexcept MemoryError:\n"
              "    print('MemoryError')\n", tmp_path, limits=sandbox.Limits(memory=1 << 30))
    assert done.stdout.strip() == "MemoryError", (done.stdout, done.stderr)
    start = time.monotonic()
    done = py("while True:\n    pass\n", tmp_path, limits=sandbox.Limits(cpu_s=1, wall_s=60))
    assert done.returncode != 0 and not done.timed_out and time.monotonic() - start < 30


def test_limits_refuse_nonsense():
    for bad in (0, -1, float("nan"), "10", True):
        with pytest.raises(ValueError, match="wall_s must be a positive number"):
            sandbox.Limits(wall_s=bad)
    with pytest.raises(ValueError, match="memory must be a positive number"):
        sandbox.Limits(memory=0)


def test_a_missing_bubblewrap_is_reported(monkeypatch):
    monkeypatch.setenv("LLMSYS_BWRAP", "/nonexistent/bwrap")
    ok, why = sandbox.available()
    assert not ok and "/nonexistent/bwrap" in why
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.run(["true"])


def _one_test_notebook(path: Path) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    cell = new_code_cell("assert 1 + 1 == 2")
    cell.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "grade_id": "t_ok", "points": 2,
                                 "schema_version": 3}
    nbformat.write(new_notebook(cells=[cell]), path)
    return path


@pytest.mark.notebook
def test_without_the_sandbox_the_grader_refuses_unless_unsafe_and_then_labels_every_result(tmp_path, monkeypatch,
                                                                                          capsys):
    import json

    from llmsys_lab import grading
    from llmsys_lab.__main__ import main

    monkeypatch.setenv("LLMSYS_BWRAP", "/nonexistent/bwrap")
    path = _one_test_notebook(tmp_path / "sub.ipynb")
    assert main(["grade", str(path), "--no-source", "--timeout", "60"]) == 2
    err = capsys.readouterr().err
    assert "the grading sandbox cannot run on this machine" in err and "--unsafe" in err
    [refused] = grading.grade([path], source=None, timeout=60)
    assert refused.error and "grading refused" in refused.error and refused.score == 0

    assert main(["grade", str(path), "--no-source", "--timeout", "60", "--unsafe"]) == 0
    out, err = capsys.readouterr()
    assert "UNSAFE: NOT AN OFFICIAL GRADE" in out and "WITHOUT the sandbox" in err
    assert main(["grade", str(path), "--no-source", "--timeout", "60", "--unsafe", "--json", "-"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["score"] == 2 and result["official"] is False and result["messages"][0] == grading.UNSAFE


@needs_sandbox
def test_an_environment_under_tmp_is_bound_back_read_only_and_its_solutions_stay_hidden(tmp_path, monkeypatch):
    """CI clones the kit and makes its venv wherever it likes, /tmp included: the private /tmp must not
    hide the environment (the run would fail to start), nor uncover solutions/ inside such a clone."""
    clone = tmp_path / "clone"
    (clone / "kitlike").mkdir(parents=True)
    (clone / "kitlike" / "__init__.py").write_text("ANSWER = 42\n")
    (clone / "solutions").mkdir()
    (clone / "solutions" / "secret.txt").write_text("the answers")
    job = tmp_path / "job"
    job.mkdir()
    assert Path("/tmp").resolve() in clone.resolve().parents
    monkeypatch.setenv("PYTHONPATH", str(clone))
    assert clone.resolve() in sandbox.visible_under_tmp()
    code = ("import os, kitlike\n"
            "print('imported', kitlike.ANSWER)\n"
            f"print('solutions', os.listdir({str(clone / 'solutions')!r}))\n"
            "try:\n"
            f"    open({str(clone / 'kitlike' / 'planted.py')!r}, 'w').write('x = 1')\n"
            "    print('WROTE')\n"
            "except OSError as err:\n"
            "    print('refused', err.errno)\n")
    done = sandbox.run([sys.executable, "-c", code], work=job, hide=[clone / "solutions"],
                       env={"PYTHONPATH": str(clone)})
    assert done.returncode == 0, done.stderr
    assert "imported 42" in done.stdout and "solutions []" in done.stdout, done.stdout
    assert "refused" in done.stdout and "WROTE" not in done.stdout, done.stdout
    assert not (clone / "kitlike" / "planted.py").exists()
