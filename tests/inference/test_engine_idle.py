"""The batching engine gives a burst's KV cache back once idle (idle_release_s), and serves the same replies after."""

from __future__ import annotations

import time

import pytest
import test_engine
from test_engine import alone, prompts_of, run_all

from smollm2.inference.config import GenerationConfig
from smollm2.inference.engine import Engine

model, tokenizer, engine_of = test_engine.model, test_engine.tokenizer, test_engine.engine_of  # the fixtures


def test_cache_freed_when_idle_and_reallocated_for_the_next_burst(model, tokenizer, engine_of) -> None:
    engine = engine_of(max_batch=8, idle_release_s=1.0, prefix_cache_mb=0)
    config = GenerationConfig(max_new_tokens=12, temperature=0.0)
    requests = [(prompt, config) for prompt in prompts_of([5, 9, 3, 17, 8, 11])]
    expected = [alone(model, tokenizer, prompt, config)[1] for prompt, _ in requests]
    assert [result.text for _, result in run_all(engine, requests)] == expected
    cache = engine._cache
    assert cache is not None and cache.batch_size >= 2  # the burst's cache, kept while requests may follow
    deadline = time.monotonic() + 10
    while engine._cache is not None:
        assert time.monotonic() < deadline, "the idle engine kept its KV cache"
        time.sleep(0.05)
    assert engine.stats()["active"] == 0
    # a new burst allocates again and decodes the same tokens
    assert [result.text for _, result in run_all(engine, requests)] == expected
    assert engine._cache is not None


def test_idle_release_must_be_positive(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="idle_release_s must be a positive number of seconds, got 0"):
        Engine(model, tokenizer, idle_release_s=0)
