"""Model configuration: the architecture of a SmolLM2 model, nothing else.

Field names are those of the original Hugging Face `config.json` (a `LlamaConfig`), so reading and writing
config.json is the identity and a learner can hold ours against the original line by line. Anything in a
config.json that this model does not implement is rejected with an error naming the field, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bound on the rotary tables' size (positions x head_dim): 2**24 floats, 64 MiB per table; 262,144 positions
# at SmolLM2's head_dim of 64, 32 times the published models' context.
MAX_ROPE_TABLE_ELEMENTS = 2**24


@dataclass
class Config:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536  # width of the SwiGLU MLP
    num_hidden_layers: int = 30
    num_attention_heads: int = 9  # query heads
    num_key_value_heads: int = 3  # key/value heads, shared by groups of query heads (GQA)
    max_position_embeddings: int = 8192
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.041666666666666664  # std of the normal init, 1/sqrt(hidden_size) for 135M
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 2

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"config field {name} must be a positive finite number, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        # The model precomputes cos/sin tables of max_position_embeddings x head_dim floats: an untrusted
        # config.json must not make loading allocate gigabytes (or hang) before any weight is read.
        limit = MAX_ROPE_TABLE_ELEMENTS // self.head_dim
        if self.max_position_embeddings > limit:
            need = 2 * 4 * self.max_position_embeddings * self.head_dim
            raise ValueError(
                f"config field max_position_embeddings={self.max_position_embeddings} exceeds the limit {limit} "
                f"for head_dim={self.head_dim} (its rotary tables would take {need / 2**30:.1f} GiB)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---- config.json ----------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Build a Config from a config.json dict, rejecting any setting this model does not implement."""
        data = dict(data)
        # transformers 5 moves rope_theta into rope_parameters; accept both spellings.
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters is not None:
            rope_type = rope_parameters.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"{source}: rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
            if "rope_theta" in rope_parameters:
                data.setdefault("rope_theta", rope_parameters["rope_theta"])
        for name, allowed in _FIXED_FIELDS.items():
            value = data.pop(name, allowed[0])
            if value not in allowed:
                raise ValueError(
                    f"{source}: {name}={value!r} is not supported by this model (supported: {list(allowed)})"
                )
        head_dim = data.pop("head_dim", None)
        for name in _METADATA_FIELDS:
            data.pop(name, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}; this model does not implement them")
        missing = [name for name in _REQUIRED_FIELDS if name not in data]
        if missing:
            raise ValueError(f"{source}: missing required config field(s) {missing}")
        if isinstance(data.get("eos_token_id"), list):
            # generation may list several stop ids; the first one is the model's end-of-text token.
            data["eos_token_id"] = data["eos_token_id"][0] if data["eos_token_id"] else None
        config = cls(**data)
        if head_dim is not None and head_dim != config.head_dim:
            raise ValueError(
                f"{source}: head_dim={head_dim} is not supported; this model uses "
                f"hidden_size / num_attention_heads = {config.head_dim}"
            )
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The original's config.json fields, so transformers reads it as the same LlamaConfig."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **dataclasses.asdict(self),
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "rope_scaling": None,
            "pretraining_tp": 1,
        }

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes alone (tied embeddings counted once)."""
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2  # q, o and k, v projections, no biases
        mlp = 3 * d * self.intermediate_size
        block = attention + mlp + 2 * d  # plus two RMSNorm weights
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * block + embeddings + d


# Settings the original config.json may carry that only have one meaning for this model.
_FIXED_FIELDS: dict[str, tuple] = {
    "hidden_act": ("silu",),
    "rope_scaling": (None,),
    "rope_interleaved": (False,),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "pretraining_tp": (1,),
    "attention_dropout": (0, 0.0),
    "model_type": ("llama",),
}

# Bookkeeping written by transformers and friends: no effect on the architecture.
_METADATA_FIELDS = (
    "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache", "is_llama_config",
    "transformers.js_config", "_name_or_path", "output_attentions", "output_hidden_states",
    "return_dict", "tie_encoder_decoder", "chunk_size_feed_forward", "is_encoder_decoder",
)

_REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)


# ---- presets: the published SmolLM2 sizes, and a tiny one for tests and demos --------------------------------

PRESETS: dict[str, Config] = {
    "135m": Config(),
    "360m": Config(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, initializer_range=0.02,
    ),
    "1.7b": Config(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, rope_theta=130000.0, initializer_range=0.02,
    ),
    "tiny": Config(
        vocab_size=49152, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.125,
    ),
}


def preset(name: str) -> Config:
    """A copy of a named preset (so callers may modify it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
