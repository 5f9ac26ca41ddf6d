"""Estimator controls: pick a model, batch, sequence length, dtype and GPU; see the numbers.

Like every view in the kit, the state lives in plain attributes, ``text()`` renders it as
a table that nbval compares, and the widget (controls, charts as an Image, the table as
HTML) is one rendering of it.
"""
from __future__ import annotations

import html

from ..estimators.attention_path import model_attention_path
from ..estimators.flops import flop_distribution, forward_flops_table, total_flops
from ..estimators.memory import kv_bytes_per_token, max_batch, training_memory, weight_bytes
from ..estimators.params import param_count
from ..estimators.roofline import GPUS, decode_cost, get_gpu, prefill_cost
from ..presets import PRESETS, get_preset
from .base import View, figure_png, image_widget

GiB = 2**30
SEQ_CHOICES = [2**k for k in range(7, 16)]          # 128 .. 32768
BATCH_CHOICES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class EstimatorView(View):
    def __init__(self, model: str = "llama-2-7b", batch: int = 1, seq: int = 4096, dtype: str = "bf16",
                 gpu: str = "A100-80GB"):
        self.state = {}
        self._widget = None
        self.update(model=model, batch=batch, seq=seq, dtype=dtype, gpu=gpu)

    def update(self, **changes) -> None:
        """Change any of model, batch, seq, dtype, gpu (validated) and refresh the views."""
        new = {**self.state, **changes}
        get_preset(new["model"])
        get_gpu(new["gpu"])
        kv_bytes_per_token(get_preset(new["model"]), new["dtype"])
        if new["batch"] <= 0 or new["seq"] <= 0:
            raise ValueError(f"batch and seq must be positive, got {new['batch']} and {new['seq']}")
        self.state = new
        self._refresh()

    def numbers(self) -> dict:
        s = self.state
        cfg, gpu = get_preset(s["model"]), get_gpu(s["gpu"])
        rows = forward_flops_table(cfg, s["batch"], s["seq"])
        attention = model_attention_path(cfg, "mixed", capability=gpu.capability)
        mem = training_memory(cfg, s["batch"], s["seq"], path=attention)     # AdamW, bf16 autocast, this GPU
        try:
            fit = max_batch(cfg, gpu.memory, s["seq"], s["dtype"])
        except ValueError:
            fit = 0
        return {"params": param_count(cfg), "forward_tflops": total_flops(rows, cfg) / 1e12,
                "shares": flop_distribution(rows, cfg), "memory": mem,
                "weights_gib": weight_bytes(cfg, s["dtype"]) / GiB,
                "kv_kib_per_token": kv_bytes_per_token(cfg, s["dtype"]) / 1024, "max_batch": fit,
                "prefill": prefill_cost(cfg, s["batch"], s["seq"], s["dtype"]),
                "decode": decode_cost(cfg, s["batch"], s["seq"], s["dtype"]), "gpu": gpu,
                "attention": attention,
                "context_warning": (f"seq {s['seq']} > the model's context {cfg.max_position_embeddings}"
                                    if s["seq"] > cfg.max_position_embeddings else "")}

    def text(self) -> str:
        s, n = self.state, self.numbers()
        m, g = n["memory"], n["gpu"]
        shares = ", ".join(f"{k} {v:.1f}%" for k, v in n["shares"].items())
        alive = " + ".join(f"{k.replace('_', ' ')} {v / GiB:.1f}" for k, v in m.alive_at_peak().items())
        moment = m.peak_moment()
        a = n["attention"]
        return "\n".join([
            f"{s['model']}: batch {s['batch']}, seq {s['seq']}, {s['dtype']}, {s['gpu']}"
            + (f"   WARNING: {n['context_warning']}" if n["context_warning"] else ""),
            f"  parameters              {n['params']:>16,}",
            f"  forward FLOPs           {n['forward_tflops']:>13.2f} TF   (forward only, embedding lookup not counted: {shares})",
            f"  training memory (AdamW, mixed): peak {m.peak / GiB:.1f} GiB at the {moment} = {alive} GiB "
            f"(gradients {m.gradients / GiB:.1f} GiB come later, when the activations are gone)",
            f"  attention (training)    SDPA {a.backend} ({'keeps the s x s probabilities' if a.stores_scores else 'no s x s matrix kept'})",
            f"  inference weights       {n['weights_gib']:>13.2f} GiB",
            f"  KV cache per token      {n['kv_kib_per_token']:>13.1f} KiB",
            f"  max batch on {g.name:<10} {n['max_batch']:>10} sequences of {s['seq']} tokens",
            f"  arithmetic intensity    prefill {n['prefill'].intensity:.1f} ({n['prefill'].bound(g)}-bound), "
            f"decode {n['decode'].intensity:.1f} ({n['decode'].bound(g)}-bound), ridge {g.ridge:.1f} FLOPs/byte",
        ])

    def figure(self):
        from matplotlib.figure import Figure

        n = self.numbers()
        fig = Figure(figsize=(9, 3.2))
        ax1, ax2 = fig.subplots(1, 2)
        shares = n["shares"]
        ax1.barh(list(shares), list(shares.values()), color="tab:blue")
        ax1.set_xlabel("share of forward FLOPs (%)")
        ax1.set_ylabel("layer type")
        ax1.set_title(f"{n['forward_tflops']:.1f} TFLOPs forward (no embedding)")
        for y, v in enumerate(shares.values()):
            ax1.text(v, y, f" {v:.2f}%", va="center", fontsize=8)
        ax1.set_xlim(0, 118)
        m = n["memory"]
        phases = {   # the two moments that compete for the peak (TrainingMemory.end_of_forward / optimizer_step)
            "end of\nforward": {"weights": m.weights, "optimizer": m.optimizer, "bf16 copies": m.weight_copies,
                                 "activations": m.activations + max(m.logits_transient, m.attention_transient)},
            "optimizer\nstep": {"weights": m.weights, "optimizer": m.optimizer, "gradients": m.gradients},
        }
        colors = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer": "#55a868",
                  "bf16 copies": "#8172b3", "activations": "#c44e52"}
        seen = set()
        for phase, parts in phases.items():
            left = 0.0
            for label, value in parts.items():
                ax2.barh([phase], [value / GiB], left=left, color=colors[label],
                         label=None if label in seen else label)
                seen.add(label)
                left += value / GiB
        ax2.axvline(n["gpu"].memory / GiB, color="k", ls="--", lw=1, label=f"{n['gpu'].name} memory")
        ax2.set_xlabel("memory (GiB)")
        ax2.set_ylabel("moment of the step")
        ax2.set_title(f"training memory: peak {m.peak / GiB:.1f} GiB")
        ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        return figure_png(self.figure())

    def widget(self):
        import ipywidgets as W

        s = self.state
        controls = {
            "model": W.Dropdown(options=list(PRESETS), value=s["model"], description="model"),
            "batch": W.SelectionSlider(options=BATCH_CHOICES, value=s["batch"], description="batch"),
            "seq": W.SelectionSlider(options=SEQ_CHOICES, value=s["seq"], description="sequence"),
            "dtype": W.Dropdown(options=["fp32", "bf16", "fp16", "fp8"], value=s["dtype"], description="dtype"),
            "gpu": W.Dropdown(options=list(GPUS), value=s["gpu"], description="GPU"),
        }
        for key, control in controls.items():
            control.observe(lambda ch, key=key: ch["new"] != self.state[key] and self.update(**{key: ch["new"]}),
                            names="value")
        self._controls = controls
        self._image = image_widget()
        self._table = W.HTML()
        box = W.VBox([W.HBox([controls["model"], controls["dtype"], controls["gpu"]]),
                      W.HBox([controls["batch"], controls["seq"]]), self._image, self._table])
        box.add_class("llmsys-estimator-view")
        self._widget = box
        self._refresh()
        return box

    def _refresh(self) -> None:
        if self._widget is None:
            return
        for key, control in self._controls.items():  # controls follow state set from code too
            if self.state[key] in control.options:
                control.value = self.state[key]
        self._table.value = f"<pre class='llmsys-state'>{html.escape(self.text())}</pre>"
        self._image.value = self.png()
