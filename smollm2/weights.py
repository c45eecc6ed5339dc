"""Weights in the original's layout: safetensors files with Hugging Face's keys, read and written.

Our parameter names are the original's (`model.layers.0.self_attn.q_proj.weight`, ...), so the key table is
the identity; what this module adds is checking. A checkpoint with a missing, unexpected or mis-shaped tensor
is an error naming the tensor and both shapes, and a tied model's `lm_head.weight` may be absent (the original
ships none). Loading never unpickles anything: safetensors holds raw tensors and a JSON header.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config
from .model import SmolLM2

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every key of the original checkpoint and its shape (lm_head.weight only when untied)."""
    with torch.device("meta"):
        model = SmolLM2(config)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def check_state_dict(state_dict: dict[str, torch.Tensor], config: Config, source: str) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
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
