"""The real SmolLM2-135M-Instruct weights: our model against transformers loaded from the same GGUF file."""

from __future__ import annotations

import pytest
import torch

from smollm2.kv_cache import KVCache

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Total:  42 apples and 17 pears, 2024-11-28.",
    "Gravity is the force that",
    "Crème brûlée 😀 我爱自然语言处理",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_equal_transformers(real, hf_real, prompt: str) -> None:
    model, tokenizer = real
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        ours, theirs = model(ids), hf_real(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
    assert (ours - theirs).abs().max().item() <= 1e-4  # at every position


@pytest.mark.slow
def test_weights_equal_transformers(real, hf_real) -> None:
    """transformers' own GGUF loader un-permutes Q/K independently of ours: the tensors must agree."""
    model, _ = real
    theirs = hf_real.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_greedy_continuation_equals_transformers(real, hf_real, prompt: str) -> None:
    model, tokenizer = real
    ids = tokenizer.encode(prompt)
    x = torch.tensor([ids])
    expected = hf_real.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=2, repetition_penalty=None)[0, len(ids):].tolist()
    assert len(expected) == 32
    cache = KVCache(model.config, batch_size=1, max_len=len(ids) + 32)
    ours, start = [], 0
    with torch.no_grad():
        for _ in range(32):
            logits = model(x, cache=cache, start=start)
            start += x.shape[1]
            x = logits[:, -1:].argmax(-1)
            ours.append(x.item())
    assert ours == expected, (tokenizer.decode(ours), tokenizer.decode(expected))
