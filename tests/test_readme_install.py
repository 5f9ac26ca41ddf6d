"""Every install line in the README's set-up sections works, or says why it cannot be run here.

The set-up sections lie between each `<!-- setup:start` and the next `<!-- setup:end -->`. Each ```bash block there is
preceded by `<!-- install-check: ... -->`, naming the test below that runs that block's commands (taken
from the README itself, so an edited line is the line tested) or saying why it is not testable here
(Colab, macOS, Windows, a GPU). No line may install the kit by a package-index name: nobody in this
project owns `llmsys-lab` on an index, so such a line would install whatever a stranger publishes.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from test_packaging import fresh_venv

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAKE = shutil.which("make")


def setup_text() -> str:
    parts = re.findall(r"<!-- setup:start.*?<!-- setup:end -->", README, re.S)
    assert len(parts) == README.count("<!-- setup:start") == README.count("<!-- setup:end -->") >= 2, parts
    return "\n".join(parts)


def blocks() -> list[tuple[str, str]]:
    """(install-check note, commands) for each ```bash block of the set-up sections."""
    found = []
    text = setup_text()
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        before = text[:m.start()].rstrip("\n").splitlines()
        note = before[-1] if before else ""
        check = re.fullmatch(r"<!-- install-check: (.+) -->", note.strip())
        found.append((check.group(1) if check else "", m.group(1)))
    return found


def block_naming(test_name: str) -> str:
    (cmds,) = [c for note, c in blocks() if f"::{test_name}" in note]
    return cmds


def commands(block: str) -> list[str]:
    """The block's command lines without comments."""
    out = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


def test_every_setup_block_is_run_by_a_test_or_says_why():
    found = blocks()
    assert len(found) >= 7, found
    tests_here = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M))
    for note, cmds in found:
        assert note, f"this README set-up block has no <!-- install-check: ... --> line above it:\n{cmds}"
        named = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", note)
        if named:
            for file, name in named:
                source = (ROOT / "tests" / file).read_text()
                assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"
                if file == Path(__file__).name:
                    assert name in tests_here
        else:
            assert note.startswith("not testable"), note
            assert len(note.split(":", 1)[1].strip()) > 15, f"say why it cannot be tested: {note}"


def test_no_line_installs_the_kit_by_an_index_name():
    """`pip install llmsys-lab` (no `@ git+...`, no path) would take whatever the index serves under that name."""
    bare = re.compile(r"pip install\s+(-\S+\s+)*[\"']?llmsys[-_]lab(\[[^\]]*\])?(?!\s*@)[\"']?(\s|$|`)")
    places = [ROOT / "README.md", *ROOT.glob("*/README.md"), *ROOT.glob("notebooks/*.ipynb"),
              *ROOT.glob("solutions/*/*.ipynb"), *ROOT.glob("assignments/*/*.ipynb"), *ROOT.glob("scripts/*.py"),
              *ROOT.glob("llmsys_lab/**/*.py")]
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in places for m in bare.finditer(p.read_text())]
    assert not offenders, offenders
    # the pattern does catch the line it is meant to catch
    assert bare.search("`pip install llmsys-lab` installs") and not bare.search('pip install "llmsys-lab @ git+x"')


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README))
    for _, cmds in blocks():
        named |= {c.split()[1] for c in commands(cmds) if c.startswith("make ")}
    assert named and not named - targets, sorted(named - targets)


def _make_vars() -> list[str]:
    """Run a README `make` line against this test's environment (its set-up stamp is not remade)."""
    venv = Path(sys.prefix)
    return [f"VENV={venv}", f"PYTHON={sys.executable}", "-o", str(venv / ".llmsys-installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_lab_opens_jupyterlab_on_the_lessons(tmp_path):
    (lab,) = [c for c in commands(block_naming("test_make_lab_opens_jupyterlab_on_the_lessons")) if c == "make lab"]
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "BROWSER": "true"}
    env.pop("TRITON_INTERPRET", None)
    log = open(tmp_path / "lab.log", "w+")
    proc = subprocess.Popen(shlex.split(lab) + _make_vars() + [f"PORT={port}"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        token, deadline = None, time.time() + 240
        while time.time() < deadline and token is None and proc.poll() is None:
            time.sleep(1)
            m = re.search(rf"http://(?:127\.0\.0\.1|localhost):{port}/lab\?token=(\w+)", (tmp_path / "lab.log").read_text())
            token = m.group(1) if m else None
        assert token, "JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-4000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token={token}", timeout=30) as r:
            listing = r.read().decode()
        assert "00_setup_and_orientation.ipynb" in listing and "01_attention.ipynb" in listing, listing[:2000]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token={token}", timeout=30) as r:
            assert "llmsys-lab" in r.read().decode(), "make lab must register the kit's kernel"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def _pip_line(line: str, py: Path, *extra: str) -> list[str]:
    """A README `pip install ...` line run by the fresh venv's interpreter through this environment's pip,
    offline (the dependencies are already visible to it)."""
    args = shlex.split(line)
    assert args[:2] == ["pip", "install"], line
    return [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", *extra, *args[2:]]


def _imports_from_venv(py: Path, where: Path) -> str:
    out = subprocess.run([str(py), "-c", "import llmsys_lab, llmsys_lab.kernels.softmax; print(llmsys_lab.__file__)"],
                         cwd=where, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_wheel_lines_build_and_install_the_kit(tmp_path):
    make_line, pip_line = commands(block_naming("test_wheel_lines_build_and_install_the_kit"))
    assert make_line == "make wheel"
    from test_environment import pyproject
    version = pyproject()["project"]["version"]
    assert f"llmsys_lab-{version}-py3-none-any.whl" in pip_line, "the README's wheel name must be this version's"
    dist = ROOT / "dist"
    built = subprocess.run(shlex.split(make_line) + _make_vars(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = dist / f"llmsys_lab-{version}-py3-none-any.whl"
    assert wheel.exists() and "llmsys_lab/kernels/softmax.py" in zipfile.ZipFile(wheel).namelist()
    py = fresh_venv(tmp_path)
    inst = subprocess.run(_pip_line(pip_line, py), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    where = tmp_path / "elsewhere"
    where.mkdir()
    assert str(tmp_path / "venv") in _imports_from_venv(py, where)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_line_installs_the_kit_at_a_tag(tmp_path):
    (line,) = commands(block_naming("test_git_line_installs_the_kit_at_a_tag"))
    m = re.search(r"git\+(https://github\.com/<owner>/llmsys-lab)@(v[\d.]+)", line)
    assert m, line
    from test_environment import pyproject
    assert m.group(2) == "v" + pyproject()["project"]["version"]
    # the same line against a clone of this repository with the tag (offline; GitHub is not reachable here)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "tag", "-f", m.group(2)], check=True, capture_output=True)
    # file://localhost/...: pip's requirement parser wants a host in a git+ URL; git takes localhost
    local = line.replace(m.group(1), "file://localhost" + clone.as_posix())
    py = fresh_venv(tmp_path)
    inst = subprocess.run(_pip_line(local, py, "--no-build-isolation"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    where = tmp_path / "elsewhere"
    where.mkdir()
    assert str(tmp_path / "venv") in _imports_from_venv(py, where)


def test_make_colab_refuses_the_placeholder_and_writes_a_forks_links(tmp_path):
    (line,) = commands(block_naming("test_make_colab_refuses_the_placeholder_and_writes_a_forks_links"))
    assert line == "make colab"
    if MAKE:
        dry = subprocess.run([MAKE, "-n", "colab", *_make_vars()], cwd=ROOT, capture_output=True, text=True)
        assert "scripts/colab.py" in dry.stdout and "--allow-placeholder" not in dry.stdout, dry.stdout
        dry = subprocess.run([MAKE, "-n", "colab", "ALLOW_PLACEHOLDER=1", *_make_vars()], cwd=ROOT,
                             capture_output=True, text=True)
        assert "scripts/colab.py --allow-placeholder" in dry.stdout, dry.stdout
    import importlib.util
    spec = importlib.util.spec_from_file_location("colab_for_readme", ROOT / "scripts/colab.py")
    colab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colab)
    for part in ("notebooks", "solutions"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("lesson_exercises"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert colab.PLACEHOLDER in pyproject
    (tmp_path / "pyproject.toml").write_text(pyproject)
    with pytest.raises(SystemExit, match="still the placeholder"):
        colab.main(["--root", str(tmp_path)])
    assert colab.main(["--root", str(tmp_path), "--check"]) == 0       # checking is not writing
    (tmp_path / "pyproject.toml").write_text(pyproject.replace(colab.PLACEHOLDER, "https://github.com/a-teacher/llmsys-fork"))
    assert colab.main(["--root", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "github/a-teacher/llmsys-fork/blob/v" in readme and "github/llmsys-lab/llmsys-lab/blob" not in readme
    first = (tmp_path / "notebooks" / "01_attention.ipynb").read_text()
    assert "git+https://github.com/a-teacher/llmsys-fork@v" in first


@pytest.mark.slow
@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_wheelhouse_line_downloads_the_locked_versions(tmp_path):
    (line,) = [c for c in commands(block_naming("test_wheelhouse_line_downloads_the_locked_versions"))
               if c.startswith("make wheelhouse")]
    house = tmp_path / "wheelhouse"
    out = subprocess.run(shlex.split(line) + [f"WHEELHOUSE={house}", f"PYTHON={sys.executable}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from packaging.utils import parse_wheel_filename
    from test_environment import lock_entries
    locked = {(n, str(v)) for n, v, _, _ in lock_entries()}
    wheels = sorted(house.glob("*.whl"))
    assert len(wheels) > 20, wheels
    for w in wheels:
        name, version, *_ = parse_wheel_filename(w.name)
        assert (str(name), str(version)) in locked, f"{w.name} is not the lock's version of {name}"
    names = {str(parse_wheel_filename(w.name)[0]) for w in wheels}
    assert {"nbval", "ipykernel", "ipywidgets", "nbclient"} <= names
