"""DeepSeek-V3, connecting the dots (lesson 12): its shape in numbers, multi-head latent attention,
auxiliary-loss-free and node-limited routing, disaggregated serving and multi-token prediction."""
from .mla import MLA, LatentKVCache, MLAConfig, absorbed_attention, absorbed_flops_per_token, hf_cache_kwargs
from .model_config import (DEEPSEEK_V3, DeepSeekV3Shape, attention_variants, forward_flops_per_token,
                           hf_param_count, kv_bytes_per_token, max_batch, mla_params, mtp_params, param_breakdown,
                           training_flops, training_state_bytes, weight_bytes)

__all__ = [n for n in dir() if not n.startswith("_")]
