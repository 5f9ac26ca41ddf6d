"""Pipeline-schedule step-through: stages x time, GPipe vs 1F1B, micro-batches, bubble fraction.

The schedule is played by ``parallel.pipeline.simulate`` (forward = 1 time unit, backward = 2 per
stage, no communication time), the same plan ``run_pipeline`` executes on real ranks. ``text()``
draws one row per stage and one cell per time unit up to the current time (``F3`` = forward of
micro-batch 3, ``B3`` its backward, ``..`` idle) and prints the bubble fraction next to
(p - 1) / (m + p - 1); nbval compares it.
"""
from __future__ import annotations

import html

from ..parallel.pipeline import SCHEDULES, bubble_fraction, gpipe_bubble, peak_in_flight, simulate
from .base import View, figure_png, image_widget

NAMES = {"gpipe": "GPipe", "1f1b": "1F1B"}


class PipelineView(View):
    def __init__(self, stages: int = 4, micro_batches: int = 8, schedule: str = "1f1b", time: int | None = None,
                 t_f: int = 1, t_b: int = 2, max_micro_batches: int = 16):
        if stages < 1 or micro_batches < 1:
            raise ValueError(f"need stages >= 1 and micro_batches >= 1, got {stages} and {micro_batches}")
        self.stages, self.t_f, self.t_b, self.max_micro_batches = stages, t_f, t_b, max_micro_batches
        self._widget = None
        self.set(schedule=schedule, micro_batches=micro_batches, time=time)

    # ---- state ----------------------------------------------------------------------------------
    def set(self, schedule: str | None = None, micro_batches: int | None = None, time: int | None = None) -> None:
        """Change the schedule, the number of micro-batches or the time shown (None: the end)."""
        if schedule is not None:
            if schedule not in SCHEDULES:
                raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
            self.schedule = schedule
        if micro_batches is not None:
            self.micro_batches = micro_batches
        self.events = simulate(self.schedule, self.stages, self.micro_batches, self.t_f, self.t_b)
        self.makespan = int(max(e.end for e in self.events))
        self.time = self.makespan if time is None else time
        if not 0 <= self.time <= self.makespan:
            raise ValueError(f"time must be in 0..{self.makespan}, got {time}")
        self._refresh()

    def grid(self) -> list[list[str]]:
        """cells[stage][t]: 'F3', 'B3' or '..' for every time unit up to the current time."""
        cells = [[".."] * self.time for _ in range(self.stages)]
        for e in self.events:
            for t in range(int(e.start), min(int(e.end), self.time)):
                cells[e.stage][t] = f"{e.kind}{e.mb}"
        return cells

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.events, self.stages)

    # ---- renderings -------------------------------------------------------------------------------
    def text(self) -> str:
        p, m = self.stages, self.micro_batches
        w = 1 + len(str(m - 1))
        lines = [f"{NAMES[self.schedule]}, {p} stages, {m} micro-batches: time {self.time} of {self.makespan} "
                 f"(forward {self.t_f}, backward {self.t_b} time units)"]
        for s, row in enumerate(self.grid()):
            lines.append(f"stage {s} | " + " ".join(f"{c:<{w}}" for c in row))
        lines.append(f"bubble fraction {self.bubble:.3f}; (p - 1) / (m + p - 1) = {gpipe_bubble(p, m):.3f}")
        lines.append(f"micro-batches held at most, per stage: {peak_in_flight(self.schedule, p, m)}")
        return "\n".join(line.rstrip() for line in lines)

    def figure(self):
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        fig = Figure(figsize=(9, 0.6 * self.stages + 1.6))
        ax = fig.add_subplot()
        for e in self.events:
            if e.start >= self.time:
                continue
            end = min(e.end, self.time)
            color = "#4c72b0" if e.kind == "F" else "#dd8452"
            ax.barh(e.stage, end - e.start, left=e.start, color=color, edgecolor="white")
            if end - e.start >= 1:
                ax.text((e.start + end) / 2, e.stage, str(e.mb), ha="center", va="center", color="white", fontsize=8)
        ax.set_xlim(0, self.makespan)
        ax.set_ylim(self.stages - 0.5, -0.5)
        ax.set_yticks(range(self.stages), [f"stage {s}" for s in range(self.stages)])
        ax.set_xlabel("time (forward of one micro-batch on one stage = 1 unit)")
        ax.set_ylabel("pipeline stage (rank)")
        ax.set_title(f"{NAMES[self.schedule]}: {self.micro_batches} micro-batches, bubble {self.bubble:.1%}")
        ax.legend(handles=[Patch(color="#4c72b0", label="forward"), Patch(color="#dd8452", label="backward")],
                  loc="upper right", fontsize=8)
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        return figure_png(self.figure())

    def widget(self):
        import ipywidgets as W

        kind = W.ToggleButtons(options=list(SCHEDULES), value=self.schedule, description="schedule")
        mbs = W.IntSlider(value=self.micro_batches, min=1, max=self.max_micro_batches, description="micro-batches")
        time = W.IntSlider(value=self.time, min=0, max=self.makespan, description="time")
        kind.observe(lambda ch: ch["new"] != self.schedule and self.set(schedule=ch["new"]), names="value")
        mbs.observe(lambda ch: ch["new"] != self.micro_batches and self.set(micro_batches=ch["new"]), names="value")
        time.observe(lambda ch: ch["new"] != self.time and self.set(time=ch["new"], micro_batches=None), names="value")
        self._controls = (kind, mbs, time)
        self._image, self._table = image_widget(), W.HTML()
        box = W.VBox([W.HBox([kind, mbs]), time, self._image, self._table])
        box.add_class("llmsys-pipeline-view")
        self._widget = box
        self._refresh()
        return box

    def _refresh(self) -> None:
        if self._widget is not None:
            kind, mbs, time = self._controls           # controls follow state set from code too
            kind.value, mbs.value = self.schedule, self.micro_batches
            time.max = self.makespan
            time.value = self.time
            self._table.value = f"<pre class='llmsys-state'>{html.escape(self.text())}</pre>"
            self._image.value = self.png()
