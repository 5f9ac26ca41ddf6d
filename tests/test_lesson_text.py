"""What every lesson's text and figures must satisfy, checked statically over the notebook sources.

* No unfinished text: "being written", "coming soon", "TODO", "TBD" anywhere in a lesson (markdown or code).
* Every figure a lesson draws has a title and both axis labels, and a legend when it plots more than one
  series. A code cell that creates a figure (``plt.subplots``, ``plt.figure``, ``Figure(``) is parsed with
  ``ast``: it must call ``set_title``/``title``/``suptitle``, ``set_xlabel``/``xlabel`` and
  ``set_ylabel``/``ylabel``; plotting calls (``plot``, ``bar``, ``barh``, ``scatter``, ``step``,
  ``errorbar``, ``fill_between``, ``hist``) are counted, a call inside a loop counting as several series,
  and more than one series requires ``legend``. The same holds for the figure methods of
  ``llmsys_lab.viz`` that lessons display.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
UNFINISHED = re.compile(r"being written|coming soon|\bTODO\b|\bTBD\b", re.IGNORECASE)
FIGURE_MAKERS = {"subplots", "figure", "subplot_mosaic"}
PLOTTERS = {"plot", "bar", "barh", "scatter", "step", "errorbar", "fill_between", "hist", "semilogy", "loglog"}
TITLE, XLABEL, YLABEL = {"set_title", "title", "suptitle"}, {"set_xlabel", "xlabel"}, {"set_ylabel", "ylabel"}


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def python_source(text: str) -> str:
    """Cell source without IPython magics and shell escapes, so `ast` can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in text.splitlines())


def _is_figure_maker(call: ast.Call) -> bool:
    """plt.subplots(...), plt.figure(...), plt.subplot_mosaic(...) or Figure(...): a new figure."""
    f = call.func
    if isinstance(f, ast.Name):
        return f.id == "Figure"
    return (isinstance(f, ast.Attribute) and f.attr in FIGURE_MAKERS and isinstance(f.value, ast.Name)
            and f.value.id in ("plt", "pyplot", "matplotlib"))


def _name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def figure_problems(code: str) -> list[str]:
    """What a piece of code that may draw a figure lacks (empty: nothing, or it draws no figure)."""
    tree = ast.parse(python_source(code))
    calls: list[tuple[str, bool]] = []              # (name, inside a loop)
    makes_figure = False

    def visit(node, in_loop=False):
        for child in ast.iter_child_nodes(node):
            loop = in_loop or isinstance(child, (ast.For, ast.While, ast.comprehension, ast.ListComp,
                                                 ast.GeneratorExp))
            if isinstance(child, ast.Call) and _name(child):
                calls.append((_name(child), in_loop))
                if _name(child) == "set":             # ax.set(title=..., xlabel=..., ylabel=...)
                    calls.extend((kw.arg, in_loop) for kw in child.keywords if kw.arg)
                nonlocal makes_figure
                makes_figure = makes_figure or _is_figure_maker(child)
            visit(child, loop)
    visit(tree)
    names = {n for n, _ in calls}
    if not makes_figure:
        return []
    problems = []
    for need, what in ((TITLE, "a title"), (XLABEL, "an x-axis label"), (YLABEL, "a y-axis label")):
        if not names & need:
            problems.append(f"missing {what}")
    series = sum(2 if loop else 1 for n, loop in calls if n in PLOTTERS)
    if series > 1 and "legend" not in names:
        problems.append(f"{series} series but no legend")
    return problems


def lesson_figure_problems(path: Path) -> list[str]:
    out = []
    for i, c in enumerate(cells(path)):
        if c["cell_type"] == "code":
            out += [f"{path.name} cell {i} ({c.get('id')}): {p}" for p in figure_problems(source(c))]
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_unfinished_text(path):
    hits = [f"cell {i} ({c.get('id')}): {m.group(0)!r}" for i, c in enumerate(cells(path))
            for m in UNFINISHED.finditer(source(c))]
    assert not hits, f"{path.name} has unfinished text: " + "; ".join(hits)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_figures_have_titles_labels_and_legends(path):
    problems = lesson_figure_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted((ROOT / "llmsys_lab" / "viz").glob("*.py")), ids=lambda p: p.stem)
def test_viz_figures_have_titles_and_labels(path):
    tree = ast.parse(path.read_text())
    functions = {fn.name: fn for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)}

    def with_helpers(fn):
        """The function's code plus that of the module's functions it calls (a png() drawing through figure())."""
        seen, todo = {fn.name}, [fn]
        while todo:                                     # every module function reachable from fn
            for c in ast.walk(todo.pop()):
                if isinstance(c, ast.Call) and _name(c) in functions and _name(c) not in seen:
                    seen.add(_name(c))
                    todo.append(functions[_name(c)])
        return "\n".join(ast.unparse(functions[n]) for n in sorted(seen))
    makers = [fn for fn in functions.values()                # the functions that create a figure themselves
              if any(isinstance(c, ast.Call) and _is_figure_maker(c) for c in ast.walk(fn))]
    problems = [f"{path.name}: {fn.name}(): {p}" for fn in makers for p in figure_problems(with_helpers(fn))]
    assert not problems, "\n".join(problems)


# ---- the checks themselves catch what they should ------------------------------------------------------------
def test_unfinished_text_is_found():
    for text in ("Lesson 06 is being written", "# TODO: plot", "results coming soon", "numbers TBD"):
        assert UNFINISHED.search(text), text
    for text in ("a to-do list", "written by", "tbd_value = 1"):
        assert not UNFINISHED.search(text), text


def test_figure_check_catches_missing_title_labels_and_legend():
    good = ("fig, ax = plt.subplots()\nfor k in ks:\n    ax.plot(x, y[k], label=k)\n"
            "ax.set_title('t'); ax.set_xlabel('N (tokens)'); ax.set_ylabel('ms'); ax.legend()")
    assert figure_problems(good) == []
    assert figure_problems(good.replace("ax.set_title('t'); ", "")) == ["missing a title"]
    assert figure_problems("fig, ax = plt.subplots()\nax.plot(a)\nax.set(title='t', xlabel='x (s)', ylabel='y')") == []
    assert figure_problems("fig, ax = plt.subplots()\nax.plot(a)\nax.set(title='t', xlabel='x (s)')") == [
        "missing a y-axis label"]
    assert figure_problems(good.replace(" ax.set_ylabel('ms');", "")) == ["missing a y-axis label"]
    assert figure_problems(good.replace("; ax.legend()", "")) == ["2 series but no legend"]
    two = "fig, ax = plt.subplots()\nax.plot(a)\nax.bar(b, c)\nax.set_title('t'); ax.set_xlabel('x'); ax.set_ylabel('y')"
    assert figure_problems(two) == ["2 series but no legend"]
    assert figure_problems("%matplotlib inline\nprint(1)") == []          # no figure: nothing to check
    assert figure_problems("view.figure()") == []                         # showing a view's figure is not making one
    assert figure_problems("fig = Figure()\nax = fig.add_subplot()\nax.imshow(w)") == [
        "missing a title", "missing an x-axis label", "missing a y-axis label"]


# ---- the lessons' exercise hints are where students may read them ---------------------------------
HINTS = ROOT / "notebooks" / "exercise_hints"


def test_every_lesson_has_its_exercise_hints_outside_solutions():
    """One hints file per lesson of the course manifest (pending lessons too), and no other."""
    from llmsys_lab import course

    hints = sorted(ROOT / x.hints for x in course.LESSONS)
    assert hints and sorted(p for p in HINTS.glob("*.md") if p.name != "README.md") == hints
    assert not (ROOT / "solutions" / "lesson_exercises").exists()     # the folder graders keep from students
    text_files = [p for p in ROOT.rglob("*") if p.suffix in (".md", ".py", ".toml", ".cfg") and ".git" not in p.parts
                  and "site-packages" not in str(p) and p.is_file()]
    stale = [str(p.relative_to(ROOT)) for p in text_files
             if "solutions/lesson_exercises" in p.read_text(errors="replace") and p.name != "test_lesson_text.py"]
    assert stale == []


def test_lesson_links_to_exercise_hints_resolve():
    import re

    from llmsys_lab import course

    lessons = course.lesson_notebooks(root=ROOT)
    linked = 0
    for nb in lessons:
        for link in re.findall(r"`([\w/.-]*exercise\w*/[\w.-]+\.md)`", nb.read_text()):
            assert not link.startswith("solutions/"), (nb.name, link)
            assert (ROOT / link).is_file(), (nb.name, link)
            linked += 1
    assert linked >= 9, linked
