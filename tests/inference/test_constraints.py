"""Constrained decoding (smollm2/inference/constraints.py) and recorded log-probabilities.

A constraint is a promise about the output, so it is tested where the model helps least: a random tiny model
with the real 49152-token vocabulary, sampled at temperature 1, must still produce JSON that parses and
validates, 1000 times, for schemas with nested objects, arrays, enums, integers, and required and optional
fields. The real weights are checked too, with numbers and free strings."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

pytest.importorskip("llguidance", reason="constrained decoding needs the grammar extra (llguidance)")
jsonschema = pytest.importorskip("jsonschema", reason="validating the output needs jsonschema (dev extra)")

from conftest import ORIGINAL_TOKENIZER, require  # noqa: E402
from smollm2.config import Config  # noqa: E402
from smollm2.inference.config import GenerationConfig  # noqa: E402
from smollm2.inference.constraints import Constraint  # noqa: E402
from smollm2.inference.engine import Engine  # noqa: E402
from smollm2.inference.generate import chat, generate, generate_batch  # noqa: E402
from smollm2.model import SmolLM2  # noqa: E402
from smollm2.tokenizer import Tokenizer  # noqa: E402

# Bounded schemas (lengths, ranges, no additional properties), so every sampled output ends well within the
# token limit even when the model is random.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99999},
                   "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                       "type": "object", "properties": {"sku": {"enum": ["A1", "B2", "C3"]},
                                                        "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["sku", "qty"], "additionalProperties": False}},
                   "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]}},
    "required": ["id", "items"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(require(ORIGINAL_TOKENIZER).parent)


@pytest.fixture(scope="module")
def random_model(tokenizer: Tokenizer) -> SmolLM2:
    """Random weights over the real vocabulary: the constraint alone keeps its output valid."""
    torch.manual_seed(0)
    config = Config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                    initializer_range=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = SmolLM2(config)
    model.init_weights()
    return model.eval()


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, 40000, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("schema", [PERSON, ORDER], ids=["person", "order"])
def test_500_sampled_generations_per_schema_parse_and_validate(random_model, tokenizer, schema) -> None:
    config = GenerationConfig(constraint=Constraint.json_schema(schema), temperature=1.0, max_new_tokens=160)
    outputs = []
    for batch in range(10):  # 10 batches of 50 rows, each row its own prompt (so its own draws)
        rows = generate_batch(random_model, prompts(50, seed=batch), tokenizer=tokenizer,
                              config=dataclasses.replace(config, seed=batch))
        outputs += [tokenizer.decode(ids) for ids in rows]
    assert len(outputs) == 500
    for text in outputs:
        jsonschema.validate(json.loads(text), schema)  # raises on the first invalid one
    assert len(set(outputs)) > 400, "the samples should differ: the constraint masks, it does not choose"


@pytest.mark.slow
def test_real_weights_sampled_json_always_validates(real) -> None:
    model, tokenizer = real
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "population": {"type": "number", "minimum": 0},
        "country": {"type": "string", "maxLength": 30}, "landmarks": {"type": "array", "maxItems": 3,
                                                                     "items": {"type": "string", "maxLength": 30}}},
        "required": ["city", "population", "country"], "additionalProperties": False}
    messages = [[{"role": "user", "content": f"Describe {city} as JSON with city, population and country."}]
                for city in ("Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Perth", "Quito")]
    ids = [tokenizer.apply_chat_template(m, tokenize=True) for m in messages] * 4
    config = GenerationConfig(constraint=Constraint.json_schema(schema), temperature=1.0, seed=3,
                              max_new_tokens=120)
    rows = generate_batch(model, ids, tokenizer=tokenizer, config=config)
    for row in rows:
        jsonschema.validate(json.loads(tokenizer.decode(row)), schema)
    greedy = "".join(chat(model, tokenizer, messages[0], constraint=Constraint.json_schema(schema),
                          max_new_tokens=120))
    assert json.loads(greedy)["city"] == "Paris", greedy


@pytest.mark.slow
def test_real_weights_an_always_true_grammar_changes_no_greedy_token(real) -> None:
    model, tokenizer = real
    prompt = tokenizer.encode("The three primary colours are")
    plain = list(generate(model, prompt, tokenizer=tokenizer, max_new_tokens=24))
    constrained = list(generate(model, prompt, tokenizer=tokenizer, max_new_tokens=24,
                                constraint=Constraint.regex(r"[\s\S]*")))
    assert constrained == plain


def test_regex_and_choice_constraints_hold_under_sampling(random_model, tokenizer) -> None:
    phone = Constraint.regex(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}")  # (\d would be any Unicode digit)
    rows = generate_batch(random_model, prompts(40, seed=7), tokenizer=tokenizer, constraint=phone,
                          temperature=1.0, seed=1, max_new_tokens=30)
    for ids in rows:
        assert re.fullmatch(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", tokenizer.decode(ids)), tokenizer.decode(ids)
    options = ["positive", "negative", "neutral"]
    rows = generate_batch(random_model, prompts(40, seed=8), tokenizer=tokenizer,
                          constraint=Constraint.choice(options), temperature=1.0, seed=2, max_new_tokens=10)
    seen = {tokenizer.decode(ids) for ids in rows}
    assert seen <= set(options) and len(seen) > 1, seen


def test_the_engine_runs_constrained_and_free_requests_in_one_batch(random_model, tokenizer) -> None:
    import threading

    free = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    requests = [(prompts(1, seed=20)[0], GenerationConfig(constraint=Constraint.json_schema(ORDER),
                                                          max_new_tokens=120)),
                (prompts(1, seed=21)[0], free),
                (prompts(1, seed=22)[0], GenerationConfig(constraint=Constraint.choice(["yes", "no"]),
                                                          max_new_tokens=5))]
    engine = Engine(random_model, tokenizer, max_batch=3)
    done = [threading.Event() for _ in requests]
    engine.start()
    try:
        jobs = [engine.submit(p, c, lambda kind, value, e=e: e.set() if kind != "text" else None)
                for (p, c), e in zip(requests, done, strict=True)]
        assert all(e.wait(120) for e in done)
    finally:
        engine.shutdown()
    jsonschema.validate(json.loads(tokenizer.decode(jobs[0].new_ids)), ORDER)
    assert jobs[1].new_ids == list(generate(random_model, requests[1][0], tokenizer=tokenizer, config=free))
    assert tokenizer.decode(jobs[2].new_ids) in ("yes", "no") and jobs[2].finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax(random_model, tokenizer) -> None:
    prompt = prompts(1, seed=30)[0]
    stream = generate(random_model, prompt, tokenizer=tokenizer, max_new_tokens=8, ignore_eos=True, logprobs=5)
    new = list(stream)
    assert len(stream.logprobs) == len(new) == 8
    with torch.no_grad():
        logits = random_model(torch.tensor([prompt + new]))[0]  # (T, vocab): one forward over everything
    expected = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]  # the positions that chose them
    for i, (token, record) in enumerate(zip(new, stream.logprobs, strict=True)):
        assert record.token == token
        # (the decode steps' logits equal one forward's to float rounding, ~1e-5 with these large random logits)
        assert abs(record.logprob - float(expected[i, token])) < 1e-4
        top_ids, top_values = zip(*record.top, strict=True)
        assert list(top_values) == sorted(top_values, reverse=True) and len(top_ids) == 5
        assert top_ids[0] == token  # greedy: the chosen token is the most likely
        assert torch.allclose(torch.tensor(top_values), expected[i, list(top_ids)], atol=1e-4)
    assert list(generate(random_model, prompt, tokenizer=tokenizer, max_new_tokens=8, ignore_eos=True)) == new


def test_bad_constraints_and_options_are_errors_naming_them(random_model, tokenizer) -> None:
    with pytest.raises(ValueError, match="the JSON schema is not valid JSON"):
        Constraint.json_schema("{not json")
    with pytest.raises(ValueError, match="a JSON schema must be a JSON object, got list"):
        Constraint.json_schema([1, 2])
    with pytest.raises(ValueError, match="regex constraint is not a valid grammar"):
        Constraint.regex("(unclosed")
    with pytest.raises(ValueError, match="a choice constraint needs a list of non-empty strings"):
        Constraint.choice([])
    with pytest.raises(ValueError, match="a choice constraint needs a list of non-empty strings"):
        Constraint.choice("yes")
    with pytest.raises(ValueError, match="constraint must be a Constraint"):
        GenerationConfig(constraint="json")
    with pytest.raises(ValueError, match="ignore_eos cannot be combined with a constraint"):
        GenerationConfig(constraint=Constraint.json_object(), ignore_eos=True)
    with pytest.raises(ValueError, match="logprobs must be at most 20 alternatives, got 21"):
        GenerationConfig(logprobs=21)
    with pytest.raises(ValueError, match="logprobs must be an integer >= 0"):
        GenerationConfig(logprobs=-1)
    with pytest.raises(ValueError, match="a constraint needs the tokenizer"):
        list(generate(random_model, [5, 6, 7], constraint=Constraint.json_object()))
