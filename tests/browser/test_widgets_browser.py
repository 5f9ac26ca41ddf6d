"""The lessons' widgets, run and driven in a real browser (JupyterLab + headless Chromium).

For each lesson in ``LESSONS`` the test opens the notebook in JupyterLab (see ``conftest.py``),
waits for the kernel, clears the stored outputs and runs every cell from the Run menu, as a
person would. Then it checks that

* every code cell ran and no cell has an error output (a traceback) or a widget that failed to
  render ("Error displaying widget");
* the widget's DOM is there (the CSS class its view adds to its box) and shows the state the
  lesson sets up (``initial``, a regular expression on the state text the view renders);
* each interaction (mouse clicks and drags on the real controls) changes what the widget shows:
  the state text must change and match ``expect``, and views with a picture must show a new one.

Screenshots of every widget before and after each interaction are saved in
``test-artifacts/browser/`` (``<lesson>-0-initial.png``, ``<lesson>-1-<step>.png``, ...), with a
full-page screenshot when a lesson fails, and the JupyterLab log.

The lessons come from the course manifest (``llmsys_lab/course.py``): every lesson whose entry lists
``widgets`` is driven here, pending ones included, and needs one entry in ``LESSONS`` saying how, e.g.
lesson 06's tiling step-through::

    Lesson("06_flash_attention", widget="llmsys-tiling-view", state=".llmsys-tiling-text",
           initial=r"^step 16 of 16: ",
           steps=(Step("prev", click("◀ prev"), expect=r"^step 15 of 16: "),)),

``widget`` is the class the view adds with ``box.add_class(...)``; ``state`` is the element inside
it whose text is the view's state (default ``pre.llmsys-state``, the HTML form of ``View.text()``);
``initial`` is the state after the *whole* notebook ran (later cells may change the view from code);
the actions ``click(label)``, ``choose(label, option)``, ``tick(label)``, ``toggle(option)`` and
``drag_slider(label, dx)`` cover ipywidgets' buttons, dropdowns, checkboxes, toggle buttons and
sliders.
``test_every_widget_lesson_has_an_entry`` fails until every lesson the manifest lists with widgets has
an entry here (``tests/test_course.py`` checks the manifest's widgets against the notebooks' imports).
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from llmsys_lab import course

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 900          # one whole lesson on a CPU, kernel start included
UPDATE_TIMEOUT_MS = 60_000   # a widget's round trip to the kernel and back


# ---- actions: what a person does to a widget (``view`` is the widget's root locator) ----------
def click(label: str) -> Callable:
    def act(view):
        view.get_by_role("button", name=label, exact=True).click()
    return act


def toggle(option: str) -> Callable:
    def act(view):
        view.locator(".widget-toggle-buttons").get_by_role("button", name=option, exact=True).click()
    return act


def choose(label: str, option: str) -> Callable:
    def act(view):
        box = view.locator(".widget-dropdown", has=view.page.locator("label", has_text=label))
        box.locator("select").select_option(label=option)
    return act


def tick(label: str) -> Callable:
    def act(view):
        view.locator(".widget-checkbox", has_text=label).locator("input[type=checkbox]").click()
    return act


def drag_slider(label: str, dx: int) -> Callable:
    """Drag the slider's handle by dx pixels with the mouse (ipywidgets 8 uses noUiSlider)."""
    def act(view):
        slider = view.locator(".widget-slider", has=view.page.locator("label", has_text=label))
        handle = slider.locator(".noUi-handle").first
        handle.scroll_into_view_if_needed()
        box = handle.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        mouse = view.page.mouse
        mouse.move(x, y)
        mouse.down()
        mouse.move(x + dx, y, steps=8)
        mouse.up()
    return act


@dataclass(frozen=True)
class Step:
    name: str                   # used in messages and screenshot names
    act: Callable               # act(view_locator): drives the widget
    expect: str                 # regex the state text must match afterwards (re.search)
    image_changes: bool = True  # views with an <img> must show a different picture
    lines_change: tuple = ()    # labels of state-text lines whose numbers must change too


@dataclass(frozen=True)
class Lesson:
    slug: str                   # the course manifest's lesson ("01_attention"): its notebook
    widget: str                 # CSS class of the view's root box
    initial: str                # regex the state text matches after the notebook ran
    steps: tuple = field(default_factory=tuple)
    state: str = "pre.llmsys-state"
    index: int = 0              # which of the notebook's views of this class (in page order)

    @property
    def notebook(self) -> str:
        """The notebook's path under notebooks/ (pending/NN_x.ipynb for a lesson awaiting its GPU run)."""
        return next(x for x in course.LESSONS if x.slug == self.slug).notebook.removeprefix("notebooks/")

    @property
    def id(self) -> str:
        return self.slug


ESTIMATES = ("forward FLOPs", "training memory", "max batch on", "arithmetic intensity")   # depend on seq
LESSONS = [
    # Each lesson's state after the whole notebook ran (later cells change the view from code).
    Lesson("01_attention", widget="llmsys-attention-view", initial=r"^head 0 of 4, causal=False",
           steps=(Step("head-3", choose("head", "3"), expect=r"^head 3 of 4, causal=False"),
                  Step("causal-on", tick("causal mask"), expect=r"^head 3 of 4, causal=True"))),
    Lesson("02_estimators", widget="llmsys-estimator-view", initial=r"^llama-2-70b: batch 16, seq 2048, bf16, H200",
           steps=(Step("sequence-longer", drag_slider("sequence", 60),
                       expect=r"^llama-2-70b: batch 16, seq (4096|8192|16384|32768),", lines_change=ESTIMATES),
                  Step("sequence-shorter", drag_slider("sequence", -140),
                       expect=r"^llama-2-70b: batch 16, seq (128|256|512|1024),", lines_change=ESTIMATES))),
    Lesson("04_paged_attention", widget="llmsys-block-table-view", state=".llmsys-block-view",
           initial=r"^step 9 of 13: request C arrives",
           steps=(Step("next", click("next ▶"), expect=r"^step 10 of 13: request C generates 'Whether'", image_changes=False),
                  Step("prev", click("◀ prev"), expect=r"^step 9 of 13:", image_changes=False),
                  Step("prev-again", click("◀ prev"), expect=r"^step 8 of 13: request A finishes", image_changes=False))),
    Lesson("05_continuous_batching", widget="llmsys-timeline-view",
           initial=r"^continuous batching, max batch 4: iteration 8 of 10",
           steps=(Step("iteration-earlier", drag_slider("iteration", -60), expect=r"^continuous batching, max batch 4: iteration [1-7] of 10"),
                  Step("static", toggle("static"), expect=r"^static batching, max batch 4: iteration"))),
    Lesson("06_flash_attention", widget="llmsys-tiling-view", state=".llmsys-tiling-text",
           initial=r"^step 16 of 16: query block 3 \(rows 6\.\.7\) x key block 3",
           steps=(Step("prev", click("◀ prev"), expect=r"^step 15 of 16: query block 3 \(rows 6\.\.7\) x key block 2"),
                  Step("prev-again", click("◀ prev"), expect=r"^step 14 of 16: query block 3 .* x key block 1"),
                  Step("next", click("next ▶"), expect=r"^step 15 of 16: "))),
    Lesson("07_performance", widget="llmsys-splitkv-view",
           initial=r"^batch 1 x 8 KV heads x 16 splits = 128 programs on 132 SMs",
           steps=(Step("batch-16", choose("batch", "16"), expect=r"^batch 16 x 8 KV heads x 16 splits = 2048 programs"),
                  Step("fewer-splits", drag_slider("splits", -300),
                       expect=r"^batch 16 x 8 KV heads x ([1-9]|1[0-5]) splits? = "))),
    Lesson("08_parallelism", widget="llmsys-pipeline-view",
           initial=r"^1F1B, 4 stages, 8 micro-batches: time 33 of 33",
           steps=(Step("gpipe", toggle("gpipe"), expect=r"^GPipe, 4 stages, 8 micro-batches: time 33 of 33"),
                  Step("more-micro-batches", drag_slider("micro-batches", 60),
                       expect=r"^GPipe, 4 stages, (9|1[0-6]) micro-batches"),
                  Step("earlier", drag_slider("time", -120), expect=r"^GPipe, 4 stages, \d+ micro-batches: time \d+ of"))),
    Lesson("09_moe", widget="llmsys-routing-view",
           initial=r"^layer 0 of 4, top-2, capacity factor 1\.00: capacity \d+ assignments per expert",
           steps=(Step("top-1", toggle("1"), expect=r"^layer 0 of 4, top-1, capacity factor 1\.00"),
                  Step("more-capacity", drag_slider("capacity", 80),
                       expect=r"^layer 0 of 4, top-1, capacity factor (1\.[2-9]\d|[2-8]\.\d\d):"))),
    Lesson("10_speculative_decoding", widget="llmsys-speculative-view", state=".llmsys-speculative-text",
           initial=r"^round 3 of \d+, phase rollback",
           steps=(Step("next", click("next ▶"), expect=r"^round 4 of \d+, phase draft", image_changes=False),
                  Step("prev", click("◀ prev"), expect=r"^round 3 of \d+, phase rollback", image_changes=False),
                  Step("prev-again", click("◀ prev"), expect=r"^round 3 of \d+, phase accept", image_changes=False))),
    # a lesson waiting for its GPU reference run (notebooks/pending/) is driven too: 11_scaling_laws
    Lesson("11_scaling_laws", widget="llmsys-scaling-view",
           initial=r"^budget C = 5\.76e\+23 FLOPs",
           steps=(Step("smaller-budget", drag_slider("budget C", -200), expect=r"^budget C = \d\.\d\de\+(09|1\d|2[0-2]) FLOPs"),)),
]


# ---- what the page is asked (window.jupyterapp: the server runs with expose_app_in_browser) -----
JS_KERNEL = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.context || !w.context.isReady || !w.sessionContext) return null;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? {status: k.status, connection: k.connectionStatus, name: k.name} : null;
}"""
JS_CELLS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const r = {total: 0, executed: 0, running: 0, unexecuted: [], errors: [],
             kernel: w.sessionContext.session && w.sessionContext.session.kernel
                     ? w.sessionContext.session.kernel.status : null};
  w.content.widgets.forEach((cell, i) => {
    if (cell.model.type !== 'code' || !cell.model.sharedModel.getSource().trim()) return;
    r.total++;
    const prompt = cell.node.querySelector('.jp-InputPrompt');
    if (prompt && prompt.textContent.includes('*')) r.running++;
    if (cell.model.executionCount !== null && cell.model.executionCount !== undefined) r.executed++;
    else r.unexecuted.push(i);
    for (let j = 0; j < cell.model.outputs.length; j++) {
      const o = cell.model.outputs.get(j).toJSON();
      if (o.output_type === 'error') r.errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
    }
  });
  return r;
}"""
JS_IMAGE = """async (img) => {
  if (!img.src || !img.complete || img.naturalWidth === 0) return null;
  const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
  let h = 0;
  for (const b of bytes) h = (Math.imul(h, 31) + b) | 0;
  return `${img.naturalWidth}x${img.naturalHeight}:${bytes.length}:${h}`;
}"""


def menu(page, top: str, item: str) -> None:
    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
    page.locator(".lm-Menu-content .lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).click()


def wait_for(fn, timeout_s: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval)


def run_all_cells(page) -> dict:
    """Clear the stored outputs and run every cell from the menus; wait until the run ends."""
    menu(page, "Edit", "Clear Outputs of All Cells")
    cleared = page.evaluate(JS_CELLS)
    assert cleared["executed"] == 0, f"outputs not cleared: {cleared}"
    menu(page, "Run", "Run All Cells")

    def finished():
        r = page.evaluate(JS_CELLS)
        done = r["running"] == 0 and r["kernel"] == "idle" and (r["executed"] == r["total"] or r["errors"])
        return r if done else None

    return wait_for(finished, RUN_TIMEOUT_S, "the notebook to finish running")


def state_of(view, lesson: Lesson) -> tuple[str, str | None]:
    text = view.locator(lesson.state).first.inner_text().strip()
    images = view.locator("img")
    image = images.first.evaluate(JS_IMAGE) if images.count() else None
    return text, image


def test_every_widget_lesson_has_an_entry():
    """Every lesson the course manifest lists with widgets (pending ones too) is driven in the browser, and
    each entry's CSS class is named in its view's module."""
    import importlib
    import inspect

    covered = [lesson.slug for lesson in LESSONS]
    with_widgets = [x.slug for x in course.LESSONS if x.widgets]
    missing = sorted(set(with_widgets) - set(covered))
    assert not missing, f"lessons with widgets but no entry in LESSONS of {Path(__file__).name}: {missing}"
    stale = sorted(set(covered) - set(with_widgets))
    assert not stale, f"LESSONS names lessons the course manifest lists without widgets: {stale}"
    assert covered == with_widgets, "keep LESSONS in the manifest's order"
    for lesson in LESSONS:
        views = next(x for x in course.LESSONS if x.slug == lesson.slug).widgets
        sources = [inspect.getsource(importlib.import_module(f"llmsys_lab.viz.{v.split('.')[0]}")) for v in views]
        assert any(f'"{lesson.widget}"' in src for src in sources), (lesson.slug, lesson.widget, views)
        assert (ROOT / "notebooks" / lesson.notebook).is_file(), lesson.notebook


def open_notebook(page, server, lesson: Lesson) -> None:
    """Open the lesson in JupyterLab and wait for its kernel: the one it names, this Python."""
    page.goto(server.notebook_url(f"notebooks/{lesson.notebook}"), timeout=120_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.content", timeout=120_000)
    kernel = wait_for(lambda: (k := page.evaluate(JS_KERNEL)) and k["status"] == "idle" and k, 120,
                      "the kernel to start")
    want = json.loads((ROOT / "notebooks" / lesson.notebook).read_text())["metadata"]["kernelspec"]["name"]
    assert kernel["name"] == want, f"the notebook runs on kernel {kernel['name']!r}, it names {want!r}"
    argv = server.api("/api/kernelspecs")["kernelspecs"][want]["spec"]["argv"]
    assert argv[0] == sys.executable, f"the kernel would not run this environment's Python: {argv}"


def drive(view, lesson: Lesson, artifacts: Path) -> None:
    """Each step: act like a person, wait for the kernel's answer, check what changed, screenshot."""
    from playwright.sync_api import expect

    state = view.locator(lesson.state).first
    text, image = state_of(view, lesson)
    for n, step in enumerate(lesson.steps, start=1):
        step.act(view)
        expect(state).to_have_text(re.compile(step.expect, re.M), timeout=UPDATE_TIMEOUT_MS)
        new_text = state.inner_text().strip()
        assert new_text != text, f"step {step.name!r}: the widget's state did not change"
        for label in step.lines_change:
            old, new = (next((ln for ln in t.splitlines() if label in ln), None) for t in (text, new_text))
            assert old and new and old != new, f"step {step.name!r}: {label!r} did not change: {old!r} -> {new!r}"
        if step.image_changes and image is not None:
            new_image = wait_for(lambda: (i := state_of(view, lesson)[1]) and i != image and i,
                                 UPDATE_TIMEOUT_MS / 1000, f"a new picture after {step.name!r}")
        else:
            new_image = state_of(view, lesson)[1]
        text, image = new_text, new_image
        view.scroll_into_view_if_needed()
        view.screenshot(path=str(artifacts / f"{lesson.id}-{n}-{step.name}.png"))


@pytest.mark.notebook
@pytest.mark.parametrize("lesson", LESSONS, ids=lambda lesson: lesson.id)
def test_widgets_render_and_respond(lesson, browser, jupyter_lab, artifacts, record_property):
    from playwright.sync_api import expect

    started = time.monotonic()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on("console", lambda msg: page_errors.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" else None)
    try:
        open_notebook(page, jupyter_lab, lesson)
        run = run_all_cells(page)
        record_property("run_s", round(time.monotonic() - started, 1))
        assert not run["errors"], f"cells with error output: {run['errors']}"
        assert run["executed"] == run["total"], f"cells that did not run: {run['unexecuted']}"
        expect(page.locator(".widget-error")).to_have_count(0)
        expect(page.get_by_text("Error displaying widget")).to_have_count(0)

        view = page.locator(f".{lesson.widget}").nth(lesson.index)
        expect(view).to_be_visible(timeout=UPDATE_TIMEOUT_MS)
        view.scroll_into_view_if_needed()
        expect(view.locator(lesson.state).first).to_have_text(re.compile(lesson.initial, re.M),
                                                                 timeout=UPDATE_TIMEOUT_MS)
        if view.locator("img").count():
            assert state_of(view, lesson)[1], "the widget's picture did not render"
        view.screenshot(path=str(artifacts / f"{lesson.id}-0-initial.png"))

        drive(view, lesson, artifacts)

        final = page.evaluate(JS_CELLS)
        assert not final["errors"], f"cells with error output after the interactions: {final['errors']}"
        uncaught = [e for e in page_errors if not e.startswith("console ")]
        assert not uncaught, f"uncaught errors in the page: {uncaught}"
    except BaseException:
        page.screenshot(path=str(artifacts / f"{lesson.id}-failure.png"), full_page=True)
        raise
    finally:
        if page_errors:
            (artifacts / f"{lesson.id}-console.txt").write_text("\n".join(page_errors) + "\n")
        elapsed = time.monotonic() - started
        record_property("total_s", round(elapsed, 1))
        (artifacts / f"{lesson.id}-time.txt").write_text(f"{elapsed:.1f} s\n")
        context.close()
        jupyter_lab.shutdown_kernels()
