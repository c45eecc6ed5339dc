"""smollm2.serve.protocol on its own: request parsing, field checks and response shapes, with no server running.

None of these needs FastAPI (the first test checks the modules import with it blocked); the same rules are
exercised end to end over HTTP in test_app.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from smollm2.inference.generate import GenerationConfig
from smollm2.serve import page, protocol
from smollm2.serve.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    MAX_STOP_STRINGS,
    APIError,
    Fields,
    check_api_key,
    generation_config,
    parse_body,
    parse_messages,
    parse_prompts,
)


def check(error: APIError, status: int, param: str | None = ..., code: str | None = ...) -> dict:
    """error is status with OpenAI's body; returns the body's error object."""
    assert error.status == status
    body = error.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert json.loads(json.dumps(body)) == body  # plain JSON
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not ...:
        assert body["error"]["param"] == param, body
    if code is not ...:
        assert body["error"]["code"] == code, body
    return body["error"]


def bad(call, *args, **kwargs) -> APIError:
    """The APIError call(*args, **kwargs) raises."""
    with pytest.raises(APIError) as raised:
        call(*args, **kwargs)
    return raised.value


def config(body: dict, prompt_tokens: int = 10, context: int = 256, **options) -> GenerationConfig:
    options.setdefault("default_max_tokens", 16)
    options.setdefault("prompt_param", "prompt")
    return generation_config(Fields(body, CHAT_FIELDS), prompt_tokens, context, **options)


# ---- without FastAPI -----------------------------------------------------------------------------------

BLOCK_SERVE_EXTRA = """
import importlib.abc
import sys

class NotInstalled(importlib.abc.MetaPathFinder):
    # As if the serve extra were not installed: its packages cannot be found.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"fastapi", "starlette", "uvicorn"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


def test_protocol_imports_without_fastapi():
    code = BLOCK_SERVE_EXTRA + textwrap.dedent("""
        import smollm2.serve
        import smollm2.serve.page
        from smollm2.serve.protocol import CHAT_FIELDS, Fields, generation_config, parse_body

        fields = Fields(parse_body(b'{"model": "m", "max_tokens": 3, "stop": "x"}'), CHAT_FIELDS)
        config = generation_config(fields, 5, 64, default_max_tokens=16, prompt_param="messages")
        assert (config.max_new_tokens, config.stop) == (3, ("x",)), config
        assert smollm2.serve.MAX_BODY_BYTES == 1 << 20
        assert not {"fastapi", "starlette", "uvicorn"} & set(sys.modules), sorted(sys.modules)
        try:
            smollm2.serve.create_app
        except ModuleNotFoundError as e:
            assert "pip install 'smollm2[serve]'" in str(e) and e.name == "fastapi", (str(e), e.name)
        else:
            raise AssertionError("create_app imported without fastapi")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---- the body and its fields ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"text"', b"caf\xe9", b'{"a": NaN}', b'{"a": Infinity}',
                                 b'{"a": "\\ud800"}', b'{"\\udfff": 1}', b"[" * 100_000 + b"]" * 100_000, b""])
def test_parse_body_rejects_anything_but_a_json_object(raw):
    check(bad(parse_body, raw), 400, param=None)


def test_parse_body_reads_an_object():
    assert parse_body('{"messages": [{"content": "café ✓"}], "n": 1}'.encode()) == \
        {"messages": [{"content": "café ✓"}], "n": 1}


def test_unknown_field_is_400_naming_it():
    error = check(bad(Fields, {"model": "m", "functions": []}, CHAT_FIELDS), 400, param="functions")
    assert "functions" in error["message"] and error["type"] == "invalid_request_error"
    Fields({"model": "m", "tools": [], "tool_choice": "auto", "parallel_tool_calls": True}, CHAT_FIELDS)  # tools.py
    check(bad(Fields, {"tools": []}, COMPLETION_FIELDS), 400, param="tools")
    # chat and completion fields differ
    check(bad(Fields, {"prompt": "hi"}, CHAT_FIELDS), 400, param="prompt")
    check(bad(Fields, {"messages": []}, COMPLETION_FIELDS), 400, param="messages")
    # a huge unknown name is cut short in the message and the param
    error = check(bad(Fields, {"x" * 10_000: 1}, CHAT_FIELDS), 400)
    assert len(error["message"]) < 200 and len(error["param"]) == 100


def test_no_op_fields_only_at_their_off_value():
    Fields({"frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "logit_bias": {}}, CHAT_FIELDS)
    Fields({"logprobs": 0, "top_logprobs": None}, CHAT_FIELDS)
    Fields({"echo": False, "suffix": "", "best_of": 1}, COMPLETION_FIELDS)
    for name, value in [("frequency_penalty", 0.5), ("logprobs", True), ("presence_penalty", False),
                        ("best_of", True), ("best_of", 2), ("logit_bias", {"5": 1}), ("echo", 0)]:
        known = COMPLETION_FIELDS if name in ("best_of", "echo") else CHAT_FIELDS
        error = check(bad(Fields, {name: value}, known), 400, param=name)
        assert "not supported" in error["message"]


def test_numbers_are_typed_and_bounded():
    assert (config({"temperature": 0}).temperature, config({"top_p": 1}).top_p) == (0.0, 1.0)
    assert (config({}).temperature, config({}).top_p) == (1.0, 1.0)  # OpenAI's defaults
    for field, value in [("temperature", -0.1), ("temperature", 2.5), ("temperature", "hot"), ("temperature", True),
                         ("top_p", 0), ("top_p", 1.5), ("seed", -1), ("seed", 2**64), ("seed", 1.5),
                         ("max_tokens", 0), ("max_tokens", 2.5), ("max_tokens", True), ("n", 2), ("n", "1"),
                         ("user", 5)]:
        check(bad(config, {field: value}), 400, param=field)
    assert config({"seed": 2**63 - 1, "n": 1, "user": "me"}).seed == 2**63 - 1


def test_stop_strings():
    assert config({"stop": "END"}).stop == ("END",)
    assert config({"stop": ["a", "b"]}, stop_ids=(7,)).stop == ("a", "b", 7)  # the end-of-turn id comes last
    assert config({"stop": None}).stop == ()
    four = [str(i) for i in range(MAX_STOP_STRINGS)]
    assert config({"stop": four}).stop == tuple(four)
    error = check(bad(config, {"stop": [*four, "one more"]}), 400, param="stop")
    assert f"at most {MAX_STOP_STRINGS}" in error["message"] and str(MAX_STOP_STRINGS + 1) in error["message"]
    for value in ["", [""], [1], 5, {"a": 1}]:
        check(bad(config, {"stop": value}), 400, param="stop")


def test_max_tokens_against_the_context():
    assert config({"max_tokens": 246}, prompt_tokens=10, context=256).max_new_tokens == 246  # exactly fills it
    error = check(bad(config, {"max_tokens": 247}, prompt_tokens=10, context=256), 400, param="prompt",
                  code="context_length_exceeded")
    assert "256" in error["message"] and "257" in error["message"] and "10 in the prompt" in error["message"]
    # Without max_tokens: the default, cut to what the context leaves, and an error when it leaves nothing.
    assert config({}, prompt_tokens=10, context=256, default_max_tokens=16).max_new_tokens == 16
    assert config({}, prompt_tokens=250, context=256, default_max_tokens=16).max_new_tokens == 6
    check(bad(config, {}, prompt_tokens=256, context=256, prompt_param="messages"), 400, param="messages",
          code="context_length_exceeded")


def test_max_completion_tokens():
    assert config({"max_completion_tokens": 5}).max_new_tokens == 5
    assert config({"max_tokens": 5, "max_completion_tokens": 5}).max_new_tokens == 5
    assert config({"max_tokens": 5, "max_completion_tokens": None}).max_new_tokens == 5
    check(bad(config, {"max_tokens": 5, "max_completion_tokens": 6}), 400, param="max_completion_tokens")


def test_stream_options():
    assert Fields({}, CHAT_FIELDS).stream() == (False, False)
    assert Fields({"stream": True}, CHAT_FIELDS).stream() == (True, False)
    assert Fields({"stream": True, "stream_options": {"include_usage": True}}, CHAT_FIELDS).stream() == (True, True)
    check(bad(Fields({"stream": 1}, CHAT_FIELDS).stream), 400, param="stream")
    check(bad(Fields({"stream_options": {"include_usage": True}}, CHAT_FIELDS).stream), 400,
          param="stream_options")
    check(bad(Fields({"stream": True, "stream_options": {"x": 1}}, CHAT_FIELDS).stream), 400,
          param="stream_options.x")
    check(bad(Fields({"stream": True, "stream_options": {"include_usage": 1}}, CHAT_FIELDS).stream), 400,
          param="stream_options.include_usage")


def test_model_is_required_and_must_match():
    protocol.check_model(Fields({"model": "tiny"}, CHAT_FIELDS), "tiny")
    check(bad(protocol.check_model, Fields({}, CHAT_FIELDS), "tiny"), 400, param="model")
    check(bad(protocol.check_model, Fields({"model": 3}, CHAT_FIELDS), "tiny"), 400, param="model")
    error = check(bad(protocol.check_model, Fields({"model": "gpt-4"}, CHAT_FIELDS), "tiny"), 404, param="model",
                  code="model_not_found")
    assert "gpt-4" in error["message"] and "tiny" in error["message"]


# ---- messages and prompts ------------------------------------------------------------------------------


def test_parse_messages():
    assert parse_messages([{"role": "developer", "content": "be brief"},
                           {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                            "name": "me"},
                           {"role": "assistant", "content": ""}]) == \
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
         {"role": "assistant", "content": ""}]
    # an assistant's tool calls are kept for tools.render_history; a tool's result keeps its role
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert parse_messages([{"role": "assistant", "content": None, "tool_calls": calls},
                           {"role": "tool", "tool_call_id": "c", "content": "42"}]) == \
        [{"role": "assistant", "content": "", "tool_calls": calls}, {"role": "tool", "content": "42"}]
    ok = {"role": "user", "content": "hi"}
    for messages, param in [([], "messages"), ("hi", "messages"), ([ok, "hi"], "messages[1]"),
                            ([ok, {"role": "function", "content": "x"}], "messages[1].role"),
                            ([ok, {"role": "tool", "content": "x", "tool_calls": calls}], "messages[1].tool_calls"),
                            ([{"role": "user"}], "messages[0].content"),
                            ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                             "messages[0].content"),
                            ([{"role": "user", "content": "hi", "name": 5}], "messages[0].name"),
                            ([{"role": "user", "content": "hi", "tool_calls": []}], "messages[0].tool_calls")]:
        check(bad(parse_messages, messages), 400, param=param)


def test_read_requests_check_in_order():
    """Unknown fields first, then the model, then the required field."""
    check(bad(protocol.read_chat_request, {"model": "other", "bogus": 1}, "tiny"), 400, param="bogus")
    check(bad(protocol.read_chat_request, {"model": "other", "messages": []}, "tiny"), 404, param="model")
    check(bad(protocol.read_chat_request, {"model": "tiny"}, "tiny"), 400, param="messages")
    fields, messages = protocol.read_chat_request({"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
                                                  "tiny")
    assert messages == [{"role": "user", "content": "x"}] and fields.body["model"] == "tiny"
    check(bad(protocol.read_completion_request, {"model": "tiny"}, "tiny"), 400, param="prompt")
    assert protocol.read_completion_request({"model": "tiny", "prompt": [1, 2]}, "tiny")[1] == [1, 2]


class CharTokenizer:
    """One token id per character: enough for parse_prompts, which only calls encode."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_parse_prompts():
    tokenizer = CharTokenizer()
    assert parse_prompts("ab", tokenizer, 1000) == [[97, 98]]
    assert parse_prompts(["ab"], tokenizer, 1000) == [[97, 98]]  # one string in an array
    assert parse_prompts([0, 5, 999], tokenizer, 1000) == [[0, 5, 999]]
    assert parse_prompts(["a", "b"], tokenizer, 1000) == [[97], [98]]  # several prompts: a choice each
    assert parse_prompts([[1], [2, 3]], tokenizer, 1000) == [[1], [2, 3]]
    error = check(bad(parse_prompts, [5, 1000], tokenizer, 1000), 400, param="prompt")
    assert "1000" in error["message"] and "0..999" in error["message"]
    error = check(bad(parse_prompts, ["a", [1, -1]], tokenizer, 1000), 400, param="prompt")
    assert "'prompt[1]'" in error["message"]
    for value in ["", [], [True], [[]], ["a", 5], {"a": 1}, None, 5, [-1], [[1.5]]]:
        check(bad(parse_prompts, value, tokenizer, 1000), 400, param="prompt")


# ---- keys, errors and answers --------------------------------------------------------------------------


def test_api_key():
    check_api_key("", None)  # no key set: anything goes
    check_api_key("Bearer sesame", "sesame")
    check_api_key("bearer  sesame ", "sesame")
    for header in ["", "sesame", "Bearer", "Bearer ", "Basic sesame"]:
        error = bad(check_api_key, header, "sesame")
        assert "didn't provide" in check(error, 401, code="invalid_api_key")["message"]
        assert error.headers == {"WWW-Authenticate": "Bearer"}
    error = bad(check_api_key, "Bearer wrong", "sesame")
    assert "Incorrect" in check(error, 401, code="invalid_api_key")["message"]


def test_error_shapes():
    busy = protocol.busy("the queue is full")
    assert check(busy, 429, code="rate_limit_exceeded")["type"] == "rate_limit_error"
    assert busy.headers == {"Retry-After": "1"}
    assert check(protocol.too_large(), 413, code="request_too_large")["message"].endswith(
        f"larger than {protocol.MAX_BODY_BYTES} bytes.")
    assert check(protocol.server_error(), 500, param=None)["type"] == "server_error"
    error = check(protocol.route_error(404, "GET", "/v1/nothing", "Not Found"), 404, code="not_found")
    assert error["message"] == "GET /v1/nothing: Not Found"
    check(protocol.route_error(405, "GET", "/v1/completions", "Method Not Allowed"), 405, code="method_not_allowed")
    check(protocol.route_error(400, "GET", "/", "Bad"), 400, code=None)
    error = check(protocol.validation_error([{"loc": ("body", "messages", 0), "msg": "bad"}], "x"), 400,
                  param="messages.0")
    assert error["message"] == "Invalid request: bad"
    check(protocol.validation_error([], "x"), 400, param=None)


def test_response_shapes():
    base = protocol.response_base(chat=True, model_name="tiny")
    assert base["id"].startswith("chatcmpl-") and base["model"] == "tiny" and isinstance(base["created"], int)
    assert protocol.response_base(chat=False, model_name="tiny")["id"].startswith("cmpl-")
    assert protocol.response_base(chat=True, model_name="tiny")["id"] != base["id"]
    usage = protocol.usage_counts(5, 3)
    assert usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                     "prompt_tokens_details": {"cached_tokens": 0}}
    assert protocol.usage_counts(70, 3, 64)["prompt_tokens_details"] == {"cached_tokens": 64}

    whole = protocol.completion_response(base, True, "hi", "stop", usage)
    assert whole["object"] == "chat.completion" and whole["usage"] == usage
    assert whole["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
                                 "finish_reason": "stop"}]
    text = protocol.completion_response(base, False, "hi", "length", usage)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "hi"

    assert protocol.chunk(base, True, None, None, role=True)["choices"][0]["delta"] == \
        {"role": "assistant", "content": ""}
    piece = protocol.chunk(base, True, "a", None)
    assert piece["object"] == "chat.completion.chunk" and piece["choices"][0]["delta"] == {"content": "a"}
    last = protocol.chunk(base, True, None, "stop")["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "stop"
    assert protocol.chunk(base, False, None, "length")["choices"][0] == \
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    assert protocol.usage_chunk(base, True, usage) == {**base, "object": "chat.completion.chunk", "choices": [],
                                                       "usage": usage}

    assert protocol.sse("[DONE]") == "data: [DONE]\n\n"
    event = protocol.sse(piece)
    assert event.startswith("data: ") and event.endswith("\n\n") and "\n" not in event[:-2]
    assert json.loads(event.removeprefix("data: ")) == piece


def test_default_model_name():
    class Model:
        def __init__(self, source):
            self.source = source

    assert protocol.default_model_name(Model("/x/SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert protocol.default_model_name(Model("/models/my-run/")) == "my-run"
    assert protocol.default_model_name(Model(None)) == "smollm2"
    assert protocol.default_model_name(object()) == "smollm2"


# ---- the page's files ----------------------------------------------------------------------------------


def test_page_files_are_package_data():
    html = page.read_static("index.html")
    assert html.startswith("<!doctype html>")
    for file in page.PAGE_FILES[1:]:  # the page's own script and style, by relative URL
        assert f'"{file.path.lstrip("/")}"' in html
        assert page.read_static(file.name).strip()
    assert "<script>" not in html and "style=" not in html  # nothing inline: the CSP forbids it
    assert "'unsafe-inline'" not in page.PAGE_HEADERS["Content-Security-Policy"]
    with pytest.raises(FileNotFoundError, match="serve/static"):
        page.read_static("missing.js")
