"""Tokens -> experts: where one MoE layer's router sends each token, per-expert load and dropped tokens.

``RoutingView.record(model, tokenizer, text, layer)`` runs an MoE model (``llmsys_lab.moe.moe_llama``,
e.g. the bundled llmsys-tiny-moe) on a text and keeps what reaches that layer's router: the
layer's input rows and its router weight. Changing ``top_k`` or ``capacity_factor`` re-routes those
same rows with ``llmsys_lab.moe.route`` (the layer's own code), so the view shows what the layer would
do with that setting: which experts each token picks, how many assignments each expert gets, how
many it can take (``capacity``) and which ones are dropped. Dropped assignments contribute zero: a
token whose every choice is dropped passes the layer on the residual path only.

``text()`` lists the per-expert load (routed, kept, dropped, a bar) and every token's choices
(``x``: dropped); nbval compares it and a browser test reads it.
"""
from __future__ import annotations

import html

import torch

from ..moe import MoE, capacity, load_stats, route
from ..validate import ConfigError
from .base import View, figure_png, image_widget

BAR = 24                              # characters of the longest load bar


class RoutingView(View):
    def __init__(self, tokens: list[str], x: torch.Tensor, router_weight: torch.Tensor, layer: int = 0,
                 num_layers: int = 1, top_k: int = 2, capacity_factor: float | None = 1.0,
                 norm_topk_prob: bool = True):
        if x.dim() != 2 or x.shape[0] != len(tokens) or x.shape[1] != router_weight.shape[1]:
            raise ConfigError(f"x must be (tokens, hidden) = ({len(tokens)}, {router_weight.shape[1]}), "
                              f"got {tuple(x.shape)}")
        self.tokens, self.x, self.w = list(tokens), x.detach().float(), router_weight.detach().float()
        self.layer, self.num_layers, self.norm_topk_prob = layer, num_layers, norm_topk_prob
        self.num_experts = router_weight.shape[0]
        self._widget = None
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.set(top_k=top_k, capacity_factor=capacity_factor)

    @classmethod
    def record(cls, model, tokenizer, text: str, layer: int = 0, top_k: int | None = None,
               capacity_factor: float | None = 1.0) -> "RoutingView":
        """Run `model` on `text` once and keep the input of MoE layer `layer` (0-based)."""
        layers = [m for m in model.modules() if isinstance(m, MoE)]
        if not layers:
            raise ConfigError("the model has no llmsys_lab.moe.MoE layer (build it with moe_llama / mixtral_from_hf)")
        if not 0 <= layer < len(layers):
            raise ConfigError(f"layer must be in 0..{len(layers) - 1}, got {layer}")
        moe, seen = layers[layer], {}
        hook = moe.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
        ids = tokenizer(text, return_tensors="pt").input_ids
        try:
            with torch.no_grad():
                model(ids.to(moe.gate.weight.device))
        finally:
            hook.remove()
        x = seen["x"].reshape(-1, moe.config.hidden_size).cpu()                    # (N, h)
        tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
        return cls(tokens, x, moe.gate.weight.cpu(), layer, len(layers), top_k or moe.config.top_k,
                   capacity_factor, moe.config.norm_topk_prob)

    # ---- state ----------------------------------------------------------------------------------
    def set(self, top_k: int | None = None, capacity_factor: float | None | str = "keep") -> None:
        """Change k or the capacity factor (None: no capacity limit) and re-route the same tokens."""
        k = self.top_k if top_k is None else top_k
        cf = self.capacity_factor if capacity_factor == "keep" else capacity_factor
        if not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ConfigError(f"top_k must be an int in 1..{self.num_experts}, got {k!r}")
        if cf is not None and not cf > 0:
            raise ConfigError(f"capacity_factor must be > 0 (or None for no limit), got {cf!r}")
        self.top_k, self.capacity_factor = k, cf
        self.routing = route(self.x, self.w, k, self.norm_topk_prob, cf)
        self.stats = load_stats(self.routing, self.num_experts)
        self._refresh()

    @property
    def capacity(self) -> int | None:
        if self.capacity_factor is None:
            return None
        return capacity(len(self.tokens), self.num_experts, self.top_k, self.capacity_factor)

    def token_choices(self) -> list[tuple[str, list[tuple[int, float, bool]]]]:
        """Per token: (text, [(expert, weight, kept), ...] best first)."""
        r = self.routing
        return [(t, [(int(e), float(w), bool(k)) for e, w, k in zip(r.experts[n], r.weights[n], r.kept[n])])
                for n, t in enumerate(self.tokens)]

    # ---- renderings -------------------------------------------------------------------------------
    def header(self) -> str:
        cf = "none (no limit)" if self.capacity_factor is None else f"{self.capacity_factor:.2f}"
        n, e, k = len(self.tokens), self.num_experts, self.top_k
        cap = ("every assignment kept" if self.capacity is None else
               f"capacity {self.capacity} assignments per expert = ceil({cf} x {n} tokens x {k} / {e} experts)")
        return f"layer {self.layer} of {self.num_layers}, top-{k}, capacity factor {cf}: {cap}"

    def text(self) -> str:
        s, n, k = self.stats, len(self.tokens), self.top_k
        top = max(max(s["routed"]), self.capacity or 0, 1)
        lines = [self.header(), "expert  routed  kept  dropped  load (# kept, x dropped)"]
        for e in range(self.num_experts):
            kept, dropped = s["kept"][e], s["dropped"][e]
            bar = "#" * round(BAR * kept / top) + "x" * (round(BAR * s["routed"][e] / top) - round(BAR * kept / top))
            lines.append(f"{e:>6}  {s['routed'][e]:>6}  {kept:>4}  {dropped:>7}  {bar}")
        dropped = sum(s["dropped"])
        lines.append(f"mean load {n * k / self.num_experts:.1f}, max / mean {s['imbalance']:.2f}; dropped "
                     f"{dropped} of {n * k} assignments; tokens with every choice dropped: {s['tokens_fully_dropped']}")
        lines.append("tokens -> experts (weight; x: dropped):")
        row = []
        for t, choices in self.token_choices():
            picks = ",".join(f"{e}{'' if kept else 'x'}({w:.2f})" for e, w, kept in choices)
            row.append(f"{t!r}->{picks}")
            if len(row) == 4:
                lines.append("  " + "  ".join(row))
                row = []
        if row:
            lines.append("  " + "  ".join(row))
        return "\n".join(line.rstrip() for line in lines)

    def figure(self):
        from matplotlib.figure import Figure

        s = self.stats
        experts = list(range(self.num_experts))
        fig = Figure(figsize=(7, 3.2))
        ax = fig.add_subplot()
        ax.bar(experts, s["kept"], color="#4c72b0", label="kept")
        ax.bar(experts, s["dropped"], bottom=s["kept"], color="#dd8452", label="dropped (over capacity)")
        ax.axhline(len(self.tokens) * self.top_k / self.num_experts, color="gray", ls=":", label="mean load")
        if self.capacity is not None:
            ax.axhline(self.capacity, color="#c44e52", ls="--", label=f"capacity {self.capacity}")
        ax.set_xticks(experts)
        ax.set_xlabel("expert")
        ax.set_ylabel("assignments (tokens routed)")
        cf = "no limit" if self.capacity_factor is None else f"capacity factor {self.capacity_factor:.2f}"
        ax.set_title(f"Layer {self.layer}, top-{self.top_k}, {cf}: {sum(s['dropped'])} dropped")
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        return figure_png(self.figure())

    def html(self) -> str:
        colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
        chips = []
        for t, choices in self.token_choices():
            e, _, kept = choices[0]
            style = (f"display:inline-block;margin:1px;padding:1px 4px;border-radius:3px;font-family:monospace;"
                     f"color:white;background:{colors[e % len(colors)] if kept else '#bbbbbb'}")
            tip = ", ".join(f"expert {e}{'' if k else ' (dropped)'}: {w:.2f}" for e, w, k in choices)
            chips.append(f"<span style='{style}' title='{html.escape(tip)}'>{html.escape(repr(t)[1:-1])}</span>")
        return ("<div style='margin:4px 0'>tokens coloured by their first expert (grey: dropped):</div>"
                f"<div>{''.join(chips)}</div>")

    def widget(self):
        import ipywidgets as W

        topk = W.ToggleButtons(options=[str(k) for k in range(1, min(self.num_experts, 4) + 1)],
                               value=str(self.top_k), description="top-k")
        cf = W.FloatSlider(value=self.capacity_factor or float(self.num_experts), min=0.25,
                           max=float(self.num_experts), step=0.25, description="capacity")
        topk.observe(lambda ch: int(ch["new"]) != self.top_k and self.set(top_k=int(ch["new"])), names="value")
        cf.observe(lambda ch: ch["new"] != (self.capacity_factor or float(self.num_experts))
                   and self.set(capacity_factor=ch["new"]), names="value")
        self._controls = (topk, cf)
        self._image, self._chips, self._table = image_widget(), W.HTML(), W.HTML()
        box = W.VBox([W.HBox([topk, cf]), self._image, self._chips, self._table])
        box.add_class("llmsys-routing-view")
        self._widget = box
        self._refresh()
        return box

    def _refresh(self) -> None:
        if self._widget is not None:
            topk, cf = self._controls              # controls follow state set from code too
            if str(self.top_k) in topk.options:
                topk.value = str(self.top_k)
            cf.value = self.capacity_factor or float(self.num_experts)
            self._table.value = f"<pre class='llmsys-state'>{html.escape(self.text())}</pre>"
            self._chips.value = self.html()
            self._image.value = self.png()
