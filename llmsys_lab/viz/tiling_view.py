"""Step through FlashAttention's tiling: which query block meets which key block, and the running stats.

The view runs ``llmsys_lab.flash.flash_attention_torch`` with a trace, so every state shown is one
the real tiled loop reaches. ``text()`` prints the tile grid (# done, @ current, x skipped above the
causal diagonal, / masked tile, . to do) and the running max m and sum l of the current query
block's rows; nbval compares it. The widget adds prev/next buttons, a step slider and a picture.
"""
from __future__ import annotations

import html

import torch

from ..flash import flash_attention_torch
from .base import View, figure_png, image_widget, step_controls


class TilingView(View):
    def __init__(self, n: int = 8, d: int = 4, block_m: int = 2, block_n: int = 2, causal: bool = True,
                 seed: int = 0, step: int = 0, rows_shown: int = 4):
        if n <= 0 or d <= 0:
            raise ValueError(f"n and d must be positive, got n={n}, d={d}")
        g = torch.Generator().manual_seed(seed)
        self.q, self.k, self.v = (torch.randn(1, 1, n, d, generator=g, dtype=torch.float64) for _ in range(3))
        self.n, self.block_m, self.block_n, self.causal = n, block_m, block_n, causal
        self.trace: list = []
        self.out = flash_attention_torch(self.q, self.k, self.v, causal, block_m, block_n, trace=self.trace)
        self.n_qb, self.n_kb = -(-n // block_m), -(-n // block_n)
        self.rows_shown = rows_shown
        self._widget = None
        self.set_step(step)

    # ---- state ---------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.trace)

    def set_step(self, step: int) -> None:
        if not 0 <= step < self.steps:
            raise ValueError(f"step must be in 0..{self.steps - 1}, got {step}")
        self.step = step
        self._refresh()

    def grid(self) -> list[list[str]]:
        """One character per tile: '#' done, '@' current, 'x' skipped, '/' masked (done), '.' to do."""
        g = [["." for _ in range(self.n_kb)] for _ in range(self.n_qb)]
        for i, t in enumerate(self.trace[:self.step + 1]):
            ch = "x" if t.skipped else ("/" if t.masked else "#")
            g[t.q_block][t.k_block] = "@" if i == self.step else ch
        return g

    def describe(self) -> str:
        t = self.trace[self.step]
        rows = f"{t.q_block * self.block_m}..{min((t.q_block + 1) * self.block_m, self.n) - 1}"
        cols = f"{t.k_block * self.block_n}..{min((t.k_block + 1) * self.block_n, self.n) - 1}"
        what = ("skipped: every key is in the future of every query (causal)" if t.skipped else
                "masked tile: crosses the causal diagonal" if t.masked else "full tile")
        return (f"step {self.step + 1} of {self.steps}: query block {t.q_block} (rows {rows}) x "
                f"key block {t.k_block} (keys {cols}): {what}")

    # ---- renderings ----------------------------------------------------------------------------
    def text(self) -> str:
        t = self.trace[self.step]
        lines = [self.describe(), "tiles (rows: query blocks, columns: key blocks):"]
        lines += ["  " + " ".join(r) for r in self.grid()]
        lines.append("running stats of the current query block's rows:")
        for r, (m, l) in enumerate(zip(t.m[:self.rows_shown], t.l[:self.rows_shown])):
            lines.append(f"  row {t.q_block * self.block_m + r}: m = {m:8.4f}   l = {l:8.4f}")
        if self.step == self.steps - 1:
            ref = torch.softmax(self._scores(), -1) @ self.v
            lines.append(f"done: O = diag(l)^-1 acc equals softmax(QK^T/sqrt d) V: "
                         f"{torch.allclose(self.out, ref, atol=1e-12)}")
        return "\n".join(lines)

    def _scores(self):
        s = self.q @ self.k.transpose(-1, -2) / self.q.shape[-1] ** 0.5
        if self.causal:
            s = s.masked_fill(torch.ones(self.n, self.n, dtype=torch.bool).tril().logical_not(), float("-inf"))
        return s

    def figure(self):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.2, 4.2))
        ax = fig.add_subplot()
        colors = {"#": "#9ecae1", "@": "#fd8d3c", "x": "#eeeeee", "/": "#c6dbef", ".": "#ffffff"}
        for i, row in enumerate(self.grid()):
            for j, ch in enumerate(row):
                ax.add_patch(_rect(j, i, colors[ch], hatch="//" if ch in "/" else None))
                if ch == "x":
                    ax.text(j + 0.5, i + 0.5, "skip", ha="center", va="center", fontsize=8, color="#888")
        ax.set_xlim(0, self.n_kb)
        ax.set_ylim(self.n_qb, 0)
        ax.set_xticks([j + 0.5 for j in range(self.n_kb)], [f"K{j}" for j in range(self.n_kb)])
        ax.set_yticks([i + 0.5 for i in range(self.n_qb)], [f"Q{i}" for i in range(self.n_qb)])
        ax.set_xlabel("key / value block (streamed through SRAM)")
        ax.set_ylabel("query block (one program)")
        ax.set_title(f"step {self.step + 1} of {self.steps}", fontsize=10)
        ax.set_aspect("equal")
        fig.tight_layout()
        return fig

    def html(self) -> str:
        t = self.trace[self.step]
        cell = "border:1px solid #999;padding:2px 8px;font-family:monospace;font-size:12px;text-align:right"
        rows = "".join(f"<tr><td style='{cell}'>{t.q_block * self.block_m + r}</td><td style='{cell}'>{m:.4f}</td>"
                       f"<td style='{cell}'>{l:.4f}</td></tr>"
                       for r, (m, l) in enumerate(zip(t.m[:self.rows_shown], t.l[:self.rows_shown])))
        return (f"<div class='llmsys-tiling-text'><b>{html.escape(self.describe())}</b>"
                f"<table style='border-collapse:collapse;margin-top:6px'><caption style='text-align:left;white-space:nowrap'>running max m and sum l</caption>"
                f"<tr><th style='{cell}'>row</th><th style='{cell}'>m</th><th style='{cell}'>l</th></tr>{rows}</table></div>")

    def widget(self):
        import ipywidgets as W

        slider, controls = step_controls(self.step + 1, 1, self.steps,
                                         lambda step: step - 1 != self.step and self.set_step(step - 1))
        self._slider, self._image, self._html = slider, image_widget(), W.HTML()
        box = W.VBox([controls, W.HBox([self._image, self._html])])
        box.add_class("llmsys-tiling-view")
        self._widget = box
        self._refresh()
        return box

    def _refresh(self) -> None:
        if self._widget is not None:
            self._slider.value = self.step + 1
            self._image.value = figure_png(self.figure())
            self._html.value = self.html()


def _rect(x, y, color, hatch=None):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=color, edgecolor="#555", hatch=hatch)
