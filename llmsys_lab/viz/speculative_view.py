"""Step through speculative decoding: draft -> verify -> accept/reject -> rollback, on a real run.

``SpeculativeView.record(target, drafter, tokenizer, prompt)`` runs ``speculative_generate`` on
the paged KV cache and keeps every round's StepRecord; the view replays them phase by phase
(4 phases per round), so any moment can be shown (slider, buttons). ``text()`` prints the
current phase: nbval compares it and a browser test can read it.
"""
from __future__ import annotations

import html

from ..speculative import Sampling, speculative_generate
from .base import View, step_controls

PHASES = ("draft", "verify", "accept", "rollback")


class SpeculativeView(View):
    def __init__(self, prompt: str, records: list, decode, gamma: int, block_size: int, step: int | None = None):
        self.prompt, self.records, self.decode = prompt, list(records), decode
        self.gamma, self.block_size = gamma, block_size
        self._widget = None
        self.set_step(self.num_steps if step is None else step)

    @classmethod
    def record(cls, target, drafter, tokenizer, prompt: str, max_new_tokens: int = 24, gamma: int = 4,
               block_size: int = 4, sampling: Sampling = Sampling(), generator=None) -> "SpeculativeView":
        ids = tokenizer(prompt).input_ids
        out = speculative_generate(target, drafter, ids, max_new_tokens, gamma=gamma, sampling=sampling,
                                   generator=generator, eos_token_id=None, cache="paged", block_size=block_size)
        view = cls(prompt, out.steps, lambda t: tokenizer.decode([t]), gamma, block_size)
        view.output = out
        return view

    @property
    def num_steps(self) -> int:
        return 4 * len(self.records)

    def set_step(self, step: int) -> None:
        if not 1 <= step <= self.num_steps:
            raise ValueError(f"step must be in 1..{self.num_steps}, got {step}")
        self.step = step
        self._refresh()

    # ---- state of the current phase -------------------------------------------------------------
    def _where(self):
        rnd, phase = divmod(self.step - 1, 4)
        return rnd, PHASES[phase], self.records[rnd]

    def _words(self, toks) -> list[str]:
        return [repr(self.decode(t))[1:-1] for t in toks]

    def text_before(self, rnd: int) -> str:
        out = []
        for r in self.records[:rnd]:
            out += r.draft[:r.accepted] + [r.next_token]
        return "".join(self.decode(t) for t in out)

    def describe(self) -> list[str]:
        rnd, phase, r = self._where()
        words = self._words(r.draft)
        lines = [f"round {rnd + 1} of {len(self.records)}, phase {phase}: context {r.context_len} tokens",
                 f"  generated so far: {self.text_before(rnd)!r}"]
        if phase == "draft":
            lines.append(f"  the drafter proposes {len(r.draft)} tokens: {words}")
        elif phase == "verify":
            lines.append(f"  the target scores {len(r.draft) + 1} positions in ONE forward pass "
                         f"(the last context token + {len(r.draft)} drafts)")
            lines.append(f"  KV blocks in use during the pass: {r.blocks_at_verify} (block size {self.block_size})")
        elif phase == "accept":
            kept, rejected = words[:r.accepted], words[r.accepted:]
            kind = "bonus (all drafts accepted)" if r.accepted == len(r.draft) else "correction"
            lines.append(f"  accepted {r.accepted} of {len(r.draft)}: {kept}")
            lines.append(f"  rejected: {rejected}")
            lines.append(f"  {kind} token from the target: {self._words([r.next_token])[0]!r}")
            lines.append(f"  this round emits {r.accepted + 1} tokens for one target step")
        else:
            lines.append(f"  rollback: the K/V of {len(r.draft) - r.accepted} rejected tokens are dropped; "
                         f"blocks freed: {r.blocks_freed or 'none'}")
            lines.append(f"  KV blocks in use: {r.blocks_at_verify} -> {r.blocks_in_use}")
        return lines

    # ---- renderings ----------------------------------------------------------------------------
    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.describe())

    def html(self) -> str:
        rnd, phase, r = self._where()
        chip = "display:inline-block;margin:2px;padding:2px 6px;border-radius:4px;font-family:monospace"
        colors = {"draft": "#e2e3e5", "ok": "#d1f2d6", "bad": "#f8d7da", "next": "#cfe2ff"}
        shown = []
        for i, w in enumerate(self._words(r.draft)):
            c = colors["draft"] if phase in ("draft", "verify") else colors["ok"] if i < r.accepted else colors["bad"]
            deco = "line-through" if phase == "rollback" and i >= r.accepted else "none"
            shown.append(f"<span style='{chip};background:{c};text-decoration:{deco}'>{html.escape(w)}</span>")
        if phase in ("accept", "rollback"):
            shown.append(f"<span style='{chip};background:{colors['next']}'>"
                         f"{html.escape(self._words([r.next_token])[0])}</span>")
        lines = "".join(f"<div>{html.escape(line)}</div>" for line in self.describe())
        return (f"<div><div class='llmsys-speculative-text' style='font-family:monospace'>{lines}</div>"
                f"<div style='margin-top:6px'>{''.join(shown)}</div></div>")

    def widget(self):
        import ipywidgets as W

        slider, controls = step_controls(self.step, 1, self.num_steps,
                                         lambda step: step != self.step and self.set_step(step))
        self._slider, self._html = slider, W.HTML()
        box = W.VBox([controls, self._html])
        box.add_class("llmsys-speculative-view")
        self._widget = box
        self._refresh()
        return box

    def _refresh(self) -> None:
        if self._widget is not None:
            self._slider.value = self.step
            self._html.value = self.html()
