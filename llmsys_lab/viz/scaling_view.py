"""Scaling-law explorer: pick a compute budget, see the compute-optimal N*, D* and the predicted loss.

The state is the budget (FLOPs, C = 6 N D) and one or more laws L(N, D) = E + A/N^alpha + B/D^beta (a fitted one,
Chinchilla's published one); ``text()`` prints the numbers nbval compares, the widget is a budget slider, the
IsoFLOP curve of each law at that budget with its minimum marked, and the same text.
"""
from __future__ import annotations

import html
import math

from ..scaling.laws import ChinchillaLaw, _positive
from ..validate import ConfigError
from .base import View, figure_png, image_widget


class ScalingView(View):
    STEP = 0.25                     # the slider's step in log10(FLOPs)

    def __init__(self, laws: dict, flops: float = 1e21, lo: float = 1e15, hi: float = 1e25):
        if not isinstance(laws, dict) or not laws:
            raise ConfigError("laws must be a non-empty dict {name: ChinchillaLaw}")
        for name, law in laws.items():
            if not isinstance(law, ChinchillaLaw):
                raise TypeError(f"laws[{name!r}] must be a ChinchillaLaw, got {type(law).__name__}")
        _positive(lo, "lo")
        _positive(hi, "hi")
        if not lo < hi:
            raise ConfigError(f"lo must be below hi, got {lo:g} and {hi:g}")
        self.laws, self.lo, self.hi = dict(laws), float(lo), float(hi)
        self._widget = None
        self.flops = None
        self.set_flops(flops)

    def set_flops(self, flops: float) -> None:
        """Change the budget (within [lo, hi]) and refresh the widget."""
        c = _positive(flops, "flops")
        if not self.lo <= c <= self.hi:
            raise ConfigError(f"flops must be within the view's range {self.lo:.0e}..{self.hi:.0e}, got {c:.3g}")
        self.flops = c
        self._refresh()

    def numbers(self) -> dict:
        """{law name: (N*, D*, D*/N*, predicted loss at the optimum)} at the current budget."""
        out = {}
        for name, law in self.laws.items():
            n, d = law.compute_optimal(self.flops)
            out[name] = (n, d, d / n, law.loss(n, d))
        return out

    def text(self) -> str:
        lines = [f"budget C = {self.flops:.2e} FLOPs (C = 6 N D)"]
        for name, (n, d, ratio, loss) in self.numbers().items():
            lines.append(f"  {name:<24} N* = {n:.3g} params, D* = {d:.3g} tokens, "
                         f"{ratio:.1f} tokens/param, predicted loss {loss:.3f}")
        return "\n".join(lines)

    def figure(self):
        import numpy as np
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.5, 3.4))
        ax = fig.subplots()
        c = self.flops
        for (name, law), (n_opt, _, _, loss_opt) in zip(self.laws.items(), self.numbers().values()):
            n = np.logspace(math.log10(n_opt) - 2, math.log10(n_opt) + 2, 200)
            ax.plot(n, [law.loss(float(x), c / (6 * float(x))) for x in n], label=name)
            ax.plot([n_opt], [loss_opt], "o", color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("parameters N (tokens D = C / 6N)")
        ax.set_ylabel("predicted loss L(N, C / 6N)")
        ax.set_title(f"IsoFLOP curve at C = {c:.1e} FLOPs; dots: N*")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def widget(self):
        import ipywidgets as W

        self._slider = W.FloatLogSlider(value=self.flops, base=10, min=math.log10(self.lo), max=math.log10(self.hi),
                                        step=self.STEP, description="budget C", readout_format=".1e")
        self._slider.observe(lambda ch: self._moved(ch["new"]), names="value")
        self._image = image_widget()
        self._table = W.HTML()
        box = W.VBox([self._slider, self._image, self._table])
        box.add_class("llmsys-scaling-view")
        self._widget = box
        self._refresh()
        return box

    def _moved(self, value: float) -> None:
        """The slider moved. A budget set from code (e.g. 5.76e23) is shown at the nearest step of the slider
        (5.62e23), and the slider reports that value back: only a move of at least one step is the reader's."""
        if abs(math.log10(value) - math.log10(self.flops)) >= self.STEP / 2:
            self.set_flops(value)

    def _refresh(self) -> None:
        if self._widget is None:
            return
        if abs(math.log10(self._slider.value) - math.log10(self.flops)) >= self.STEP / 2:
            self._slider.value = self.flops
        self._table.value = f"<pre class='llmsys-state'>{html.escape(self.text())}</pre>"
        self._image.value = figure_png(self.figure())
