"""Estimators: parameters, FLOPs, memory, roofline and scaling laws (lesson 02)."""
from .attention_path import AttentionPath, model_attention_path, sdpa_backend
from .flops import (FlopRow, flop_distribution, format_flops_table, forward_flops, forward_flops_table,
                    slide_training_breakdown, total_flops, training_flops)
from .memory import (InferenceMemory, TrainingMemory, activation_bytes, attention_saved_bytes, dtype_bytes,
                     inference_memory, korthikanti_activation_bytes, kv_bytes, kv_bytes_per_token, max_batch,
                     max_batch_inference, training_memory, weight_bytes)
from .params import param_breakdown, param_count
from .roofline import GPUS, StepCost, decode_cost, get_gpu, prefill_cost
from .scaling import chinchilla_loss, compute_optimal

__all__ = [n for n in dir() if not n.startswith("_")]
