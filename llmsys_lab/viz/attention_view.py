"""Attention heat map: pick a head, toggle the causal mask, see the weights.

The view keeps its state (head, causal) in one place and renders it two ways: a
matplotlib heat map inside an ipywidgets box for people, and ``text()``, a fixed-width
table of the weights that nbval compares and that a browser test can read.
"""
from __future__ import annotations

import torch

from ..attention import scaled_dot_product_attention
from ..validate import ShapeError, check_tensor
from .base import View, figure_png, image_widget


class AttentionView(View):
    """Heat map of softmax(q k^T / sqrt(d)) for each head of (H, T, D) queries and keys."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, tokens: list[str] | None = None,
                 head: int = 0, causal: bool = True, decimals: int = 2):
        check_tensor(q, "q", "H T D")
        check_tensor(k, "k", "H S D")
        if tokens is not None and len(tokens) != k.shape[1]:
            raise ShapeError(f"got {len(tokens)} tokens for {k.shape[1]} key positions")
        self.q, self.k = q.detach().float().cpu(), k.detach().float().cpu()
        self.tokens = tokens or [f"t{i}" for i in range(k.shape[1])]
        self.num_heads = q.shape[0]
        self.decimals = decimals
        self.head, self.causal = 0, causal
        self.set_head(head)
        self._widget = None

    # ---- state -------------------------------------------------------------
    def set_head(self, head: int) -> None:
        if not 0 <= head < self.num_heads:
            raise ValueError(f"head must be in 0..{self.num_heads - 1}, got {head}")
        self.head = head
        self._refresh()

    def set_causal(self, causal: bool) -> None:
        self.causal = bool(causal)
        self._refresh()

    def weights(self) -> torch.Tensor:
        """(T, S) attention weights of the current head and mask."""
        q, k = self.q[None, self.head:self.head + 1], self.k[None, self.head:self.head + 1]
        _, w = scaled_dot_product_attention(q, k, k, causal=self.causal, return_weights=True)
        return w[0, 0]

    # ---- renderings --------------------------------------------------------
    def text(self) -> str:
        w = self.weights()
        width = max(6, max(len(t) for t in self.tokens) + 1)
        lines = [f"head {self.head} of {self.num_heads}, causal={self.causal} "
                 f"(row = query, column = key; each row sums to 1)",
                 " " * width + "".join(f"{t:>{width}}" for t in self.tokens)]
        for tok, row in zip(self.tokens[-w.shape[0]:], w):
            lines.append(f"{tok:<{width}}" + "".join(f"{v:>{width}.{self.decimals}f}" for v in row.tolist()))
        return "\n".join(lines)

    def figure(self, ax=None):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(4.8, 4.2))
        w = self.weights().numpy()
        im = ax.imshow(w, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(self.tokens)), self.tokens, rotation=45, ha="right")
        ax.set_yticks(range(w.shape[0]), self.tokens[-w.shape[0]:])
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(f"head {self.head}, {'causal' if self.causal else 'no mask'}")
        ax.figure.colorbar(im, ax=ax, fraction=0.046)
        ax.figure.tight_layout()
        return ax.figure

    # ---- widget ------------------------------------------------------------
    def png(self) -> bytes:
        """The heat map as PNG bytes (what the widget shows)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.8, 4.2))        # not registered with pyplot: never shown twice
        self.figure(ax=fig.add_subplot())
        return figure_png(fig)

    def widget(self):
        """An ipywidgets VBox: head selector, causal toggle, heat map and the text table.

        The heat map is an Image widget whose bytes are set from the kernel, so updating
        it sends no output messages (it behaves the same under nbval and in a browser).
        """
        import ipywidgets as W

        head = W.Dropdown(options=list(range(self.num_heads)), value=self.head, description="head")
        causal = W.Checkbox(value=self.causal, description="causal mask")
        self._image = image_widget()
        self._table = W.HTML()
        self._controls = head, causal
        head.observe(lambda ch: ch["new"] != self.head and self.set_head(ch["new"]), names="value")
        causal.observe(lambda ch: ch["new"] != self.causal and self.set_causal(ch["new"]), names="value")
        box = W.VBox([W.HBox([head, causal]), self._image, self._table])
        box.add_class("llmsys-attention-view")
        self._widget = box
        self._refresh()
        return box

    def _refresh(self) -> None:
        if getattr(self, "_widget", None) is None:
            return
        import html

        head, causal = self._controls              # controls follow state set from code too
        head.value, causal.value = self.head, self.causal
        self._table.value = f"<pre class='llmsys-state'>{html.escape(self.text())}</pre>"
        self._image.value = self.png()

