"""The course manifest (llmsys_lab/course.py) is the one list of lessons, and adding a lesson there is all it takes.

* the manifest is the files: every lesson notebook (notebooks/ and notebooks/pending/), hints file, solution and
  student notebook on disk is an entry's, and every entry's files exist;
* what an entry says is what its notebook does: the widgets it imports, the stored results it reads, that it
  prints "Triton unavailable" where the entry says it is limited without Triton;
* every consumer reads it: the README's tables and lesson 00's (current, else ``make course-tables``), the Colab
  script, the doctor, and the lists the tests execute or grade;
* a new entry with a tiny notebook, in a copy of the repository, reaches every consumer.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest

from llmsys_lab import course

ROOT = Path(__file__).resolve().parent.parent


def load(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables, colab = load("course_tables.py"), load("colab.py")


def code_of(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")


# ---- the manifest is the files ---------------------------------------------------------------------
def test_every_lesson_notebook_on_disk_is_in_the_manifest_and_back():
    on_disk = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")) + sorted((ROOT / "notebooks" / "pending").glob("[0-9]*.ipynb"))
    assert course.lesson_notebooks() == on_disk
    assert course.lesson_notebooks(pending=False) == sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    assert [x.number for x in course.LESSONS] == list(range(len(course.LESSONS)))


@pytest.mark.parametrize("lesson", course.LESSONS, ids=lambda x: x.slug)
def test_every_file_an_entry_names_exists(lesson):
    for rel in (lesson.notebook, lesson.hints, lesson.solution, lesson.student_notebook):
        assert rel is None or (ROOT / rel).is_file(), rel
    for name in lesson.results:
        assert (ROOT / "benchmarks" / "results" / f"{name}.json").is_file(), name
    # the notebook says what it is: its title names the lesson's number
    first = next(c for c in json.loads((ROOT / lesson.notebook).read_text())["cells"]
                 if c["cell_type"] == "markdown" and "".join(c["source"]).startswith("# "))
    assert "".join(first["source"]).startswith(f"# Lesson {lesson.number:02d}"), lesson.notebook


@pytest.mark.parametrize("lesson", course.LESSONS, ids=lambda x: x.slug)
def test_an_entry_says_what_its_notebook_does(lesson):
    code = code_of(ROOT / lesson.notebook)
    views = {f"{m}.{n.strip()}" for m, names in re.findall(r"from llmsys_lab\.viz\.(\w+) import \(?([^)\n]+)", code)
             for n in names.split(",") if n.strip().endswith("View")}
    assert set(lesson.widgets) == views, f"{lesson.slug}: the manifest says {lesson.widgets}, the notebook shows {views}"
    stored = sorted(p.stem for p in (ROOT / "benchmarks" / "results").glob("*.json")
                    if re.search(rf"[\"']{p.stem}(\.json)?[\"']", code))
    assert sorted(lesson.results) == stored, f"{lesson.slug}: reads {stored}"
    # a notebook that prints "Triton unavailable: ..." (triton_note) is limited without Triton; one can also be
    # limited through the kit's code it calls (lesson 05's engine takes the PyTorch reference)
    for rel, limited in ((lesson.notebook, lesson.without_triton), (lesson.solution, lesson.assignment_without_triton)):
        if rel and "triton_note(" in (ROOT / rel).read_text():
            assert limited, f"{rel} prints 'Triton unavailable: ...': say what is limited (without_triton)"


def test_bad_entries_are_refused_with_the_field_named():
    base = course.lesson(1)
    with pytest.raises(ValueError, match="slug must start with its number 01_"):
        replace(base, slug="1_attention")
    with pytest.raises(ValueError, match="number must be an int"):
        replace(base, number=-1)
    with pytest.raises(ValueError, match="assignment must be 'NN_name/notebook.ipynb'"):
        replace(base, assignment="attention.ipynb")
    with pytest.raises(ValueError, match="names none"):
        replace(course.lesson(0), graded="x 10")
    with pytest.raises(KeyError, match="no lesson number 99"):
        course.lesson(99)


# ---- every consumer reads it ------------------------------------------------------------------------
def test_readme_and_lesson_00_tables_are_current():
    assert tables.run(check=True) == [], "run `make course-tables` (python scripts/course_tables.py) and commit"


def test_consumers_list_exactly_the_manifests_lessons():
    import nbpolicy
    import test_assignments
    import test_lesson_cpu_time
    import test_lesson_drift
    import test_no_triton
    from browser import test_widgets_browser

    doctor = importlib.import_module("llmsys_lab.doctor")

    every = course.lesson_notebooks()
    assert test_no_triton.LESSONS == every and test_no_triton.SOLUTIONS == course.solution_notebooks()
    assert test_lesson_cpu_time.LESSONS == test_lesson_drift.LESSONS == nbpolicy.lesson_notebooks() == \
        course.lesson_notebooks(pending=False)
    assert test_assignments.NAMES == course.assignment_names()
    assert [x.slug for x in test_widgets_browser.LESSONS] == [x.slug for x in course.LESSONS if x.widgets]
    assert colab.notebooks() == every + course.solution_notebooks()
    assert not hasattr(doctor, "WITHOUT_TRITON"), "the doctor reads course.without_triton() when it runs"


def tiny_lesson_root(tmp_path: Path) -> tuple[Path, tuple]:
    """A copy of the repository's README, lesson 00, notebooks and pyproject, plus a new lesson 13 with
    a tiny notebook, hints and an assignment; returns (root, the manifest with lesson 13)."""
    root = tmp_path / "kit"
    for rel in ("README.md", "pyproject.toml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    for lesson in course.LESSONS:
        for rel in (lesson.notebook, lesson.solution):
            if rel:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / rel, root / rel)
    new = course.Lesson(
        number=13, slug="13_tiny_lesson", title="a tiny lesson", lectures="005", builds="one cell that runs",
        topic="a cell that prints; added to test the manifest", assignment="13_tiny/tiny.ipynb",
        implements="nothing at all", graded="the test 10", widgets=("attention_view.AttentionView",),
        without_triton="its kernel cell prints a note", assignment_without_triton="the kernel part is not gradable")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Lesson 13 · A tiny lesson"),
                                         nbformat.v4.new_code_cell("import llmsys_lab\nprint(1)")])
    for rel in (new.notebook, new.solution):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, root / rel)
    (root / new.hints).parent.mkdir(parents=True, exist_ok=True)
    (root / new.hints).write_text("# hints\n")
    return root, course.LESSONS + (new,)


def test_adding_a_lesson_to_the_manifest_is_all_it_takes(tmp_path):
    """A new entry reaches the README's tables, lesson 00's table, the Colab badges and table, the doctor's
    list and the notebook lists the tests run, with nothing else edited."""
    root, lessons = tiny_lesson_root(tmp_path)
    assert tables.run(root, check=True, lessons=course.LESSONS) == []          # the copy is current ...
    assert tables.run(root, check=True, lessons=lessons) == ["README.md", "notebooks/00_setup_and_orientation.ipynb"]
    tables.run(root, lessons=lessons)                                           # ... until lesson 13 is added
    readme = (root / "README.md").read_text()
    assert "| `13_tiny_lesson` | a cell that prints; added to test the manifest | 005 |" in readme
    assert "| `13_tiny` | nothing at all | the test 10 |" in readme
    first = nbformat.read(root / "notebooks" / "00_setup_and_orientation.ipynb", as_version=4)
    assert "| 13 | a tiny lesson | one cell that runs | 005 |" in first.cells[1].source
    assert tables.run(root, check=True, lessons=lessons) == []

    assert colab.notebooks(root, lessons)[len(course.LESSONS) - 2] == root / "notebooks" / "13_tiny_lesson.ipynb"
    assert root / "solutions" / "13_tiny" / "tiny.ipynb" in colab.notebooks(root, lessons)
    assert "blob/v0.1.0/notebooks/13_tiny_lesson.ipynb" in colab.readme_table("https://github.com/o/r", "0.1.0",
                                                                             colab.notebooks(root, lessons), root)
    assert ("lesson 13", "its kernel cell prints a note") in course.without_triton(lessons)
    assert ("assignment 13", "the kernel part is not gradable") in course.without_triton(lessons)
    assert course.assignment_names(lessons)[-1] == "13_tiny/tiny.ipynb"
    assert course.lesson_notebooks(lessons, root)[-3:] == [root / "notebooks" / "13_tiny_lesson.ipynb",
                                                          root / "notebooks" / "pending" / "11_scaling_laws.ipynb",
                                                          root / "notebooks" / "pending" / "12_deepseek_v3.ipynb"]


def test_the_doctor_lists_a_new_lessons_limits(monkeypatch):
    """The doctor reads the manifest when it runs (not a copy made at import)."""
    doctor = importlib.import_module("llmsys_lab.doctor")

    new = course.Lesson(number=13, slug="13_tiny_lesson", title="t", lectures="—", builds="b", topic="t",
                        without_triton="a new limit")
    monkeypatch.setattr(course, "LESSONS", course.LESSONS + (new,))
    monkeypatch.setattr(doctor, "triton_available", lambda: False)
    monkeypatch.setattr(doctor, "TRITON_PLATFORMS", ())
    assert ("lesson 13", "a new limit") in doctor.doctor(verbose=False).limited


def test_table_cells_refuse_a_pipe_or_a_line_break():
    bad = replace(course.lesson(1), topic="a | b")
    with pytest.raises(ValueError, match="may hold neither"):
        tables.readme_lessons((bad,))
