"""Split-KV work assignment: which programs of the paged decode kernel run on which SMs.

The paged decode kernel (``llmsys_lab.kernels.paged_attention``) runs one program per (sequence,
K/V head, split). At batch 1 with 8 K/V heads and no split that is 8 programs for a GPU with 132
streaming multiprocessors (SMs): 124 SMs idle while 8 stream the whole context. Splitting each
sequence's context over S programs multiplies the programs by S and divides each one's work by S;
a merge kernel then combines the S partial results per (sequence, query head) with the log-sum-exp
merge. Move the batch and the splits and watch how many SMs get work and how long the longest
program is. The text form (what nbval compares) states the same counts.

The counts are the kernel's own launch arithmetic; "tiles per program" is the critical path in
units of one program's pass over ``block_n`` tokens. It ignores that the SMs share the memory
bandwidth, so real gains flatten once enough SMs read at once (lesson 07 shows the measured ones).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

from .base import View, figure_png, image_widget

H200_SMS = 132
BATCHES = (1, 2, 4, 8, 16, 32, 64)
MAX_SPLITS = 32
HEAD_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#ccb974"]
IDLE = "#e6e6e6"


@dataclass(frozen=True)
class Assignment:
    """The launch arithmetic of one (batch, splits) choice."""
    batch: int
    kv_heads: int
    context: int
    splits: int
    num_sms: int
    block_n: int

    @property
    def programs(self) -> int:
        return self.batch * self.kv_heads * self.splits

    @property
    def waves(self) -> int:
        return math.ceil(self.programs / self.num_sms)

    @property
    def busy_first_wave(self) -> int:
        return min(self.programs, self.num_sms)

    @property
    def tokens_per_program(self) -> int:
        return math.ceil(self.context / self.splits)

    @property
    def tiles_per_program(self) -> int:
        return math.ceil(self.tokens_per_program / self.block_n)

    @property
    def critical_path(self) -> int:
        """Tiles one SM works through: waves x tiles per program."""
        return self.waves * self.tiles_per_program

    @property
    def sm_utilisation(self) -> float:
        """Share of SM-time with a program on it over all waves."""
        return self.programs / (self.waves * self.num_sms)

    def program(self, index: int) -> tuple[int, int, int]:
        """(sequence, K/V head, split) of program `index` in launch order (grid (B, H_kv, S), split fastest)."""
        seq, rest = divmod(index, self.kv_heads * self.splits)
        head, split = divmod(rest, self.splits)
        return seq, head, split


class SplitKVView(View):
    def __init__(self, batch: int = 1, splits: int = 1, heads: int = 32, kv_heads: int = 8, context: int = 4096,
                 num_sms: int = H200_SMS, block_n: int = 64):
        """The defaults are benchmarks/paged_attention.py's shapes (32 query heads, 8 K/V heads) on an H200."""
        for name, v in (("heads", heads), ("kv_heads", kv_heads), ("context", context), ("num_sms", num_sms),
                        ("block_n", block_n)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if heads % kv_heads:
            raise ValueError(f"kv_heads = {kv_heads} must divide heads = {heads}")
        self.heads, self.kv_heads, self.context, self.num_sms, self.block_n = heads, kv_heads, context, num_sms, block_n
        self._widget = None
        self.batch = self.splits = 1
        self.set_batch(batch)
        self.set_splits(splits)

    # ---- state ---------------------------------------------------------------------------------
    def set_batch(self, batch: int) -> None:
        if batch not in BATCHES:
            raise ValueError(f"batch must be one of {BATCHES}, got {batch!r}")
        self.batch = batch
        self._refresh()

    def set_splits(self, splits: int) -> None:
        if not isinstance(splits, int) or isinstance(splits, bool) or not 1 <= splits <= MAX_SPLITS:
            raise ValueError(f"splits must be an int in 1..{MAX_SPLITS}, got {splits!r}")
        self.splits = splits
        self._refresh()

    @property
    def assignment(self) -> Assignment:
        return Assignment(self.batch, self.kv_heads, self.context, self.splits, self.num_sms, self.block_n)

    def auto_splits(self) -> int:
        """What the kernel's num_splits=None would choose for this shape on this many SMs."""
        from ..kernels.paged_attention import choose_num_splits

        return choose_num_splits(self.batch, self.kv_heads, self.context, self.num_sms, self.block_n)

    def text(self) -> str:
        a = self.assignment
        word = "split" if a.splits == 1 else "splits"
        lines = [f"batch {a.batch} x {a.kv_heads} KV heads x {a.splits} {word} = {a.programs} programs on "
                 f"{a.num_sms} SMs",
                 f"  waves: {a.waves}; SMs busy in the first wave: {a.busy_first_wave} of {a.num_sms} "
                 f"({a.busy_first_wave / a.num_sms:.0%}); SM-time used over all waves: {a.sm_utilisation:.0%}",
                 f"  each program reads {a.tokens_per_program} of the {a.context} cached tokens "
                 f"({a.tiles_per_program} tiles of {a.block_n}); critical path: {a.critical_path} tiles"]
        if a.splits == 1:
            lines.append("  merge: none (each program writes its output directly)")
        else:
            lines.append(f"  merge: {a.batch * self.heads} (sequence, query head) pairs, each combining "
                         f"{a.splits} partial outputs by log-sum-exp (one more launch)")
        one = Assignment(a.batch, a.kv_heads, a.context, 1, a.num_sms, a.block_n)
        lines.append(f"  vs 1 split: critical path {one.critical_path} -> {a.critical_path} tiles "
                     f"({one.critical_path / a.critical_path:.1f}x shorter, before bandwidth limits)")
        lines.append(f"  choose_num_splits picks {self.auto_splits()} for this shape")
        return "\n".join(lines)

    # ---- picture -------------------------------------------------------------------------------
    def figure(self):
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle

        a = self.assignment
        cols = math.ceil(math.sqrt(a.num_sms * 1.2))
        rows = math.ceil(a.num_sms / cols)
        fig = Figure(figsize=(7.6, 0.42 * rows + 0.9))
        ax = fig.add_subplot()
        for sm in range(a.num_sms):
            r, c = divmod(sm, cols)
            if sm < a.programs:
                seq, head, split = a.program(sm)
                ax.add_patch(Rectangle((c, r), 0.92, 0.92, color=HEAD_COLOURS[head % len(HEAD_COLOURS)],
                                       alpha=1.0 if seq % 2 == 0 else 0.55))
                ax.text(c + 0.46, r + 0.46, f"{split}", ha="center", va="center", fontsize=6, color="white")
            else:
                ax.add_patch(Rectangle((c, r), 0.92, 0.92, color=IDLE))
        ax.set_xlim(-0.1, cols)
        ax.set_ylim(rows, -0.1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"SM (column of {cols}); number = split index, shade alternates with the sequence", fontsize=8)
        ax.set_ylabel("SM (row)", fontsize=8)
        ax.set_title(f"batch {a.batch}, {a.splits} {'split' if a.splits == 1 else 'splits'}: {a.programs} programs, "
                     f"wave 1 of {a.waves} ({a.busy_first_wave} of {a.num_sms} SMs busy)", fontsize=9)
        handles = [Patch(color=HEAD_COLOURS[h % len(HEAD_COLOURS)], label=f"KV head {h}")
                   for h in range(min(a.kv_heads, len(HEAD_COLOURS)))] + [Patch(color=IDLE, label="idle SM")]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        return figure_png(self.figure(), dpi=110)

    # ---- widget --------------------------------------------------------------------------------
    def widget(self):
        import ipywidgets as W

        batch = W.Dropdown(options=[str(b) for b in BATCHES], value=str(self.batch), description="batch")
        splits = W.IntSlider(value=self.splits, min=1, max=MAX_SPLITS, description="splits")

        def on_batch(ch):
            if int(ch["new"]) != self.batch:
                self.set_batch(int(ch["new"]))

        def on_splits(ch):
            if ch["new"] != self.splits:
                self.set_splits(ch["new"])

        batch.observe(on_batch, names="value")
        splits.observe(on_splits, names="value")
        self._controls = batch, splits
        self._image, self._table = image_widget(), W.HTML()
        box = W.VBox([W.HBox([batch, splits]), self._image, self._table])
        box.add_class("llmsys-splitkv-view")
        self._widget = box
        self._refresh()
        return box

    def _refresh(self) -> None:
        if self._widget is not None:
            batch, splits = self._controls           # controls follow state set from code too
            batch.value, splits.value = str(self.batch), self.splits
            self._table.value = f"<pre class='llmsys-state'>{html.escape(self.text())}</pre>"
            self._image.value = self.png()
