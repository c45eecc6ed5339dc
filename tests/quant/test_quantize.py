"""Weight-only quantisation (smollm2/quantize.py): exact round trips, kernels against float maths, the fallback
where a kernel is missing, and on the real weights the cost of each mode in perplexity and greedy agreement."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import TINYSHAKESPEARE, require
from smollm2.config import Config
from smollm2.inference.generate import generate
from smollm2.model import SmolLM2
from smollm2.quant import quantize
from smollm2.quant.quantize import (
    QUANTIZED,
    BF16Linear,
    Int4Linear,
    Int8Linear,
    Q4Linear,
    Q8Linear,
    Quantization,
    dequantize_int4,
    dequantize_int8,
    kernel_available,
    quantize_int4,
    quantize_int8,
    quantize_model,
    weight_bytes_per_token,
)


def tiny_model(config: Config) -> SmolLM2:
    model = SmolLM2(config)
    model.init_weights()
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---- the number formats ---------------------------------------------------------------------------------


def test_int8_round_trip_is_within_half_a_step() -> None:
    w = torch.randn(48, 96) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different scales
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.shape == (48,)
    assert torch.equal(codes.abs().amax(dim=1), torch.full((48,), 127, dtype=torch.int8))  # each row uses the range
    error = (dequantize_int8(codes, scales) - w).abs()
    assert (error <= scales[:, None] / 2 * (1 + 1e-5)).all()
    # Per group of 32 (Q8_0): each group uses the range, and the error is within half of its own step.
    codes, scales = quantize_int8(w, 32)
    assert scales.shape == (48, 3)
    assert (codes.reshape(48, 3, 32).abs().amax(dim=-1) == 127).all()
    error = (dequantize_int8(codes, scales) - w).abs()
    assert (error <= scales.repeat_interleave(32, dim=1) / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_round_trip_is_within_half_a_step(group_size: int) -> None:
    w = torch.randn(40, 192) + torch.linspace(-3, 3, 192)  # groups with an offset: asymmetric ranges
    codes, scales, zeros = quantize_int4(w, group_size)
    assert codes.shape == w.shape and int(codes.min()) == 0 and int(codes.max()) == 15
    error = (dequantize_int4(codes, scales, zeros) - w).abs()
    step = scales.repeat_interleave(group_size, dim=1)
    assert (error <= step / 2 * (1 + 1e-4)).all()


def test_int4_requantising_int4_values_is_exact() -> None:
    # Weights that are already 4-bit per group (as the bundled Q4_1 GGUF's) come back unchanged.
    codes = torch.randint(0, 16, (16, 64), dtype=torch.int32)
    codes[:, ::32] = 0
    codes[:, 1::32] = 15  # every group spans the whole code range, as llama.cpp's min/max rule makes it
    low, step = torch.randn(16, 2), torch.rand(16, 2) + 0.1
    w = (codes.reshape(16, 2, 32) * step[..., None] + low[..., None]).reshape(16, 64)
    again, scales, zeros = quantize_int4(w, 32)
    assert torch.equal(again, codes)
    torch.testing.assert_close(dequantize_int4(again, scales, zeros), w, rtol=0, atol=1e-5)


def test_int4_group_must_divide_the_input_width() -> None:
    with pytest.raises(ValueError, match="group size 64 does not divide in_features=96"):
        quantize_int4(torch.randn(8, 96), 64)


# ---- the kernels ----------------------------------------------------------------------------------------
# (smollm2's own kernels, each op on its own, are tested in test_kernels.py)


def vnni_or_skip() -> None:
    from smollm2.quant import kernels

    if not kernels.available():
        pytest.skip("smollm2's VNNI kernels are not built here (python -m smollm2.kernels) or the CPU lacks VNNI")


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_matches_dequantized_matmul(rows: int) -> None:
    if not kernel_available("int8"):
        pytest.skip("torch's int8 weight-only kernel does not run here")
    w, x = torch.randn(96, 64), torch.randn(rows, 64).to(torch.bfloat16)
    layer = Int8Linear.from_float(w)
    expected = x.float() @ layer.dequantized().T  # the same weight in float32
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)
    assert layer(x).dtype == torch.bfloat16 and layer(x.float()).dtype == torch.float32


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_matches_dequantized_matmul(group_size: int) -> None:
    if not kernel_available("int4", group_size):
        pytest.skip("torch's int4 weight-only kernel does not run here")
    w, x = torch.randn(96, 128), torch.randn(3, 128).to(torch.bfloat16)
    codes, scales, zeros = quantize_int4(w, group_size)
    # The kernel takes scales and zeros in bf16: compare against the weight it actually holds.
    expected_w = dequantize_int4(codes, scales.to(torch.bfloat16), zeros.to(torch.bfloat16))
    layer = Int4Linear.from_float(w, group_size)
    torch.testing.assert_close(layer(x).float(), x.float() @ expected_w.T, rtol=2e-2, atol=3e-2)


# ---- the model transform --------------------------------------------------------------------------------

BACKENDS = ["vnni", "torch"]


def force_backend(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run quantize_model on one set of kernels: ours (skipped if not built) or torch's."""
    from smollm2.quant import kernels

    if name == "vnni":
        vnni_or_skip()
    else:
        monkeypatch.setattr(kernels, "available", lambda: False)
        if not kernel_available("int8") or not kernel_available("int4"):
            pytest.skip("torch's weight-only kernels do not run here")


def rounded_copy(model: SmolLM2, mode: str, backend: str) -> SmolLM2:
    """A float32 copy whose linear weights are mode's rounded ones (the output head's int8), not the embedding."""
    rounded = copy.deepcopy(model)
    head = rounded.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone())  # untie: only the head is quantised
    scale_dtype = torch.float16 if backend == "vnni" else torch.bfloat16  # what each int4 kernel keeps
    for module in rounded.modules():
        if isinstance(module, nn.Linear):
            w = module.weight.detach()
            if mode == "int8" or module is head:  # vnni: Q8_0 (groups of 32, fp16); torch: per channel, bf16
                codes, scales = quantize_int8(w, 32 if backend == "vnni" else None)
                module.weight.data = dequantize_int8(codes, scales.to(scale_dtype))
            else:
                codes, scales, zeros = quantize_int4(w, 32)
                module.weight.data = dequantize_int4(codes, scales.to(scale_dtype), zeros.to(scale_dtype))
    return rounded


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_replaces_every_linear(tiny_config: Config, mode: str, backend: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    force_backend(backend, monkeypatch)
    model = tiny_model(tiny_config)
    embedding = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = rounded_copy(model, mode, backend)(ids)  # fp32 maths on the rounded weights
        quantize_model(model, mode)
        got = model(ids)
    assert model.quantization == Quantization(mode, backend)
    kinds = {"vnni": (Q8Linear, Q4Linear), "torch": (Int8Linear, Int4Linear)}[backend]
    kind = kinds[0] if mode == "int8" else kinds[1]
    linears = [m for m in model.modules() if isinstance(m, kind) and m is not model.lm_head]
    # the 7 projections and the 2 fused ones (qkv, gate_up) of each block; the output head is int8
    assert len(linears) == 9 * tiny_config.num_hidden_layers
    assert isinstance(model.lm_head, kinds[0])
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    x = torch.randn(3, tiny_config.hidden_size).to(torch.bfloat16)
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        separate = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        assert torch.equal(attn.qkv_proj(x), separate)  # the same codes and scales, one matmul
        assert torch.equal(mlp.gate_up_proj(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1))
    # The embedding keeps its own (bf16) matrix; the head got a quantised copy of it.
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.model.embed_tokens.weight.float(), embedding, rtol=1e-2, atol=1e-3)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert got.dtype == torch.float32  # the output projection gives float32 logits (PackedLinear.float_input)
    # What is left is bf16 activations (and, on our kernels, int8 activations in the matmuls).
    assert rel_err(got, expected) < (0.03 if backend == "torch" else 0.05)


def test_fallback_when_no_kernel_runs(tiny_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every kernel missing (our kernels not built, torch's raising, as on a CPU without them), layers
    become bf16 linears holding the same rounded weights: the results match the torch-kernel path's."""
    from smollm2.quant import kernels

    ids = torch.randint(0, tiny_config.vocab_size, (1, 12))
    reference = tiny_model(tiny_config)
    monkeypatch.setattr(kernels, "available", lambda: False)
    for mode in ("int8", "int4"):
        with torch.no_grad():
            fast = quantize_model(copy.deepcopy(reference), mode)
            fast_logits = fast(ids).float()
        assert fast.quantization.backend == "torch"
        with monkeypatch.context() as patch:
            def missing(*args: object) -> torch.Tensor:
                raise RuntimeError("no kernel for this CPU")

            patch.setattr(quantize, "_int8_mm", missing)
            patch.setattr(quantize, "_int4_mm", missing)
            assert not kernel_available(mode)
            with torch.no_grad():
                slow = quantize_model(copy.deepcopy(reference), mode)
                slow_logits = slow(ids).float()
        assert slow.quantization.backend == "bf16"
        assert not any(isinstance(m, QUANTIZED) for m in slow.modules())
        assert all(m.weight.dtype == torch.bfloat16 for m in slow.modules() if isinstance(m, nn.Linear))
        assert rel_err(slow_logits, fast_logits) < 0.02
    # The fallback's weights are the quantised ones, not the originals.
    slow_w = slow.model.layers[0].mlp.down_proj.weight.float()
    original = reference.model.layers[0].mlp.down_proj.weight.detach()
    assert not torch.allclose(slow_w, original.to(torch.bfloat16).float())
    codes, scales, zeros = quantize_int4(original, 32)
    expected = dequantize_int4(codes, scales.to(torch.bfloat16), zeros.to(torch.bfloat16))
    torch.testing.assert_close(slow_w, expected.to(torch.bfloat16).float(), rtol=0, atol=0)
    head_codes, head_scales = quantize_int8(reference.lm_head.weight.detach())
    expected_head = dequantize_int8(head_codes, head_scales.to(torch.bfloat16)).to(torch.bfloat16).float()
    torch.testing.assert_close(slow.lm_head.weight.float(), expected_head, rtol=0, atol=0)


def test_bf16_mode_on_our_kernel_and_without(tiny_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 runs our packed bf16 layers (fused like the integer modes) where the CPU has AVX-512 BF16, plain
    bf16 linears elsewhere: the same weights, the same logits up to rounding."""
    from smollm2.quant import kernels

    vnni_or_skip()
    if not kernels.bf16_supported():
        pytest.skip("this CPU has no AVX-512 BF16")
    reference = tiny_model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    with torch.no_grad():
        packed = quantize_model(copy.deepcopy(reference), "bf16")
        got = packed(ids)
        monkeypatch.setattr(kernels, "bf16_supported", lambda: False)
        plain = quantize_model(copy.deepcopy(reference), "bf16")
        expected = plain(ids)
    assert packed.quantization.backend == "vnni" and plain.quantization.backend == "torch"
    assert isinstance(packed.lm_head, BF16Linear) and isinstance(packed.model.layers[0].self_attn.qkv_proj, BF16Linear)
    assert not any(isinstance(m, nn.Linear) for m in packed.modules())
    assert all(m.weight.dtype == torch.bfloat16 for m in plain.modules() if isinstance(m, nn.Linear))
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # plain bf16 keeps the tie
    # our packed output projection gives float32 logits (PackedLinear.float_input); a plain bf16 one, bf16
    assert got.dtype == torch.float32 and expected.dtype == torch.bfloat16 and rel_err(got, expected) < 0.02
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(packed, "int8")


def test_int4_head_option(tiny_config: Config) -> None:
    model = quantize_model(tiny_model(tiny_config), "int4", head="int4")
    assert isinstance(model.lm_head, (Q4Linear, Int4Linear)) or model.quantization.backend == "bf16"
    with pytest.raises(ValueError, match="head must be 'int8' or 'int4'"):
        quantize_model(tiny_model(tiny_config), "int4", head="bf16")


def test_invalid_modes(tiny_config: Config) -> None:
    model = tiny_model(tiny_config)
    with pytest.raises(ValueError, match="unknown quantize mode 'int2'"):
        quantize_model(model, "int2")
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_model(model, "int4", group_size=128)
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(model, "int4")


def test_weight_bytes_per_token(tiny_config: Config) -> None:
    model = tiny_model(tiny_config)
    c = tiny_config
    linear = c.num_hidden_layers * (2 * c.hidden_size**2 + 2 * c.hidden_size * c.num_key_value_heads * c.head_dim
                                    + 3 * c.hidden_size * c.intermediate_size)
    norms = (2 * c.num_hidden_layers + 1) * c.hidden_size
    head, row, rope = c.vocab_size * c.hidden_size, c.hidden_size, 2 * c.head_dim
    assert weight_bytes_per_token(model) == 4 * (linear + norms + head + row + rope)
    quantize_model(model, "bf16")
    assert weight_bytes_per_token(model) == 2 * (linear + norms + head + row + rope)


# ---- the real weights: what each mode costs ---------------------------------------------------------------

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def quantized(real) -> dict[str, SmolLM2]:
    model, _ = real
    return {mode: quantize_model(copy.deepcopy(model), mode) for mode in ("bf16", "int8", "int4")}


@pytest.fixture(scope="module")
def heldout_ids(real) -> torch.Tensor:
    """1024 tokens from the end of tinyshakespeare, a slice nothing else here trains or tunes on."""
    _, tokenizer = real
    text = require(TINYSHAKESPEARE).read_text(encoding="utf-8")[-9000:]
    return torch.tensor(tokenizer.encode(text, allow_special=False)[:1024])


@pytest.mark.slow
def test_int4_runs_the_ggufs_own_blocks(real) -> None:
    """The bundled weights are Q4_1 blocks of 32 (and a Q8_0 embedding): quantising them again with groups of
    32 gives back the file's weights exactly with fp16 scales (our kernels' format), and up to bf16 rounding of
    the scales with torch's kernel; int8 per channel (torch's int8 format) is much further off."""
    model, _ = real
    w = model.model.layers[3].mlp.down_proj.weight.detach()
    codes, scales, zeros = quantize_int4(w, 32)
    assert rel_err(dequantize_int4(codes, scales.half(), zeros.half()), w) < 1e-6
    int4_bf16 = rel_err(dequantize_int4(codes, scales.to(torch.bfloat16), zeros.to(torch.bfloat16)), w)
    int8_per_channel = rel_err(dequantize_int8(*quantize_int8(w)), w)
    assert int4_bf16 < 0.004 < int8_per_channel
    embedding = model.model.embed_tokens.weight.detach()
    codes, scales = quantize_int8(embedding, 32)
    assert rel_err(dequantize_int8(codes, scales.half()), embedding) < 1e-6


@pytest.mark.slow
def test_perplexity_cost_of_each_mode(real, quantized, heldout_ids) -> None:
    """Stated bounds (BENCHMARKS.md): every mode within 2% of fp32 perplexity."""
    from smollm2.eval.perplexity import perplexity

    model, _ = real
    base = perplexity(model, heldout_ids, seq_len=512, batch_size=1).ppl
    costs = {mode: perplexity(m, heldout_ids, seq_len=512, batch_size=1).ppl / base - 1
             for mode, m in quantized.items()}
    assert 5 < base < 100, base  # the measurement means something: real text, a real model
    assert abs(costs["bf16"]) < 0.02, costs
    assert abs(costs["int8"]) < 0.02, costs
    assert abs(costs["int4"]) < 0.02, costs


@pytest.mark.slow
def test_greedy_agreement_with_fp32(real, quantized) -> None:
    """Along fp32's greedy continuation of each prompt, each mode picks fp32's next token at >= 90% of the
    positions (teacher-forced: every position sees the same history, so one near-tie does not derail the
    rest). Stated in BENCHMARKS.md, measured by benchmarks/quant_quality.py."""
    model, tokenizer = real
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    reference = [list(generate(model, p, max_new_tokens=NEW_TOKENS, ignore_eos=True)) for p in prompts]
    assert all(len(r) == NEW_TOKENS for r in reference)
    with torch.inference_mode():
        for mode, m in quantized.items():
            matches = 0
            for prompt, continuation in zip(prompts, reference, strict=True):
                ids = torch.tensor([prompt + continuation])
                h = m.hidden(ids)[0, len(prompt) - 1 : -1]  # the positions predicting each continuation token
                matches += int((m.lm_head(h).argmax(-1) == torch.tensor(continuation)).sum())
            assert matches / (NEW_TOKENS * len(prompts)) >= 0.9, (mode, matches)
