"""LoRA: a fresh adapter changes nothing, only adapters get gradients, PEFT loads ours to our logits, merging."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from smollm2.config import Config
from smollm2.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DroppedLinear,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    merged_state_dict,
    save_adapter,
    set_adapters_enabled,
)
from smollm2.model import SmolLM2
from smollm2.train.config import TrainConfig
from smollm2.train.loop import make_optimizer
from smollm2.weights import save_pretrained


def _model(config: Config) -> SmolLM2:
    torch.manual_seed(1)
    model = SmolLM2(config)
    model.init_weights()
    return model.eval()


def _ids(config: Config, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(5))


def _randomise_adapters(model: SmolLM2) -> None:
    """A trained-looking adapter: B is zero at init, which would make every comparison trivial."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)


def test_fresh_adapter_leaves_the_model_bitwise_unchanged(tiny_config: Config) -> None:
    model = _model(tiny_config)
    ids = _ids(tiny_config)
    with torch.no_grad():
        before = model(ids)
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    assert len(wrapped) == 7 * tiny_config.num_hidden_layers
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model).values())
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(before, after)
    # the base weights keep their keys (the original's layout), the adapters add theirs
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.layers.1.mlp.down_proj.lora_A.weight" in keys


def test_gradients_reach_only_the_adapters_and_the_optimizer_holds_only_them(tiny_config: Config) -> None:
    model = _model(tiny_config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj")))
    model.train()
    logits = model(_ids(tiny_config))
    logits.logsumexp(-1).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{proj}.lora_{ab}.weight" for i in range(2)
                         for proj in ("q_proj", "v_proj") for ab in "AB"}
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name in trainable), name
    # B starts at zero, so A's first gradient is zero; B's is not
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.grad.abs().sum() > 0
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    optimizer.step()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert len(optimizer.state) == len(trainable)  # moments for the adapters only
    for key, value in model.state_dict().items():  # the base did not move
        if "lora_" not in key:
            assert torch.equal(value, base[key]), key


def test_dropout_keeps_its_mask_not_a_copy_and_its_gradients_are_those_of_dropout_then_linear() -> None:
    """A training LoRALinear with dropout computes y = x W^T + s B A (x * keep / (1 - p)) with keep drawn as
    bernoulli(1 - p) from the global generator; autograd through that formula gives the same gradients; and
    what it keeps for backward is x itself, the bool mask and small tensors, never a dropped fp32 copy of x."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, bias=False)
    layer = LoRALinear(base, LoRAConfig(rank=4, alpha=8, dropout=0.25))
    torch.nn.init.normal_(layer.lora_B.weight)  # (B starts at zero, which would hide A's gradient)
    layer.train()
    x = torch.randn(3, 5, 48, requires_grad=True)
    storages: list[tuple[int, torch.dtype, int]] = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: storages.append((t.untyped_storage().data_ptr(), t.dtype, t.numel())) or t, lambda t: t):
        torch.manual_seed(1)
        y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    ours = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())

    torch.manual_seed(1)
    keep = torch.empty(x.shape, dtype=torch.bool).bernoulli_(0.75)
    assert 0 < keep.sum() < keep.numel()
    x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + ((x * keep / 0.75) @ A.T @ B.T) * layer.scaling
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    expected.backward(grad)
    for got, want in zip(ours, (x.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    x_sized = [(ptr, dtype) for ptr, dtype, n in storages if n == x.numel()]
    assert (x.untyped_storage().data_ptr(), torch.float32) in x_sized and (
        any(dtype == torch.bool for _, dtype in x_sized))
    assert [d for p, d in x_sized if d == torch.float32 and p != x.untyped_storage().data_ptr()] == []
    layer.eval()  # no dropout: the plain linear
    assert torch.equal(layer(x), layer.lora_B(layer.lora_A(x)) * layer.scaling + base(x))


def test_dropped_linear_needs_no_gradient_it_is_not_asked_for() -> None:
    x, weight = torch.randn(4, 8), torch.randn(3, 8, requires_grad=True)
    DroppedLinear.apply(x, weight, 0.5).sum().backward()
    assert weight.grad is not None and x.grad is None


def test_merge_equals_the_unmerged_forward(tiny_config: Config) -> None:
    model = _model(tiny_config)
    apply_lora(model, LoRAConfig(rank=4, alpha=16, dropout=0.05))
    _randomise_adapters(model)
    model.eval()  # dropout off
    ids = _ids(tiny_config)
    with torch.no_grad():
        adapted = model(ids)
        set_adapters_enabled(model, False)
        base = model(ids)
        set_adapters_enabled(model, True)
    assert (adapted - base).abs().max() > 1e-3  # the adapter does something
    state = merged_state_dict(model)
    assert not any("lora_" in k for k in state)
    merge_lora(model)
    assert not lora_layers(model)
    with torch.no_grad():
        merged = model(ids)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_saved_adapter_loads_back_bitwise_and_bad_adapters_are_named(tiny_config: Config, tmp_path: Path) -> None:
    model = _model(tiny_config)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "up_proj")))
    _randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    ids = _ids(tiny_config)
    with torch.no_grad():
        expected = model(ids)
    fresh = load_adapter(_model(tiny_config), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(ids), expected)

    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(fresh, LoRAConfig())
    with pytest.raises(ValueError, match="unknown layer"):
        LoRAConfig.parse_targets("q,attn")
    assert LoRAConfig.parse_targets("q, k,gate_proj,q") == ("q_proj", "k_proj", "gate_proj")
    with pytest.raises(ValueError, match="--lora-rank 0"):
        LoRAConfig(rank=0)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="only plain LoRA"):
        load_adapter(_model(tiny_config), tmp_path / "dora")
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 8}))
    (tmp_path / "wide" / ADAPTER_WEIGHTS).write_bytes((tmp_path / "adapter" / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match=r"has shape \(4, 64\), the model needs \(8, 64\)"):
        load_adapter(_model(tiny_config), tmp_path / "wide")


@pytest.mark.hf
def test_peft_loads_our_adapter_onto_transformers_and_gives_our_logits(tiny_config: Config, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = _model(tiny_config)
    save_pretrained(model, tmp_path / "base")
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj")))
    _randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    model.eval()
    ids = _ids(tiny_config)
    with torch.no_grad():
        ours = model(ids)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    with torch.no_grad():
        hf_base = hf(ids).logits
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (ours - hf_base).abs().max() > 1e-3  # the adapter was applied, not ignored
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
