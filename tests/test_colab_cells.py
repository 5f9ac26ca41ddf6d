"""Every lesson and assignment opens on Google Colab: a badge, and a first code cell that installs the kit there.

scripts/colab.py writes both (and the README's table); `python scripts/colab.py --check` is the same
check as the first test. The cell must be silent and harmless anywhere but Colab.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("colab", ROOT / "scripts/colab.py")
colab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(colab)
REPO, VERSION = colab.project()
NOTEBOOKS = colab.notebooks() + sorted((ROOT / "assignments").glob("*/*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_has_the_badge_and_the_setup_cell(path):
    nb = nbformat.read(path, as_version=4)
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("assignments/"):
        rel = "solutions/" + rel.removeprefix("assignments/")      # generated from the solution
    badge, first_code = nb.cells[0], next(c for c in nb.cells if c.cell_type == "code")
    assert badge.get("id") == colab.BADGE_ID and badge.source == colab.badge_source(REPO, VERSION, rel)
    assert first_code.source.startswith(colab.setup_source(REPO, VERSION))
    assert "import llmsys_lab" in colab.without_setup(first_code.source)


def test_readme_links_every_notebook():
    text = (ROOT / "README.md").read_text()
    assert colab.readme_table(REPO, VERSION, colab.notebooks()) in text


def test_badge_links_the_notebook_at_the_version_tag():
    assert colab.badge_source("https://github.com/o/r", "1.2.3", "solutions/01_a/a.ipynb") == (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        "(https://colab.research.google.com/github/o/r/blob/v1.2.3/assignments/01_a/a.ipynb)")
    assert "git+https://github.com/o/r@v1.2.3" in colab.setup_source("https://github.com/o/r", "1.2.3")


def test_setup_cell_is_silent_off_colab_and_installs_on_colab(tmp_path):
    """Off Colab: no output, no pip. On Colab (a `google.colab` module present): pip is asked for the
    kit at the version tag; `pip` here is a recorder placed first on the path (nothing is installed)."""
    code = colab.setup_source("https://github.com/o/r", "1.2.3")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert off.returncode == 0 and off.stdout == "" and off.stderr == "", off.stderr
    fake = tmp_path / "fake"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "colab" / "__init__.py").write_text("")
    (fake / "pip").mkdir()
    (fake / "pip" / "__init__.py").write_text("")
    (fake / "pip" / "__main__.py").write_text("import sys; print('PIP', *sys.argv[1:])")
    on = subprocess.run([sys.executable, "-c", "import google.colab\n" + code], capture_output=True, text=True,
                        env={**env, "PYTHONPATH": str(fake)}, cwd=tmp_path)
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip() == "PIP install -q llmsys-lab @ git+https://github.com/o/r@v1.2.3"


def test_script_is_idempotent_and_updates_a_stale_version(tmp_path):
    """Run on a copy: the first run adds the cells, a second changes nothing, a version bump updates
    the cells in place (same ids, one of each). The project's own address is the placeholder, so
    writing needs allow_placeholder (tests/test_readme_install.py checks the refusal)."""
    import shutil

    for sub in ("notebooks", "solutions"):
        shutil.copytree(ROOT / sub, tmp_path / sub)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "README.md").write_text(f"x\n{colab.README_START}\n{colab.README_END}\ny\n")
    assert colab.run(tmp_path, allow_placeholder=True)
    snapshot = {p: p.read_text() for p in tmp_path.rglob("*.ipynb")}
    assert colab.run(tmp_path, allow_placeholder=True) == [] and colab.run(tmp_path, check=True) == []
    assert {p: p.read_text() for p in tmp_path.rglob("*.ipynb")} == snapshot
    py = tmp_path / "pyproject.toml"
    py.write_text(py.read_text().replace(f'version = "{VERSION}"', 'version = "9.9.9"'))
    assert len(colab.run(tmp_path, check=True)) == len(snapshot) + 1
    colab.run(tmp_path, allow_placeholder=True)
    nb = nbformat.read(tmp_path / "notebooks/01_attention.ipynb", as_version=4)
    ids = [c.get("id") for c in nb.cells]
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert ids.count(colab.BADGE_ID) == 1 and first_code.source.count(colab.SETUP_START) == 1
    assert "@v9.9.9" in first_code.source and "@v0" not in first_code.source
    assert "x\n" in (tmp_path / "README.md").read_text() and "blob/v9.9.9/notebooks/01_attention" in (
        tmp_path / "README.md").read_text()
