"""The OpenAI-compatible server: the official `openai` client against live uvicorn servers on loopback.

The main flow runs the real SmolLM2-135M-Instruct and compares every reply with the library's own generation
(smollm2/generate.py) at temperature 0. Error paths, limits, disconnects and shutdown use a tiny random model
with the real tokenizer, which generates thousands of tokens a second.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_utils import instruct_tokenizer, live_server, tiny_model

from conftest import REPO

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from smollm2.inference.engine import Engine, QueueFull  # noqa: E402
from smollm2.inference.generate import GenerationConfig, chat, generate, stream_text  # noqa: E402
from smollm2.serve import MAX_BODY_BYTES, create_app  # noqa: E402

pytestmark = pytest.mark.timeout(300)
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "hi",
             "Name three fruits.", "What is 2 + 2?", "Say something about cats."]


def client(url: str, api_key: str = "none", **options) -> openai.OpenAI:
    # max_retries=0: the client would otherwise retry 429s and connection errors behind the test's back
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120, **options)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_until(condition, timeout: float) -> float:
    """Seconds until condition() holds; fails the test after timeout."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def assert_error(response: httpx.Response, status: int, param: str | None = ..., code: str | None = ...) -> dict:
    """The response is status with OpenAI's error body; returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    return error


# ---- the real model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_url(real):
    model, tokenizer = real
    with live_server(create_app(model, tokenizer, max_concurrency=8, model_name="smollm2-test")) as url:
        yield url


def library_chat(real, messages, **options) -> tuple[str, object]:
    model, tokenizer = real
    stream = chat(model, tokenizer, messages, **options)
    return "".join(stream), stream


@pytest.mark.slow
def test_models_list(real_url):
    api = client(real_url)
    assert [m.id for m in api.models.list().data] == ["smollm2-test"]
    assert api.models.retrieve("smollm2-test").id == "smollm2-test"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")


@pytest.mark.slow
def test_completion_matches_library(real, real_url):
    model, tokenizer = real
    prompt = "The capital of France is"
    expected = "".join(stream_text(model, tokenizer, prompt, max_new_tokens=8))
    response = client(real_url).completions.create(model="smollm2-test", prompt=prompt, max_tokens=8,
                                                   temperature=0)
    assert response.object == "text_completion"
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8


@pytest.mark.slow
def test_chat_matches_library_streamed_and_not(real, real_url):
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    expected, library = library_chat(real, messages, max_new_tokens=24)
    api = client(real_url)
    response = api.chat.completions.create(model="smollm2-test", messages=messages, max_tokens=24, temperature=0)
    message = response.choices[0].message
    assert message.role == "assistant" and message.content == expected
    assert response.choices[0].finish_reason == library.finish_reason
    assert response.usage.prompt_tokens == len(library.prompt_ids)
    assert response.usage.completion_tokens == len(library.new_ids)

    chunks = list(api.chat.completions.create(model="smollm2-test", messages=messages, max_tokens=24,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # streamed in pieces, not one block
    assert "".join(pieces) == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [library.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == response.usage.model_dump()


@pytest.mark.slow
def test_sse_framing(real_url):
    """Raw server-sent events: `data: {json}` events separated by blank lines, ending with `data: [DONE]`."""
    body = {"model": "smollm2-test", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{real_url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert [p["choices"][0]["finish_reason"] for p in payloads][-1] == "length"
    assert all(p["object"] == "text_completion" and p["model"] == "smollm2-test" for p in payloads)
    assert len({p["id"] for p in payloads}) == 1


@pytest.mark.slow
def test_stop_sequences(real, real_url):
    messages = [{"role": "user", "content": "Name three fruits."}]
    full, _ = library_chat(real, messages, max_new_tokens=30)
    words = full.split()
    assert len(words) >= 6, full
    stop = words[len(words) // 2]  # a word from the middle of the reply
    expected = full[: full.index(stop)]
    api = client(real_url)
    response = api.chat.completions.create(model="smollm2-test", messages=messages, max_tokens=30, temperature=0,
                                           stop=[stop, "never appears 123"])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(model="smollm2-test", messages=messages, max_tokens=30, temperature=0,
                                           stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_seed_reproduces_sampling(real_url):
    api = client(real_url)

    def sampled(seed: int) -> str:
        response = api.chat.completions.create(model="smollm2-test", max_tokens=8, temperature=1.0, top_p=0.95,
                                               seed=seed, messages=[{"role": "user", "content": "Tell a story."}])
        return response.choices[0].message.content

    first = sampled(1234)
    assert sampled(1234) == first
    assert len({first, sampled(1), sampled(2)}) > 1  # a seed changes the draw


@pytest.mark.slow
def test_concurrent_requests_equal_alone(real, real_url):
    api = client(real_url)

    def ask(question: str) -> tuple[str, str, int]:
        r = api.chat.completions.create(model="smollm2-test", messages=[{"role": "user", "content": question}],
                                        max_tokens=12, temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    alone = [ask(q) for q in QUESTIONS]
    before = health(real_url)["peak_batch"]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS))
    assert together == alone
    assert health(real_url)["peak_batch"] >= max(before, 3)  # they really were decoded as one batch


@pytest.mark.slow
def test_engine_batched_tokens_equal_generate_alone(real):
    """Rows of different lengths, joining and leaving the batch at different steps, each get the tokens
    the library's single-request generate() gives."""
    model, tokenizer = real
    end = tokenizer.token_id("<|im_end|>")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS]
    lengths = [10, 6, 12, 8, 12, 9]
    alone = [list(generate(model, p, tokenizer=tokenizer, max_new_tokens=n, stop=end))
             for p, n in zip(prompts, lengths, strict=True)]
    # 3 rows: later requests wait for a row. (Chunked prefill is covered by test_engine_cache_compacts_and_grows.)
    # All are queued before the engine starts, so the schedule (and peak_batch) does not depend on timing.
    engine = Engine(model, tokenizer, max_batch=3, max_queue=10)
    jobs = [engine.submit(prompt, GenerationConfig(max_new_tokens=n, stop=end), lambda kind, value: None)
            for prompt, n in zip(prompts, lengths, strict=True)]
    engine.start()
    try:
        wait_until(lambda: all(job.done for job in jobs), timeout=240)
    finally:
        engine.shutdown()
    assert [job.new_ids for job in jobs] == alone
    assert engine.counters["peak_batch"] == 3 and engine.counters["completed"] == len(prompts)


# ---- errors, limits, disconnects, shutdown (tiny random model) ----------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), instruct_tokenizer()


@pytest.fixture(scope="module")
def tiny_url(tiny):
    with live_server(create_app(*tiny, model_name="tiny", context_length=256)) as url:
        yield url


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 2}


def with_(base: dict, **changes) -> dict:
    body = dict(base)
    for key, value in changes.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


BAD_REQUESTS = [  # (endpoint, body, expected param)
    ("chat", with_(CHAT, temperature=-0.1), "temperature"),
    ("chat", with_(CHAT, temperature=2.5), "temperature"),
    ("chat", with_(CHAT, temperature="hot"), "temperature"),
    ("chat", with_(CHAT, top_p=0), "top_p"),
    ("chat", with_(CHAT, top_p=1.5), "top_p"),
    ("chat", with_(CHAT, max_tokens=0), "max_tokens"),
    ("chat", with_(CHAT, max_tokens=-3), "max_tokens"),
    ("chat", with_(CHAT, max_tokens=2.5), "max_tokens"),
    ("chat", with_(CHAT, max_tokens="10"), "max_tokens"),
    ("chat", with_(CHAT, max_tokens=True), "max_tokens"),
    ("chat", with_(CHAT, max_completion_tokens=5), "max_completion_tokens"),
    ("chat", with_(CHAT, n=2), "n"),
    ("chat", with_(CHAT, seed=-1), "seed"),
    ("chat", with_(CHAT, seed="x"), "seed"),
    ("chat", with_(CHAT, seed=2**64), "seed"),
    ("chat", with_(CHAT, stop=5), "stop"),
    ("chat", with_(CHAT, stop=""), "stop"),
    ("chat", with_(CHAT, stop=["a", "b", "c", "d", "e"]), "stop"),
    ("chat", with_(CHAT, stream="yes"), "stream"),
    ("chat", with_(CHAT, stream_options={"include_usage": True}), "stream_options"),
    ("chat", with_(CHAT, frequency_penalty=0.5), "frequency_penalty"),
    ("chat", with_(CHAT, top_logprobs=2), "top_logprobs"),  # logprobs themselves: test_structured.py
    ("chat", with_(CHAT, tools=[]), "tools"),
    ("chat", with_(CHAT, model=...), "model"),
    ("chat", with_(CHAT, model=7), "model"),
    ("chat", with_(CHAT, messages=...), "messages"),
    ("chat", with_(CHAT, messages=[]), "messages"),
    ("chat", with_(CHAT, messages="hi"), "messages"),
    ("chat", with_(CHAT, messages=["hi"]), "messages[0]"),
    ("chat", with_(CHAT, messages=[{"role": "user"}]), "messages[0].content"),
    ("chat", with_(CHAT, messages=[{"role": "user", "content": 3}]), "messages[0].content"),
    ("chat", with_(CHAT, messages=[{"content": "hi"}]), "messages[0].role"),
    ("chat", with_(CHAT, messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("chat", with_(CHAT, messages=[{"role": "function", "content": "hi"}]), "messages[0].role"),
    ("chat", with_(CHAT, messages=[{"role": "user", "content": "a", "tool_calls": []}]),
     "messages[0].tool_calls"),
    ("chat", with_(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
     "messages[0].content"),
    ("completions", with_(COMPLETION, prompt=...), "prompt"),
    ("completions", with_(COMPLETION, prompt=""), "prompt"),
    ("completions", with_(COMPLETION, prompt=[]), "prompt"),
    ("completions", with_(COMPLETION, prompt=["a", ""]), "prompt"),
    ("completions", with_(COMPLETION, prompt=[1, "a"]), "prompt"),
    ("completions", with_(COMPLETION, prompt=[99999999]), "prompt"),
    ("completions", with_(COMPLETION, echo=1), "echo"),
    ("completions", with_(COMPLETION, suffix="x"), "suffix"),
    ("completions", with_(COMPLETION, messages=[]), "messages"),
]


@pytest.mark.parametrize("endpoint, body, param", BAD_REQUESTS)
def test_invalid_parameters_are_400(tiny_url, endpoint, body, param):
    response = httpx.post(f"{tiny_url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
                          json=body, timeout=30)
    error = assert_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw, what", [
    (b'{"model": "tiny", "messages": [', "malformed JSON"),
    (b'[{"role": "user", "content": "hi"}]', "not an object"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9"}], "max_tokens": 2}', "invalid UTF-8"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', "lone surrogate"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN"),
    (b'[' * 100_000 + b']' * 100_000, "deep nesting"),
    (b"", "empty body"),
])
def test_malformed_bodies_are_400(tiny_url, raw, what):
    response = httpx.post(f"{tiny_url}/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=30)
    assert_error(response, 400, param=None)


def test_openai_client_sees_400(tiny_url):
    api = client(tiny_url)
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3)
    assert raised.value.status_code == 400 and raised.value.body["param"] == "n"


def test_context_length_exceeded(tiny_url, tiny):
    tokenizer = tiny[1]
    prompt = "word " * 300
    n = len(tokenizer.encode(prompt))
    response = httpx.post(f"{tiny_url}/v1/completions", json=with_(COMPLETION, prompt=prompt, max_tokens=10),
                          timeout=30)
    error = assert_error(response, 400, param="prompt", code="context_length_exceeded")
    assert "256" in error["message"] and str(n + 10) in error["message"] and f"{n} in the prompt" in error["message"]
    # A prompt that fits, with a completion that does not:
    response = httpx.post(f"{tiny_url}/v1/completions", json=with_(COMPLETION, max_tokens=300), timeout=30)
    assert_error(response, 400, param="prompt", code="context_length_exceeded")
    # Without max_tokens, a prompt that fills the context leaves no room for one token.
    response = httpx.post(f"{tiny_url}/v1/chat/completions",
                          json=with_(CHAT, max_tokens=..., messages=[{"role": "user", "content": prompt}]),
                          timeout=30)
    assert_error(response, 400, param="messages", code="context_length_exceeded")


def test_unknown_model_path_and_method(tiny_url):
    assert_error(httpx.post(f"{tiny_url}/v1/chat/completions", json=with_(CHAT, model="gpt-4"), timeout=30), 404,
                 param="model", code="model_not_found")
    assert_error(httpx.get(f"{tiny_url}/v1/nothing", timeout=30), 404)
    assert_error(httpx.get(f"{tiny_url}/v1/chat/completions", timeout=30), 405)


def test_body_over_1_mib_is_413(tiny_url):
    JSON = {"content-type": "application/json"}  # noqa: N806 (else 415, before the size is looked at)
    big = json.dumps(with_(CHAT, messages=[{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}])).encode()
    assert_error(httpx.post(f"{tiny_url}/v1/chat/completions", content=big, headers=JSON, timeout=30), 413)

    def chunked():  # no Content-Length: the server must count the bytes as they come
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    assert_error(httpx.post(f"{tiny_url}/v1/chat/completions", content=chunked(), headers=JSON, timeout=30), 413)
    # Just under the limit is fine (JSON whitespace pads a small request).
    ok = json.dumps(CHAT).encode()
    ok = ok[:-1] + b" " * (MAX_BODY_BYTES - len(ok)) + b"}"
    assert len(ok) == MAX_BODY_BYTES
    assert httpx.post(f"{tiny_url}/v1/chat/completions", content=ok, headers=JSON, timeout=60).status_code == 200


def test_no_500_on_random_bodies(tiny_url):
    """A small deterministic fuzz: random mixes of valid and invalid values are answered 200, 400 or 404."""
    rng = random.Random(0)
    values = {
        "model": ["tiny", "other", None, 3, ""],
        "messages": [[{"role": "user", "content": "hi"}], [], None, "hi", [{"role": "x"}], [{"role": "user",
                     "content": [{"type": "text", "text": "a"}]}], [{"role": "assistant", "content": ""}]],
        "prompt": ["hi", "", [5, 6], [[1]], None, {"a": 1}],
        "max_tokens": [1, 2, 0, -1, "3", 2.5, None, 10**30],
        "temperature": [0, 0.7, 2, -1, 1e308, "x", None, []],
        "top_p": [0.5, 1, 0, -0.1, None, {}],
        "stop": ["a", ["b", "c"], [], [1], "", None],
        "seed": [0, 5, -5, 2**70, 1.5, None],
        "stream": [False, True, 1, None],
        "n": [1, 2, None, "1"],
        "bogus": [1],
    }
    for _ in range(60):
        endpoint = rng.choice(["chat/completions", "completions"])
        body = {k: rng.choice(v) for k, v in values.items() if rng.random() < 0.6}
        body.setdefault("max_tokens", 2)
        response = httpx.post(f"{tiny_url}/v1/{endpoint}", json=body, timeout=60)
        assert response.status_code in (200, 400, 404), (body, response.text)
        if response.status_code != 200:
            assert_error(response, response.status_code)


@pytest.mark.parametrize("prefix_cache_mb", [16, 0])
def test_usage_counts_the_prompt_tokens_the_prefix_cache_gave(tiny, prefix_cache_mb):
    """A conversation's next turn begins with the previous turn's prompt: with the prefix cache its keys/values
    are reused (whole 32-token blocks, the last prompt token always recomputed), and usage says how many, as
    OpenAI's prompt caching does; without it, none. The reply is the same either way."""
    model, tokenizer = tiny
    system = {"role": "system", "content": "You answer in one word. " * 12}
    first = [system, {"role": "user", "content": "Name a colour."}]
    with live_server(create_app(model, tokenizer, model_name="tiny", prefix_cache_mb=prefix_cache_mb)) as url:
        api = client(url)
        replies = [api.chat.completions.create(model="tiny", messages=first, max_tokens=3, temperature=0)
                   for _ in range(2)]
        second = [*first, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]
        streamed = list(api.chat.completions.create(model="tiny", messages=second, max_tokens=3, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
    prompt_tokens = replies[0].usage.prompt_tokens
    assert prompt_tokens > 64
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
    streamed_cached = streamed[-1].usage.prompt_tokens_details.cached_tokens
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    if prefix_cache_mb:
        assert cached[0] == 0  # nothing was cached before the first request
        assert cached[1] == (prompt_tokens - 1) // 32 * 32  # every whole block but the last token's
        assert cached[1] <= streamed_cached < streamed[-1].usage.prompt_tokens  # the next turn reuses the first
    else:
        assert cached == [0, 0] and streamed_cached == 0


def test_serve_rejects_a_negative_prefix_cache(capsys):
    from smollm2.cli import build_parser, main

    assert build_parser().parse_args(["serve", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0
    assert main(["serve", "--prefix-cache-mb", "-1"]) == 2  # before any model loads
    assert "--prefix-cache-mb must be at least 0, got -1" in capsys.readouterr().err


def test_api_key(tiny):
    with live_server(create_app(*tiny, model_name="tiny", api_key="sesame")) as url:
        assert_error(httpx.get(f"{url}/v1/models", timeout=30), 401, code="invalid_api_key")
        assert_error(httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30), 401)
        assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30), 401)
        assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "sesame"}, timeout=30), 401)
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        api = client(url, api_key="sesame")
        assert [m.id for m in api.models.list().data] == ["tiny"]
        reply = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"  # health stays open
        assert httpx.get(f"{url}/", timeout=30).status_code == 200  # the page itself holds no secrets


def test_no_cors_headers(tiny_url):
    origin = {"Origin": "https://evil.example"}
    response = httpx.get(f"{tiny_url}/v1/models", headers=origin, timeout=30)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = httpx.options(f"{tiny_url}/v1/chat/completions", timeout=30,
                              headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_queue_full_429_and_disconnect_frees_the_slot(tiny):
    """One slot, no queue: a second request is refused at once; closing the first frees the slot."""
    with live_server(create_app(*tiny, model_name="tiny", max_concurrency=1, max_queue=0)) as url:
        body = with_(CHAT, max_tokens=3000, temperature=0, stream=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()
            assert next(line for line in lines if '"content"' in line and '"content": ""' not in line)
            start = time.monotonic()
            refused = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
            assert time.monotonic() - start < 2
            assert_error(refused, 429, code="rate_limit_exceeded")
            assert refused.headers["retry-after"] == "1"
            assert health(url)["active"] == 1
        # The stream is closed (the client went away) long before its 3000 tokens.
        assert wait_until(lambda: health(url)["active"] == 0, timeout=2) < 2
        stats = health(url)
        assert stats["cancelled"] == 1 and stats["generated_tokens"] < 3000
        time.sleep(0.3)
        assert health(url)["generated_tokens"] == stats["generated_tokens"]  # nothing more was generated
        reply = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4

        # A non-streamed request whose client gives up is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=with_(CHAT, max_tokens=3000, temperature=0), timeout=1.0)
        assert wait_until(lambda: health(url)["active"] == 0, timeout=2.5) < 2.5
        assert health(url)["cancelled"] == 2


def test_sigterm_drains_and_exits_0(tiny, tmp_path):
    """`smollm2 serve` in a subprocess: SIGTERM during a stream lets it finish, then the process exits 0."""
    from smollm2.weights import save_pretrained

    save_pretrained(tiny[0], tmp_path / "tiny", tiny[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "smollm2", "serve", "--source", str(tmp_path / "tiny"), "--port", str(port),
         "--model-name", "tiny", "--no-compile"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def up() -> bool:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=120)
        body = with_(CHAT, max_tokens=400, temperature=0, stream=True, stream_options={"include_usage": True})
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no new connections while draining
                httpx.get(f"{url}/health", timeout=5)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 400
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


# ---- pieces --------------------------------------------------------------------------------------------


def test_engine_rejects_when_full(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    config = GenerationConfig(max_new_tokens=2)
    engine.submit([1, 2, 3], config, lambda kind, value: None)
    engine.submit([1, 2, 3], config, lambda kind, value: None)
    with pytest.raises(QueueFull):
        engine.submit([1, 2, 3], config, lambda kind, value: None)
    with pytest.raises(ValueError, match="context length"):
        Engine(model, tokenizer, context_length=64).submit([1] * 60, GenerationConfig(max_new_tokens=10),
                                                           lambda kind, value: None)


def random_requests(model, tokenizer, seed: int, count: int, max_prompt: int, max_new: int):
    """count random prompts and new-token counts, and the greedy tokens generate() gives each one alone."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randrange(1, max_prompt))] for _ in range(count)]
    lengths = [rng.randrange(1, max_new) for _ in prompts]
    alone = [list(generate(model, p, tokenizer=tokenizer, max_new_tokens=n))
             for p, n in zip(prompts, lengths, strict=True)]
    return prompts, lengths, alone


def run_greedy(engine: Engine, prompts: list[list[int]], lengths: list[int], timeout: float) -> list:
    """Start the engine, submit every prompt (greedy, lengths[i] new tokens), wait for all, stop it."""
    engine.start()
    try:
        jobs = [engine.submit(p, GenerationConfig(max_new_tokens=n), lambda kind, value: None)
                for p, n in zip(prompts, lengths, strict=True)]
        wait_until(lambda: all(job.done for job in jobs), timeout=timeout)
    finally:
        engine.shutdown()
    return jobs


def test_engine_cache_compacts_and_grows(tiny):
    """Many requests of uneven lengths through 2 rows: the timeline is shifted and the cache grown, and each
    request still gets its tokens alone (greedy)."""
    model, tokenizer = tiny
    prompts, lengths, alone = random_requests(model, tokenizer, seed=1, count=8, max_prompt=200, max_new=120)
    engine = Engine(model, tokenizer, max_batch=2, max_queue=8, prefill_chunk=64, context_length=400)
    shifts = []
    compact = engine._compact

    def spy() -> None:
        before = engine._T
        compact()
        shifts.append(before - engine._T)

    engine._compact = spy
    jobs = run_greedy(engine, prompts, lengths, timeout=120)
    assert [job.new_ids for job in jobs] == alone
    assert all(job.finish_reason == "length" for job in jobs)
    assert any(shifts) and 256 < engine._cache.max_len <= 400  # it did shift, grow, and stay in bounds
    assert engine._cache.batch_size == 2


def test_engine_with_the_compiled_step(tiny):
    """`smollm2 serve --compile`: the engine decodes with fast.DecodeStep (rows joining and leaving, the cache
    shifted and grown) and every request still gets the tokens generate() gives it alone."""
    from smollm2.inference.compiled_step import DecodeStep

    model, tokenizer = tiny
    prompts, lengths, alone = random_requests(model, tokenizer, seed=2, count=5, max_prompt=150, max_new=100)
    step = DecodeStep(model, compile=True)
    engine = Engine(model, tokenizer, max_batch=2, max_queue=8, prefill_chunk=64, context_length=300, step=step)
    jobs = run_greedy(engine, prompts, lengths, timeout=300)
    assert step.compile_seconds is not None  # it really ran the compiled step
    assert [job.new_ids for job in jobs] == alone


def test_serve_cli_defaults():
    from smollm2.cli import build_parser
    from smollm2.quant.quantize import DEFAULT_MODE

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.source) == ("127.0.0.1", 8000, None)
    assert args.max_concurrency >= 1 and args.max_queue >= 0
    assert (args.quantize, args.compile) == (DEFAULT_MODE, True) == ("int4", True)  # the fast path by default


@pytest.mark.parametrize("compile_flag", ["--compile", "--no-compile"])
def test_serve_compiles_its_step_before_answering(tiny, monkeypatch, compile_flag: str):
    """With --compile (the default) the engine is warmed up, its graphs built, before the server starts
    listening (test_engine.py checks that no compile follows); with --no-compile it is not."""
    from smollm2.cli import main
    from smollm2.commands import serve
    from smollm2.inference.engine import Engine

    events = []
    monkeypatch.setattr(serve, "load_for_inference", lambda args: tiny)
    monkeypatch.setattr(Engine, "warm_up", lambda self: events.append("warm_up") or 1.0)
    monkeypatch.setattr("smollm2.serve.run_server", lambda app, host, port, **options: events.append("listen"))
    assert main(["serve", compile_flag]) == 0
    assert events == (["warm_up", "listen"] if compile_flag == "--compile" else ["listen"])
