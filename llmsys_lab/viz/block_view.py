"""Block-table visualiser: replay requests token by token and watch the paged KV cache.

Events are ("add", seq, words), ("append", seq, word) and ("free", seq). The view replays the
first `step` events on a fresh BlockManager, so any step can be shown (slider, buttons) and the
state is always the one a real manager reaches. ``text()`` prints logical blocks, the block
table (physical block, # filled) and the physical blocks with their tokens; nbval compares it.
"""
from __future__ import annotations

import html

from ..paged import BlockManager
from .base import View, step_controls

COLORS = ["#cfe2ff", "#ffe5b4", "#d1f2d6", "#f8d7da", "#e2d9f3", "#fff3cd"]


class BlockTableView(View):
    def __init__(self, events: list[tuple], num_blocks: int = 8, block_size: int = 4,
                 order: list[int] | None = None, step: int | None = None):
        self.events, self.num_blocks, self.block_size, self.order = list(events), num_blocks, block_size, order
        self._widget = None
        self.set_step(len(self.events) if step is None else step)

    # ---- state -------------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        if not 0 <= step <= len(self.events):
            raise ValueError(f"step must be in 0..{len(self.events)}, got {step}")
        self.step = step
        self.manager = BlockManager(self.num_blocks, self.block_size, self.order)
        self.words: dict = {}
        self.owner: dict[int, list] = {}
        for event in self.events[:step]:
            self._apply(event)
        self._refresh()

    def _apply(self, event) -> None:
        kind, seq = event[0], event[1]
        if kind == "add":
            self.manager.add(seq, list(range(len(event[2]))))
            self.words[seq] = list(event[2])
        elif kind == "append":
            self.manager.append(seq, len(self.words[seq]))
            self.words[seq].append(event[2])
        elif kind == "free":
            self.manager.free(seq)
            del self.words[seq]
        else:
            raise ValueError(f"unknown event {kind!r}: use 'add', 'append' or 'free'")

    def physical(self) -> dict[int, tuple]:
        """physical block -> (owner, words in it) for blocks in use."""
        out = {}
        for seq, table in self.manager.tables.items():
            for i, (b, n) in enumerate(zip(table.blocks, table.filled)):
                out[b] = (seq, self.words[seq][i * self.block_size: i * self.block_size + n])
        return out

    def describe(self) -> str:
        if self.step == 0:
            return "start: every block is free"
        event = self.events[self.step - 1]
        kind, seq = event[:2]
        if kind == "add":
            what = f"request {seq} arrives: prefill of its prompt"
        elif kind == "append":
            what = f"request {seq} generates {event[2]!r}"
        else:
            what = f"request {seq} finishes: its blocks are freed"
        return f"step {self.step} of {len(self.events)}: {what}"

    # ---- renderings ----------------------------------------------------------------------------
    def text(self) -> str:
        bs, w = self.block_size, 14
        lines = [self.describe()]
        for seq, table in self.manager.tables.items():
            lines.append(f"request {seq}: {len(self.words[seq])} tokens")
            lines.append(f"  {'logical':<8}{'tokens':<{w * bs}}  physical  # filled")
            for i, (b, n) in enumerate(zip(table.blocks, table.filled)):
                toks = self.words[seq][i * bs: i * bs + n] + ["."] * (bs - n)
                lines.append(f"  {i:<8}{''.join(f'{t:<{w}}' for t in toks)}  {b:>8}  {n:>8}")
        lines.append(f"physical blocks ({self.manager.num_free} of {self.num_blocks} free):")
        phys = self.physical()
        for b in range(self.num_blocks):
            seq, toks = phys.get(b, ("-", []))
            toks = toks + ["."] * (bs - len(toks))
            lines.append(f"  block {b}  {str(seq):<3}" + "".join(f"{t:<{w}}" for t in toks))
        return "\n".join(line.rstrip() for line in lines)

    def html(self) -> str:
        bs, phys = self.block_size, self.physical()
        color = {s: COLORS[i % len(COLORS)] for i, s in enumerate(sorted(map(str, self.manager.tables)))}
        cell = "border:1px solid #888;padding:2px 6px;min-width:70px;font-family:monospace;font-size:12px"
        parts = [f"<div class='llmsys-block-view'><b>{html.escape(self.describe())}</b><div style='display:flex;flex-wrap:wrap;align-items:flex-start;gap:12px 24px'>"]
        for seq, table in self.manager.tables.items():
            rows = "".join(
                f"<tr><td style='{cell}'>{i}</td>" + "".join(
                    f"<td style='{cell};background:{color[str(seq)]}'>{html.escape(t)}</td>"
                    for t in self.words[seq][i * bs:i * bs + n] + [""] * (bs - n))
                + f"<td style='{cell}'>{b}</td><td style='{cell}'>{n}</td></tr>"
                for i, (b, n) in enumerate(zip(table.blocks, table.filled)))
            parts.append(f"<table style='border-collapse:collapse'><caption>request {html.escape(str(seq))}: logical "
                         f"blocks and block table</caption><tr><th>logical</th><th colspan={bs}>tokens</th>"
                         f"<th>physical</th><th># filled</th></tr>{rows}</table>")
        rows = "".join(
            f"<tr><td style='{cell}'>block {b}</td>" + "".join(
                f"<td style='{cell};background:{color.get(str(phys[b][0]), '#fff') if b in phys else '#fff'}'>"
                f"{html.escape(t)}</td>" for t in (phys[b][1] if b in phys else []) + [""] * (bs - len(phys.get(b, ('', []))[1])))
            + "</tr>" for b in range(self.num_blocks))
        parts.append(f"<table style='border-collapse:collapse'><caption>physical blocks (KV cache)</caption>{rows}</table>")
        return "".join(parts) + "</div></div>"

    def widget(self):
        import ipywidgets as W

        slider, controls = step_controls(self.step, 0, len(self.events),
                                         lambda step: step != self.step and self.set_step(step))
        self._slider, self._html = slider, W.HTML()
        box = W.VBox([controls, self._html])
        box.add_class("llmsys-block-table-view")
        self._widget = box
        self._refresh()
        return box

    def _refresh(self) -> None:
        if self._widget is not None:
            self._slider.value = self.step              # the slider follows state set from code too
            self._html.value = self.html()


def single_request_events() -> list[tuple]:
    """Lecture 002's single-request slides: "Alan Turing is a computer scientist" generates "and",
    "mathematician", "renowned" (block table 7/4, 1/4, 5/1 at the end; ``llmsys_lab.lecture``)."""
    return [("add", "A", "Alan Turing is a computer scientist".split()),
            ("append", "A", "and"), ("append", "A", "mathematician"), ("append", "A", "renowned")]


def lecture_events() -> list[tuple]:
    """The two-request figure (lecture 002, from the vLLM paper): request A as in
    `single_request_events`, then request B "Artificial Intelligence is the future of technology"."""
    return single_request_events() + [("add", "B", "Artificial Intelligence is the future of technology".split())]


# Free-list orders that reproduce the slides' physical block numbers. They are two figures with two
# allocation orders: alone, request A's third block is 5; in the two-request figure it is 3 and B gets 2 and 5.
SINGLE_REQUEST_ORDER = [7, 1, 5, 0, 2, 3, 4, 6]
TWO_REQUEST_ORDER = [7, 1, 3, 2, 5, 0, 4, 6]
