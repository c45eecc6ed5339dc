"""Weights in the original's layout: safetensors files with Hugging Face's keys, read and written.

Our parameter names are the original's (`model.layers.0.self_attn.q_proj.weight`, ...), so the key table is
the identity; what this module adds is checking. A checkpoint with a missing, unexpected or mis-shaped tensor
is an error naming the tensor and both shapes, and a tied model's `lm_head.weight` may be absent (the original
ships none). Loading never unpickles anything: safetensors holds raw tensors and a JSON header.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import Config
from .model import SmolLM2

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every key of the original checkpoint and its shape (lm_head.weight only when untied).

    Computed from the config's numbers, not by building a model: the config may be untrusted and is checked
    against the file's tensors (check_config_fits) before anything the size of the model exists.
    """
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    block = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (d, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, d),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in block.items()})
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def check_config_fits(config: Config, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise a ValueError naming the config field whose value the file's tensor shapes contradict.

    Runs before anything is sized by the config, and in time proportional to the file, so a hostile config.json
    (a million layers, a vocabulary of 10**12) is a one-line error rather than a hang or a huge allocation.
    The sizes the rest follows from are checked here; check_state_dict then names any other mis-shaped tensor.
    """
    layers = {int(m.group(1)) for key in shapes if (m := _LAYER_KEY.match(key))}
    n_layers = max(layers) + 1 if layers else 0
    implied: list[tuple[str, int, str]] = [("num_hidden_layers", n_layers, f"the weights hold {n_layers} layers")]

    def from_shape(key: str, dim: int, field: str) -> None:
        shape = shapes.get(key)
        if shape is not None and len(shape) > dim:
            implied.append((field, shape[dim], f"{key} has shape {list(shape)}"))

    from_shape("model.embed_tokens.weight", 0, "vocab_size")
    from_shape("model.embed_tokens.weight", 1, "hidden_size")
    from_shape("model.layers.0.mlp.gate_proj.weight", 0, "intermediate_size")
    for field, value, why in implied:
        if getattr(config, field) != value:
            raise ValueError(f"{source}: config field {field}={getattr(config, field)} does not match the weights "
                             f"({why}, implying {field}={value})")


def check_state_dict(state_dict: dict[str, torch.Tensor], config: Config, source: str) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
    check_config_fits(config, {key: tuple(t.shape) for key, t in state_dict.items()}, source)
    expected = expected_shapes(config)
    problems = []
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    for key in sorted(set(expected) - set(state_dict)):
        problems.append(f"missing tensor {key} (expected shape {list(expected[key])})")
    for key in sorted(set(state_dict) - set(expected) - optional):
        problems.append(f"unexpected tensor {key} (shape {list(state_dict[key].shape)})")
    for key in sorted(set(expected) & set(state_dict)):
        if tuple(state_dict[key].shape) != expected[key]:
            problems.append(f"tensor {key} has shape {list(state_dict[key].shape)}, expected {list(expected[key])}")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ValueError(f"{source}: checkpoint does not fit the model:\n  " + "\n  ".join(shown))


def build_model(config: Config, state_dict: dict[str, torch.Tensor], source: str,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> SmolLM2:
    """A model holding exactly these weights (checked), without spending time on a random init first."""
    check_state_dict(state_dict, config, source)
    with torch.device("meta"):
        model = SmolLM2(config)
    # assign: the parameters become the state dict's own tensors, so the weights are never held twice (and
    # ~0.5 GB of fresh memory is not faulted in just to copy into it: ~1 s of a 135M model's load)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    for module in model.modules():  # the rotary tables are not in the state dict: give them memory
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, name, torch.empty_like(buffer, device="cpu"))
    model.init_rope()
    return model.to(device=device, dtype=dtype).eval()


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard a model.safetensors.index.json names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = directory / INDEX_NAME
    if (directory / WEIGHTS_NAME).is_file():
        files = [directory / WEIGHTS_NAME]
    elif index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            files = [directory / name for name in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index_path}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    else:
        raise ValueError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file}: shard named in {INDEX_NAME} does not exist")
        try:
            state_dict.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{file}: not a valid safetensors file ({e})") from None
    return state_dict


def save_pretrained(model: SmolLM2, directory: str | Path, tokenizer=None) -> Path:  # tokenizer: Tokenizer | None
    """Write config.json, generation_config.json, model.safetensors (and tokenizer files) as the original does."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.to_json(directory / "config.json")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del state_dict["lm_head.weight"]  # one matrix, stored once, as in the original
    save_file(state_dict, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
