"""What every view of the kit shares: state rendered as text (compared by nbval) and as a widget.

Displaying a view shows the widget, with the text as its plain-text form: that is what nbval
compares, what a reader sees where widgets do not render, and what a browser test can read.
"""
from __future__ import annotations

import io


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib Figure (not registered with pyplot) as PNG bytes for an Image widget."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def image_widget():
    """An Image widget for a figure: shown at its own size (a VBox would otherwise stretch it to the
    output's width, blurred), shrunk to fit a narrow output, never distorted."""
    import ipywidgets as W

    return W.Image(format="png", layout=W.Layout(align_self="flex-start", max_width="100%", height="auto"))


def step_controls(value: int, lo: int, hi: int, on_change):
    """◀ prev, a step slider and next ▶ in a row; on_change(step) runs when the slider moves.
    Returns (slider, row): the view sets slider.value when its state changes from code."""
    import ipywidgets as W

    slider = W.IntSlider(value=value, min=lo, max=hi, description="step")
    prev, nxt = W.Button(description="◀ prev"), W.Button(description="next ▶")
    prev.on_click(lambda _: setattr(slider, "value", max(lo, slider.value - 1)))
    nxt.on_click(lambda _: setattr(slider, "value", min(hi, slider.value + 1)))
    slider.observe(lambda ch: on_change(ch["new"]), names="value")
    return slider, W.HBox([prev, slider, nxt])


class View:
    _widget = None

    def text(self) -> str:                      # pragma: no cover - every view defines it
        raise NotImplementedError

    def widget(self):                           # pragma: no cover
        raise NotImplementedError

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget()._repr_mimebundle_()
        bundle["text/plain"] = self.text()
        return bundle
