"""Structured output and log-probabilities through the server: OpenAI's response_format (json_object and
json_schema, which the official client's `parse()` sends for a pydantic model) and chat logprobs/top_logprobs,
checked against the model's own logits."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from serve_utils import instruct_tokenizer, live_server, tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance", reason="constrained decoding needs the grammar extra")
pydantic = pytest.importorskip("pydantic")

from smollm2.serve import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def real_url(real):
    model, tokenizer = real
    with live_server(create_app(model, tokenizer, max_concurrency=4, model_name="smollm2-test")) as url:
        yield url


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)  # bounded: the 135M model can run on inside a free string
    country: str = pydantic.Field(max_length=40)
    population: int = pydantic.Field(ge=0, le=100_000_000)


@pytest.mark.slow
def test_the_openai_clients_parse_returns_a_parsed_object(real_url):
    api = client(real_url)
    for city in ("Paris", "Tokyo", "Nairobi"):
        completion = api.chat.completions.parse(
            model="smollm2-test", response_format=City, temperature=0, max_tokens=200,
            messages=[{"role": "user", "content": f"Give the name, country and population of {city} as JSON."}])
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, City), completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_chat_logprobs_are_the_models_log_softmax(real, real_url):
    model, tokenizer = real
    messages = [{"role": "user", "content": "Name a colour."}]
    response = client(real_url).chat.completions.create(model="smollm2-test", messages=messages, temperature=0,
                                                        max_tokens=12, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8") == choice.message.content
    prompt = tokenizer.apply_chat_template(messages, tokenize=True)
    reply = tokenizer.encode(choice.message.content)  # greedy text re-encodes to its own ids here
    assert len(reply) == len(content)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply]))[0]
    expected = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]
    for i, (token, entry) in enumerate(zip(reply, content, strict=True)):
        assert abs(entry.logprob - float(expected[i, token])) < 1e-4  # decode steps vs one forward: rounding
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] == entry.logprob  # greedy

    stream = client(real_url).chat.completions.create(model="smollm2-test", messages=messages, temperature=0,
                                                      max_tokens=12, logprobs=True, top_logprobs=3, stream=True)
    streamed = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    # the same tokens; log-probabilities to rounding (this prompt now hits the prefix cache: a shorter prefill)
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, content, strict=True))


@pytest.fixture(scope="module")
def tiny_url():
    with live_server(create_app(tiny_model(), instruct_tokenizer(), model_name="tiny", context_length=512)) as url:
        yield url


@pytest.mark.slow
def test_json_object_mode(real_url):
    reply = client(real_url).chat.completions.create(
        model="smollm2-test", messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
        response_format={"type": "json_object"}, max_tokens=120, temperature=0)
    value = json.loads(reply.choices[0].message.content)
    assert isinstance(value, dict) and reply.choices[0].finish_reason == "stop"


def test_a_json_schema_holds_even_for_a_random_model(tiny_url):
    """(A bounded schema: a random model's free-form JSON object would not end within any token limit.)"""
    api = client(tiny_url)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    reply = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=50, temperature=1.0, seed=4,
        response_format={"type": "json_schema", "json_schema": {"name": "flags", "schema": schema, "strict": True}})
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)


@pytest.mark.parametrize("body, param", [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, "response_format"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_structured_options_are_400s_naming_the_field(tiny_url, body, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    response = httpx.post(f"{tiny_url}/v1/chat/completions", json=request, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
