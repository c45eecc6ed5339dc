"""LoRA (Hu et al. 2021): low-rank adapters on the model's linear layers, from torch primitives, in PEFT's format.

A target linear y = x W^T becomes y = x W^T + s * dropout(x) A^T B^T, with A (r, in), B (out, r) and the
scale s = alpha / r. B starts at zero, so a fresh adapter leaves the model exactly as it was (bit for bit);
W is frozen, and only A and B train (2 r (in + out) numbers per layer instead of in x out). The wrapped layer
keeps W under its own name, so the base weights' state-dict keys do not change; the adapter adds
`<layer>.lora_A.weight` and `<layer>.lora_B.weight`.

Saved as PEFT saves a LoRA adapter, so `peft.PeftModel.from_pretrained(transformers_model, DIR)` loads it:
adapter_config.json and adapter_model.safetensors with the keys
`base_model.model.<layer>.lora_A.weight` / `.lora_B.weight` (tests/train/test_lora.py round-trips it). The
arithmetic is PEFT's: A is initialised kaiming-uniform (a = sqrt(5)), B at zero, and the update is added to
the base layer's output in the same order, so the two agree to float rounding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import SmolLM2

# --lora-targets short names -> the linear layers they mean (names as in transformers' Llama, which PEFT matches)
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"--lora-rank {self.rank!r}: must be a positive integer")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--lora-alpha {self.alpha!r}: must be a positive number")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"--lora-dropout {self.dropout!r}: must be in [0, 1)")
        if not self.targets:
            raise ValueError("--lora-targets: name at least one layer")
        unknown = [t for t in self.targets if t not in TARGETS.values()]
        if unknown:
            raise ValueError(f"--lora-targets: unknown layer(s) {unknown} (choose from {', '.join(TARGETS)})")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def parse_targets(cls, text: str) -> tuple[str, ...]:
        """"q,k,v" (short names, or the layers' own names) -> ("q_proj", "k_proj", "v_proj")."""
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in names if t not in TARGETS and t not in TARGETS.values()]
        if unknown or not names:
            raise ValueError(f"--lora-targets {text!r}: unknown layer(s) {unknown} (choose from {', '.join(TARGETS)})")
        return tuple(dict.fromkeys(TARGETS.get(t, t) for t in names))


class DroppedLinear(torch.autograd.Function):
    """dropout(x, p) A^T that keeps only the dropout mask (bool) for backward, not the dropped copy of x.

    nn.Dropout followed by a linear layer keeps both the mask and the dropped fp32 copy of x for backward: with
    seven adapters a block that is seven copies of its inputs (~3 GB at 8 x 512 tokens over 30 blocks), where
    x itself is shared (q, k and v read the same x, gate and up too). Here backward rebuilds the dropped copy
    from x and the mask. The mask is drawn as nn.Dropout draws its own: keep each input with probability 1 - p
    (torch's global generator), scale the kept ones by 1 / (1 - p).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = 1 / (1 - p)
        return F.linear(x * keep * ctx.scale, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, keep = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight) * keep * ctx.scale
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * ctx.scale).reshape(-1, x.shape[-1])
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ dropped
        return grad_x, grad_weight, None


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (the same weight tensor, not a copy) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", base.bias)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, config.rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.rank, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = config.dropout
        self.scaling = config.scaling
        self.enabled = True  # off: the base layer alone (DPO's reference model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        if self.training and self.dropout > 0:
            down = DroppedLinear.apply(x, self.lora_A.weight, self.dropout)
        else:
            down = self.lora_A(x)
        return y + self.lora_B(down) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s B A: the plain linear layer that computes what this one does (dropout aside)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.out_features}, scaling={self.scaling}"


def _targets(model: SmolLM2, names: Sequence[str]) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, parent, attribute, linear) of each targeted layer in the decoder blocks."""
    for block_name, block in model.model.layers.named_children():
        for parent_name, parent in (("self_attn", block.self_attn), ("mlp", block.mlp)):
            for attribute in names:
                layer = getattr(parent, attribute, None)
                if layer is not None:
                    yield f"model.layers.{block_name}.{parent_name}.{attribute}", parent, attribute, layer


def apply_lora(model: SmolLM2, config: LoRAConfig) -> list[str]:
    """Wrap the targeted linears in LoRALinear and freeze every other parameter; returns the wrapped names.

    Fused projections (quantize.fuse_projections) and packed layers cannot be adapted: train on the float model.
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    wrapped = []
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, parent, attribute, layer in _targets(model, config.targets):
        if type(layer) is not nn.Linear:
            raise ValueError(f"{name} is a {type(layer).__name__}, not a float nn.Linear: LoRA trains on the "
                             "float model (load it with quantize='none')")
        if getattr(parent, "qkv_proj", None) is not None or getattr(parent, "gate_up_proj", None) is not None:
            raise ValueError(f"{name}: its projections are fused for speed; LoRA needs the unfused float model")
        setattr(parent, attribute, LoRALinear(layer, config))
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no layer of the model matches the LoRA targets {list(config.targets)}")
    model.lora_config = config  # type: ignore[attr-defined]
    return wrapped


def _name(key: str) -> str:
    """A module or state-dict name without torch.compile's wrapper (a compiled block adds `_orig_mod.`)."""
    return key.replace("._orig_mod.", ".").replace("_orig_mod.", "")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers by name (as in the uncompiled model)."""
    return {_name(name): module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in lora_layers(model).values():
        layer.enabled = enabled


@torch.no_grad()
def merge_lora(model: SmolLM2) -> SmolLM2:
    """Fold every adapter into its base weight and put plain nn.Linears back: the original architecture again."""
    for _, parent, attribute, layer in list(_targets(model, TARGETS.values())):
        if isinstance(layer, LoRALinear):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=layer.weight.device, dtype=layer.weight.dtype)
            plain.weight.copy_(layer.merged_weight())
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
            setattr(parent, attribute, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merged_state_dict(model: SmolLM2) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight (the original's keys only)."""
    layers = lora_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        key = _name(key)
        owner, _, leaf = key.rpartition(".")
        if ".lora_A." in key or ".lora_B." in key:
            continue
        state[key] = layers[owner].merged_weight() if owner in layers and leaf == "weight" else value
    return state


# ---- PEFT's format -------------------------------------------------------------------------------------------


def adapter_state_dict(model: SmolLM2) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's keys: base_model.model.<layer>.lora_A.weight / .lora_B.weight."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def peft_config(config: LoRAConfig, base_model: str | None = None) -> dict[str, object]:
    """adapter_config.json as PEFT writes it for a LoRA adapter on a causal language model."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }


def save_adapter(model: SmolLM2, directory: str | Path, base_model: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's layout) into directory."""
    from safetensors.torch import save_file

    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise ValueError("the model has no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(config, base_model), indent=2) + "\n",
                                            encoding="utf-8")
    return directory


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        kind = data.get("peft_type") if isinstance(data, dict) else None
        raise ValueError(f"{path}: not a LoRA adapter (peft_type {kind!r})")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if data.get(k)]
    if data.get("bias", "none") != "none" or data.get("modules_to_save") or data.get("rank_pattern") \
            or data.get("alpha_pattern") or unsupported:
        raise ValueError(f"{path}: only plain LoRA adapters are supported (no bias, DoRA, rsLoRA, per-layer "
                         "ranks or modules_to_save)")
    targets = data.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets
    try:
        return LoRAConfig(rank=data["r"], alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout", 0)),
                          targets=tuple(targets or ()))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: missing or malformed field ({e})") from None


def load_adapter(model: SmolLM2, directory: str | Path) -> SmolLM2:
    """Add the PEFT LoRA adapter in directory to the model (which must be its base), strictly: every tensor
    present with its shape, none left over."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    apply_lora(model, config)
    path = directory / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad file
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}  # PEFT's in-memory names, if any
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, target in expected.items():
            if tensors[key].shape != target.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, the model needs "
                                 f"{tuple(target.shape)}")
            target.copy_(tensors[key])
    return model
