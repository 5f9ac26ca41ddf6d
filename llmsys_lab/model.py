"""The kit's LLaMA model: embedding, LlamaBlocks, final RMSNorm and LM head.

Module and parameter names follow transformers' LlamaForCausalLM (model.embed_tokens,
model.layers.N..., model.norm, lm_head), so a transformers Llama checkpoint loads into it
with a plain state dict, and its logits and greedy tokens equal transformers' (tests).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .configs import ModelConfig
from .layers import LlamaBlock, RMSNorm, RotaryEmbedding
from .validate import ConfigError, ShapeError

TINY_MODEL_PATH = Path(__file__).resolve().parent / "models" / "llmsys-tiny"


class LlamaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.norm != "rmsnorm" or config.activation != "swiglu" or config.positions != "rope":
            raise ConfigError("LlamaLM builds LLaMA-style models: norm='rmsnorm', activation='swiglu', positions='rope'")
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # RoPE's cos/sin depend on the positions only: computed once per forward here (as transformers'
        # model.rotary_emb), not once per layer; no weights (inv_freq is not in the state dict)
        self.model.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model) -> "LlamaLM":
        """Copy a transformers LlamaForCausalLM (same dtype and device)."""
        p = next(hf_model.parameters())
        model = cls(ModelConfig.from_hf(hf_model.config)).to(device=p.device, dtype=p.dtype)
        model.load_state_dict(hf_model.state_dict(), strict=True)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path = TINY_MODEL_PATH, dtype=torch.float32, device="cpu") -> "LlamaLM":
        """Load a local transformers Llama checkpoint folder (config.json + model.safetensors)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint folder")
        cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(path), name=path.name)
        model = cls(cfg)
        state = load_file(path / "model.safetensors")
        if cfg.tie_word_embeddings:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        model.load_state_dict(state, strict=True)
        return model.to(device=device, dtype=dtype).eval()

    # ---- forward ---------------------------------------------------------------------------
    def check_input(self, input_ids: torch.Tensor, kv_cache=None) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold integer token ids (int64), got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ShapeError(f"input_ids must have shape (batch, tokens) with tokens >= 1, got {tuple(input_ids.shape)}")
        weight = self.model.embed_tokens.weight
        if input_ids.device != weight.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {weight.device}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}, got values in {lo}..{hi}")
        past = kv_cache.seq_len if kv_cache is not None else 0
        if past + input_ids.shape[1] > self.config.max_position_embeddings:
            raise ShapeError(f"{past} cached + {input_ids.shape[1]} new tokens exceed the model's context of "
                             f"{self.config.max_position_embeddings} tokens")
        if kv_cache is not None:
            kv_cache.check_batch(input_ids.shape[0])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_cache=None) -> torch.Tensor:
        """Logits (B, T, vocab) for the T new tokens.

        attention_mask: (B, past + T), True/1 for real tokens and False/0 for (left) padding;
        positions then count real tokens only, as in transformers. kv_cache: any object with the
        KV interface (llmsys_lab/forward_batch.py): it holds `past` tokens, and every attention
        layer hands it the new tokens' q, k, v (``kv_cache.attend(layer_idx, q, k, v)``).

        A layout with ``own_checks`` (the static cache of compiled decoding, kv_cache.StaticKVCache)
        supplies the positions and the masks itself and checks shapes only (no host sync in the step).
        With a packed layout (``kv_cache.packed``, the serving engine's PackedPagedBatch) the same
        layers run on the packed (N,) token ids as one (1, N, hidden) row: positions come from the
        layout, and the result is (R, vocab), the logits of the layout's ``logit_rows``.
        """
        packed = getattr(kv_cache, "packed", False)
        key_mask = None
        if packed or getattr(kv_cache, "own_checks", False):
            # a layout that carries its own positions and masks (the engine's packed batch, the static
            # cache of compiled decoding): it checks shapes only, without reading device values
            if attention_mask is not None:
                raise ValueError(f"a {type(kv_cache).__name__} carries its own positions and masks: "
                                 "pass no attention_mask")
            kv_cache.check_input(input_ids)
            positions = kv_cache.positions                                 # (N,) packed; (B, T) static
        else:
            self.check_input(input_ids, kv_cache)
            b, t = input_ids.shape
            past = kv_cache.seq_len if kv_cache is not None else 0
            if attention_mask is not None:
                attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
                if tuple(attention_mask.shape) != (b, past + t):
                    raise ShapeError(f"attention_mask must have shape (batch, past + new) = {(b, past + t)}, "
                                     f"got {tuple(attention_mask.shape)}")
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]       # (B, T)
                key_mask = attention_mask[:, None, None, :]                                     # (B, 1, 1, S)
            else:
                positions = torch.arange(past, past + t, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)              # (B, T, hidden); packed: (N, hidden)
        if packed:
            x = x[None]                                     # one row of N tokens: (1, N, hidden)
        rotary = self.model.rotary_emb.cos_sin(positions)                # (cos, sin), shared by every layer
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions=positions, mask=key_mask, kv_cache=kv_cache, layer_idx=i, rotary=rotary)
        if packed:
            rows = kv_cache.logit_rows
            x = x[0] if rows is None else x[0, rows]        # (R, hidden): only the rows that predict
        return self.lm_head(self.model.norm(x))


def load_tiny(device="cpu", dtype=torch.float32):
    """The bundled llmsys-tiny model (kit implementation) and its tokenizer."""
    from transformers import AutoTokenizer

    return LlamaLM.from_pretrained(TINY_MODEL_PATH, dtype, device), AutoTokenizer.from_pretrained(TINY_MODEL_PATH)


def model_card() -> dict:
    """The bundled model's training record (validation loss, samples)."""
    return json.loads((TINY_MODEL_PATH / "training_log.json").read_text())
