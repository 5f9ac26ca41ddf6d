"""Count the FLOPs of a real model with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode intercepts every operator and counts matrix products (mm, addmm, bmm and
the attention kernels) at 2 m n h FLOPs. It does not count softmax, norms, activations or
residual adds. Some transformers versions (5.17, for one) build RoPE's angle table
positions x frequencies with a small outer-product matmul; that is bookkeeping, not part of
the lecture's table, so it is reported separately.
"""
from __future__ import annotations

import torch


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV of a fused SDPA kernel over all s_q x s_k pairs, with fewer K/V heads allowed
    (enable_gqa: each K/V head serves n / n_kv query heads). PyTorch before 2.13 rejects GQA shapes."""
    b, n, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * n * s_q * s_k * d + 2 * b * n * s_q * s_k * d_v


def count_model_flops(model, input_ids: torch.Tensor) -> dict:
    """{'total': all counted FLOPs, 'rope_table': those inside rotary-embedding modules,
    'model': total - rope_table}, for one forward pass without gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    fused = {aten._scaled_dot_product_flash_attention: _sdpa_forward_flops,
             aten._scaled_dot_product_efficient_attention: _sdpa_forward_flops,
             aten._scaled_dot_product_cudnn_attention: _sdpa_forward_flops}
    counter = FlopCounterMode(display=False, custom_mapping=fused)
    with counter, torch.no_grad():
        model(input_ids=input_ids)
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    rope = sum(sum(ops.values()) for name, ops in counts.items()
               if name.endswith("rotary_emb") and not any(other.startswith(name + ".") and other != name
                                                          for other in counts if other.endswith("rotary_emb")))
    return {"total": total, "rope_table": rope, "model": total - rope}
