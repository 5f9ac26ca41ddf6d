"""Batching timeline: batch slots x iterations, coloured by request, prefill vs decode vs END.

Switch between static and continuous batching and move through the iterations; the text form
(the lecture's grid up to the current iteration, plus who is waiting) is what nbval compares.
"""
from __future__ import annotations

import html

from ..simulator import SimRequest, simulate
from .base import View, figure_png, image_widget

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd"]


class TimelineView(View):
    def __init__(self, requests: list[SimRequest], max_batch: int = 4, policy: str = "continuous",
                 iteration: int | None = None, **sim_kw):
        self.requests, self.max_batch, self.sim_kw = list(requests), max_batch, sim_kw
        self.results = {p: simulate(self.requests, p, max_batch, **sim_kw) for p in ("static", "continuous")}
        self._widget = None
        self.policy = policy
        self.set_policy(policy)
        if iteration is not None:
            self.set_iteration(iteration)

    @property
    def result(self):
        return self.results[self.policy]

    def set_policy(self, policy: str) -> None:
        if policy not in self.results:
            raise ValueError(f"policy must be 'static' or 'continuous', got {policy!r}")
        self.policy = policy
        self.iteration = len(self.result.timeline)
        self._refresh()

    def set_iteration(self, iteration: int) -> None:
        if not 1 <= iteration <= len(self.result.timeline):
            raise ValueError(f"iteration must be in 1..{len(self.result.timeline)}, got {iteration}")
        self.iteration = iteration
        self._refresh()

    def text(self) -> str:
        r, it = self.result, self.iteration
        running = sorted(rid for rid, what in r.timeline[it - 1].values())
        done = sorted(rid for rid, q in r.requests.items() if q.finished_time is not None and q.finished_time <= r.iteration_end[it - 1])
        return "\n".join([f"{self.policy} batching, max batch {self.max_batch}: iteration {it} of {len(r.timeline)}",
                          r.table(1, it), f"running: {', '.join(running) or '-'}",
                          f"waiting: {', '.join(r.waiting[it - 1]) or '-'}", f"finished: {', '.join(done) or '-'}"])

    def figure(self):
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle

        r = self.result
        ids = sorted(r.requests)
        color = {rid: PALETTE[i % len(PALETTE)] for i, rid in enumerate(ids)}
        slots = sorted({s for it in r.timeline for s in it})
        fig = Figure(figsize=(max(6, 0.45 * len(r.timeline) + 2), 0.5 * len(slots) + 1.4))
        ax = fig.add_subplot()
        for t, cells in enumerate(r.timeline[:self.iteration], start=1):
            for s, (rid, what) in cells.items():
                ax.add_patch(Rectangle(
                    (t - 0.5, s - 0.4), 1, 0.8, color=color[rid], alpha=0.45 if what == "prefill" else 1.0,
                    hatch="//" if what == "prefill" else None))
                ax.text(t, s, "END" if what == "END" else rid, ha="center", va="center", fontsize=7, color="white")
        ax.set_xlim(0.5, len(r.timeline) + 0.5)
        ax.set_ylim(max(slots) + 0.6, min(slots) - 0.6)
        ax.set_yticks(slots, [f"slot {s + 1}" for s in slots])
        ax.set_xticks(range(1, len(r.timeline) + 1), [f"T{t}" for t in range(1, len(r.timeline) + 1)], fontsize=7)
        ax.axvline(self.iteration + 0.5, color="k", lw=1)
        ax.set_xlabel("iteration (one decoding step of the batch)", fontsize=8)
        ax.set_ylabel("batch slot", fontsize=8)
        ax.set_title(f"{self.policy} batching (faded, hatched = prefill chunk)")
        ax.legend(handles=[Patch(color=color[i], label=i) for i in ids], fontsize=7, ncol=min(len(ids), 8),
                  loc="upper center", bbox_to_anchor=(0.5, -0.35), title="request", title_fontsize=7)
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        return figure_png(self.figure(), dpi=120)   # its labels are small: a little larger on screen

    def widget(self):
        import ipywidgets as W

        policy = W.ToggleButtons(options=["static", "continuous"], value=self.policy, description="batching")
        slider = W.IntSlider(value=self.iteration, min=1, max=len(self.result.timeline), description="iteration")

        def on_policy(ch):
            if ch["new"] != self.policy:
                self.set_policy(ch["new"])

        def on_iteration(ch):
            if ch["new"] != self.iteration:
                self.set_iteration(min(ch["new"], len(self.result.timeline)))

        policy.observe(on_policy, names="value")
        slider.observe(on_iteration, names="value")
        self._controls = policy, slider
        self._image, self._table = image_widget(), W.HTML()
        box = W.VBox([W.HBox([policy, slider]), self._image, self._table])
        box.add_class("llmsys-timeline-view")
        self._widget = box
        self._refresh()
        return box

    def _refresh(self) -> None:
        if self._widget is not None:
            policy, slider = self._controls            # controls follow state set from code too
            policy.value = self.policy
            if slider.max != len(self.result.timeline):
                slider.max = len(self.result.timeline)
            slider.value = self.iteration
            self._table.value = f"<pre class='llmsys-state'>{html.escape(self.text())}</pre>"
            self._image.value = self.png()
