"""Prefix caching (smollm2/inference/prefix_cache.py) on its own and inside the engine, without weights.

A hit must give what a prefill from scratch gives: the same keys/values, logits and tokens; a hit needs the same
token ids from position 0; memory stays under its bound, dropping least recently used blocks, never a block that
another one extends."""

from __future__ import annotations

import pytest
import torch
from test_engine import ByteTokenizer, run_all

from smollm2.config import Config
from smollm2.inference.engine import Engine
from smollm2.inference.generate import GenerationConfig, generate
from smollm2.inference.prefix_cache import PrefixCache
from smollm2.kv_cache import KVCache
from smollm2.model import SmolLM2

B = 8  # a small block, so short prompts span several


@pytest.fixture
def model(tiny_config: Config) -> SmolLM2:
    model = SmolLM2(tiny_config)
    model.init_weights()
    return model.eval()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefilled(model: SmolLM2, prompt: list[int]) -> tuple[KVCache, torch.Tensor]:
    cache = KVCache(model.config, 1, len(prompt))
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache, output="last_logits")
    return cache, logits


def test_a_hit_restores_the_keys_and_values_a_prefill_computes(model: SmolLM2) -> None:
    shared = ids(3 * B, 0)
    first, second = shared + ids(5, 1), shared + ids(7, 2)
    store = PrefixCache(1 << 20, block=B)
    store.insert(first, prefilled(model, first)[0])
    assert len(store) == 3  # the whole blocks only: 29 tokens hold 3 blocks of 8

    hit = store.lookup(second, limit=len(second) - 1)
    assert (hit.tokens, len(hit.blocks)) == (3 * B, 3)
    cache = KVCache(model.config, 1, len(second))
    store.restore(hit, cache)
    with torch.no_grad():  # prefill only what the cache did not have
        logits = model(torch.tensor([second[hit.tokens :]]), cache=cache, start=hit.tokens, output="last_logits")
    reference_cache, reference = prefilled(model, second)
    for ours, theirs in zip(cache.layers, reference_cache.layers, strict=True):
        # the restored positions bit for bit; the rest to float rounding (a matmul over 7 rows, not 31)
        assert torch.equal(ours.k[:, :, : hit.tokens], theirs.k[:, :, : hit.tokens])
        assert torch.equal(ours.v[:, :, : hit.tokens], theirs.v[:, :, : hit.tokens])
        torch.testing.assert_close(ours.k, theirs.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.v, theirs.v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert logits.argmax().item() == reference.argmax().item()


def test_a_hit_needs_the_same_ids_from_the_start(model: SmolLM2) -> None:
    prompt = ids(4 * B, 3)
    store = PrefixCache(1 << 20, block=B)
    store.insert(prompt, prefilled(model, prompt)[0])
    assert store.lookup(prompt, limit=len(prompt) - 1).tokens == 4 * B - 1  # all but the token left to prefill
    changed = list(prompt)
    changed[B + 2] += 1  # a different id in the second block: only the first block matches
    assert store.lookup(changed, limit=len(changed)).tokens == B
    shifted = [prompt[0]] + prompt  # the same ids one position later: different keys (RoPE), no hit
    assert store.lookup(shifted, limit=len(shifted)).tokens == 0
    assert store.lookup(prompt[: B - 1], limit=B - 1).tokens == 0  # shorter than a block
    assert store.counters["hits"] == 2


def test_memory_stays_bounded_and_least_recently_used_leaves_go_first(model: SmolLM2) -> None:
    a, b, c = ids(2 * B, 4), ids(2 * B, 5), ids(2 * B, 6)
    block_bytes = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * B * model.config.head_dim * 4
    store = PrefixCache(4 * block_bytes, block=B)  # room for two prompts of two blocks
    store.insert(a, prefilled(model, a)[0])
    store.insert(b, prefilled(model, b)[0])
    assert (len(store), store.bytes) == (4, 4 * block_bytes)
    assert store.lookup(a, limit=2 * B).tokens == 2 * B  # a is now the more recently used
    store.insert(c, prefilled(model, c)[0])
    assert store.bytes <= store.max_bytes and len(store) == 4
    # b went, leaf first: its second block, then its first (never a block before the one extending it)
    assert store.lookup(b, limit=2 * B).tokens == 0
    assert store.lookup(a, limit=2 * B).tokens == 2 * B and store.lookup(c, limit=2 * B).tokens == 2 * B
    assert store.counters["evicted_blocks"] == 2

    tiny = PrefixCache(block_bytes, block=B)  # one block fits: a two-block prompt keeps its first
    tiny.insert(a, prefilled(model, a)[0])
    assert (len(tiny), tiny.lookup(a, limit=2 * B).tokens) == (1, B)
    assert len(PrefixCache(0, block=B)) == 0
    off = PrefixCache(0, block=B)
    off.insert(a, prefilled(model, a)[0])
    assert len(off) == 0 and off.bytes == 0


def test_bad_sizes_are_errors_naming_them(model: SmolLM2) -> None:
    with pytest.raises(ValueError, match="prefix cache size must be an integer >= 0 bytes, got -1"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="prefix cache block must be an integer >= 1 tokens, got 0"):
        PrefixCache(1 << 20, block=0)
    with pytest.raises(ValueError, match="prefix_cache_mb must be an integer >= 0"):
        Engine(model, ByteTokenizer(), prefix_cache_mb=-5)


def test_the_engine_reuses_shared_prefixes_and_gives_the_same_tokens(model: SmolLM2) -> None:
    """Requests sharing a system prompt: the later ones hit the cache, and every reply equals generate's alone."""
    system = ids(70, 7)
    prompts = [system + ids(n, 10 + n) for n in (3, 9, 17, 30)]
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    tokenizer = ByteTokenizer()
    engine = Engine(model, tokenizer, max_batch=4, prefill_chunk=64)
    engine.start()
    try:
        first = run_all(engine, [(prompts[0], config)])  # alone first: its prompt fills the cache
        rest = run_all(engine, [(p, config) for p in prompts[1:]])
    finally:
        engine.shutdown()
    jobs = [job for job, _ in first + rest]
    assert [job.cached_tokens for job in jobs] == [0] + [64] * 3  # 70 // 32 whole blocks of the system prompt
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 3 and stats["prefix_cache_hit_tokens"] == 3 * 64
    for job, prompt in zip(jobs, prompts, strict=True):
        assert job.new_ids == list(generate(model, prompt, config=config)), "a cache hit changed the reply"

    off = Engine(model, tokenizer, max_batch=4, prefix_cache_mb=0)
    off.start()
    try:
        again = run_all(off, [(prompts[1], config)])
    finally:
        off.shutdown()
    assert again[0][0].cached_tokens == 0 and "prefix_cache_hits" not in off.stats()
    assert again[0][0].new_ids == jobs[1].new_ids


SYSTEM = ("You are a careful assistant for a small hardware shop. Answer in one or two sentences, name the aisle "
          "where an item is found when you know it, and never invent prices. Aisles: 1 fasteners (screws, nails, "
          "bolts), 2 hand tools, 3 power tools, 4 paint and brushes, 5 plumbing, 6 electrical, 7 garden. ") * 2


@pytest.mark.slow
def test_real_weights_a_shared_system_prompt_hits_and_replies_are_unchanged(real) -> None:
    model, tokenizer = real
    questions = ["Where are the wood screws?", "Do you sell garden hoses?", "What is a torque wrench for?"]
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                             tokenize=True) for q in questions]
    config = GenerationConfig(max_new_tokens=16)
    engine = Engine(model, tokenizer, max_batch=3)
    engine.start()
    try:
        jobs = [job for job, _ in run_all(engine, [(prompts[0], config)]) + run_all(engine, [(p, config)
                                                                                          for p in prompts[1:]])]
    finally:
        engine.shutdown()
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1], strict=False)) if a != b)
    assert shared > 100 and jobs[0].cached_tokens == 0
    assert all(job.cached_tokens == shared // 32 * 32 for job in jobs[1:]), [job.cached_tokens for job in jobs]
    for job, prompt in zip(jobs, prompts, strict=True):
        assert job.new_ids == list(generate(model, prompt, config=config))
