"""Model configurations: one dataclass that the estimators, the model and the lessons share."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .validate import ConfigError, check_heads


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer (LLaMA family by default)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    num_kv_heads: int | None = None        # None: same as num_heads (MHA); fewer: GQA; 1: MQA
    head_dim: int | None = None            # None: hidden_size // num_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    norm: str = "rmsnorm"                  # "rmsnorm" (LLaMA) or "layernorm" (original transformer)
    activation: str = "swiglu"             # "swiglu" (LLaMA) or "relu" / "gelu" (two-matrix MLP)
    bias: bool = False                     # biases in the attention and MLP projections (OPT, GPT-2)
    positions: str = "rope"                # "rope" or "learned" (a table of max_position_embeddings rows)
    position_offset: int = 0               # extra rows in a learned table (OPT keeps 2)
    arch: str = "llama"                    # transformers class of the reference model: llama, mistral, opt, gpt2
    name: str = "custom"

    def __post_init__(self):
        for f in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                  "max_position_embeddings"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{f} must be a positive int, got {value!r}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"ModelConfig.hidden_size = {self.hidden_size} is not divisible by "
                    f"num_heads = {self.num_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        check_heads(self.num_heads, self.num_kv_heads)
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"ModelConfig.norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.activation not in ("swiglu", "relu", "gelu"):
            raise ConfigError(
                f"ModelConfig.activation must be 'swiglu', 'relu' or 'gelu', got {self.activation!r}")
        if self.positions not in ("rope", "learned"):
            raise ConfigError(f"ModelConfig.positions must be 'rope' or 'learned', got {self.positions!r}")
        if self.arch not in ARCHS:
            raise ConfigError(f"ModelConfig.arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim = {self.head_dim} must be even for RoPE")

    @property
    def gqa_group_size(self) -> int:
        """Query heads served by each K/V head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf_config, name: str | None = None) -> "ModelConfig":
        """From a transformers config: Llama-family (Llama, Mistral, ...), OPT or GPT-2."""
        from .hf_configs import from_opt_or_gpt2

        get = lambda key, default=None: getattr(hf_config, key, default)  # noqa: E731
        model_type = get("model_type", "llama")
        if model_type in ("opt", "gpt2"):
            return from_opt_or_gpt2(cls, hf_config, name)
        # Llama-family biases: attention_bias on q/k/v/o, mlp_bias on gate/up/down. ModelConfig has
        # one switch for both, so a config with only one of them is refused rather than miscounted.
        attention_bias, mlp_bias = bool(get("attention_bias", False)), bool(get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ConfigError(f"{model_type} config has attention_bias={attention_bias} but mlp_bias={mlp_bias}; "
                              "ModelConfig.bias covers both together, so this mix is not supported")
        return cls(
            bias=attention_bias,
            arch="mistral" if model_type == "mistral" else "llama",
            hidden_size=get("hidden_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=get("num_attention_heads"),
            num_kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
            head_dim=get("head_dim"),
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            max_position_embeddings=get("max_position_embeddings", 4096),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf_config),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            name=name or get("name_or_path") or "from_hf",
        )

    def to_hf(self):
        """A transformers config of this shape, for random-init reference models."""
        from .hf_configs import to_opt_or_gpt2

        if self.arch in ("opt", "gpt2"):
            return to_opt_or_gpt2(self)
        if self.norm != "rmsnorm" or self.activation != "swiglu" or self.positions != "rope":
            raise ConfigError("a Llama-family config needs norm='rmsnorm', activation='swiglu', positions='rope'")
        from transformers import LlamaConfig, MistralConfig

        return (MistralConfig if self.arch == "mistral" else LlamaConfig)(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.bias, mlp_bias=self.bias,
        )


def _rope_theta(hf_config) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        params = getattr(hf_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


ARCHS = ("llama", "mistral", "opt", "gpt2")
FIELD_NAMES = tuple(f.name for f in fields(ModelConfig))
