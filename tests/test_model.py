"""The model against transformers' LlamaForCausalLM on random tiny configs, plus its own invariants."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from smollm2.config import Config, preset
from smollm2.kv_cache import KVCache
from smollm2.model import SmolLM2, apply_rope, precompute_rope, rotate_half
from smollm2.weights import build_model

transformers = pytest.importorskip("transformers")


def hf_twin(config: Config):
    """A randomly initialised transformers model built from OUR config, and our model with its weights."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}
    hf_config = transformers.LlamaConfig(**fields)
    # transformers keeps unknown kwargs silently: check it really received our architecture.
    assert hf_config.num_key_value_heads == config.num_key_value_heads
    assert hf_config.num_attention_heads == config.num_attention_heads
    assert hf_config.tie_word_embeddings == config.tie_word_embeddings
    assert hf_config.rms_norm_eps == config.rms_norm_eps
    assert hf_config.max_position_embeddings == config.max_position_embeddings
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    assert hf.config.rope_parameters["rope_theta"] == config.rope_theta
    assert hf.model.layers[0].self_attn.k_proj.out_features == config.num_key_value_heads * config.head_dim
    state_dict = hf.state_dict()
    if config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        state_dict.pop("lm_head.weight")  # as the original checkpoints ship it
    ours = build_model(config, state_dict, "hf-random")
    return hf, ours


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (6, 2), (8, 2)])  # GQA ratios 1, 3, 4
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("seq_len", [1, 9])
def test_logits_equal_transformers(tiny_config: Config, n_head: int, n_kv_head: int, tied: bool,
                                   seq_len: int) -> None:
    config = dataclasses.replace(tiny_config, hidden_size=96, num_attention_heads=n_head,
                                 num_key_value_heads=n_kv_head, tie_word_embeddings=tied)
    hf, ours = hf_twin(config)
    input_ids = torch.randint(0, config.vocab_size, (2, seq_len))
    with torch.no_grad():
        expected = hf(input_ids).logits
        actual = ours(input_ids)
    assert actual.shape == (2, seq_len, config.vocab_size)
    assert (actual - expected).abs().max().item() <= 1e-5


def test_padded_batch_equals_transformers(tiny_config: Config) -> None:
    """Left padding with an attention mask and per-row positions, as transformers handles it."""
    hf, ours = hf_twin(tiny_config)
    input_ids = torch.randint(3, tiny_config.vocab_size, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(input_ids, attention_mask=mask, positions=positions)
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max().item() <= 1e-5
    assert torch.isfinite(actual).all()  # padding rows never see an all-masked softmax


def test_rmsnorm_and_rope_equal_transformers(tiny_config: Config) -> None:
    from transformers.models.llama import modeling_llama as ml

    x = torch.randn(2, 5, tiny_config.hidden_size, dtype=torch.bfloat16)
    ours = SmolLM2(tiny_config).model.norm
    ours.weight.data.uniform_(0.5, 1.5)
    theirs = ml.LlamaRMSNorm(tiny_config.hidden_size, eps=tiny_config.rms_norm_eps)
    theirs.weight.data.copy_(ours.weight.data)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)

    hf_config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0,
                                         max_position_embeddings=128)
    rotary = ml.LlamaRotaryEmbedding(hf_config)
    positions = torch.tensor([[0, 1, 5, 127]])
    hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = precompute_rope(16, 128, 10000.0)
    torch.testing.assert_close(cos[positions], hf_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin[positions], hf_sin, rtol=0, atol=0)
    q = torch.randn(1, 4, 4, 16)
    k = torch.randn(1, 2, 4, 16)
    hf_q, hf_k = ml.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos[positions], sin[positions]), hf_q, rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(k, cos[positions], sin[positions]), hf_k, rtol=0, atol=0)


def test_rope_pairs_channel_i_with_i_plus_half() -> None:
    """Rotate-half layout: channel i and i + d/2 form one rotating pair (not neighbours 2i, 2i+1)."""
    d = 8
    x = torch.zeros(1, 1, 1, d)
    x[..., 1] = 1.0  # a unit vector in channel 1
    cos, sin = precompute_rope(d, 4, 10000.0)
    y = apply_rope(x, cos[None, 3:4], sin[None, 3:4])[0, 0, 0]
    angle = 3 * 10000.0 ** (-2 * 1 / d)
    expected = torch.zeros(d)
    expected[1], expected[1 + d // 2] = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0]))
    # A rotation keeps the norm, and the query-key dot product depends only on the distance.
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    cos, sin = precompute_rope(d, 64, 10000.0)

    def dot(i: int, j: int) -> torch.Tensor:
        return (apply_rope(q, cos[None, i:i + 1], sin[None, i:i + 1])
                * apply_rope(k, cos[None, j:j + 1], sin[None, j:j + 1])).sum()

    torch.testing.assert_close(dot(10, 7), dot(40, 37), rtol=1e-5, atol=1e-5)


def test_causal(tiny_config: Config) -> None:
    model = SmolLM2(tiny_config).eval()
    model.init_weights()
    a = torch.randint(0, tiny_config.vocab_size, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % tiny_config.vocab_size  # change only the later tokens
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert torch.equal(la[:, :6], lb[:, :6])
    assert not torch.allclose(la[:, 6:], lb[:, 6:])


def test_cache_equals_full_forward(tiny_config: Config) -> None:
    model = SmolLM2(tiny_config).eval()
    model.init_weights()
    x = torch.randint(0, tiny_config.vocab_size, (2, 12))
    cache = KVCache(tiny_config, batch_size=2, max_len=16)
    with torch.no_grad():
        full = model(x)
        pieces = [model(x[:, :5], cache=cache, start=0), model(x[:, 5:6], cache=cache, start=5),
                  model(x[:, 6:12], cache=cache, start=6)]  # a prefill, one step, then a chunk of six
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    # keys/values are stored per key/value head, before any expansion to the query heads
    assert cache.layers[0].k.shape == (2, tiny_config.num_key_value_heads, 16, tiny_config.head_dim)
    with pytest.raises(ValueError, match="do not fit a cache of length 16"):
        model(x[:, :5], cache=cache, start=12)


def test_parameter_count_and_tied_storage() -> None:
    config = preset("135m")
    assert config.num_parameters() == 134_515_008
    with torch.device("meta"):
        model = SmolLM2(config)
    assert model.num_parameters() == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert preset("360m").num_parameters() == 361_821_120
    assert preset("1.7b").num_parameters() == 1_711_376_384


def test_tied_weights_share_storage_after_loading(tiny_config: Config) -> None:
    _, model = hf_twin(tiny_config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = 42.0
    assert model.lm_head.weight[0, 0].item() == 42.0


def test_state_dict_keys_are_the_originals(tiny_config: Config) -> None:
    hf, ours = hf_twin(dataclasses.replace(tiny_config, tie_word_embeddings=False))
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)  # strict loading of an original state dict


def test_no_quadratic_mask_buffers() -> None:
    with torch.device("meta"):
        model = SmolLM2(preset("135m"))
    for name, buffer in model.named_buffers():
        assert buffer.numel() <= 8192 * 64, f"{name} has {buffer.numel()} elements"


def test_forward_rejects_inconsistent_position_arguments(tiny_config: Config) -> None:
    """The forward's own checks: a start without a cache, a tensor start without a mask, a too-narrow mask."""
    model = SmolLM2(tiny_config).eval()
    x = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="start=2 needs a cache"):
        model(x, start=2)
    cache = KVCache(tiny_config, 1, 16)
    with pytest.raises(ValueError, match="a tensor start needs an attention_mask"):
        model(x, cache=cache, start=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 5\) \(or be wider\), got \(1, 4\)"):
        model(x, cache=cache, start=2, attention_mask=torch.ones(1, 4, dtype=torch.long))
