"""Tool calls (smollm2/serve/tools.py): the prompt in SmolLM2's function-calling format, replies parsed into
OpenAI's message.tool_calls (hand-written replies: one call, several, malformed), tool_choice "required" and
named calls constrained to valid calls (sampled on a random model: every reply parses and its arguments validate
against the schema), streamed deltas, the openai client's round trip with a tool's result, and 400s naming the
field for bad tools, choices and histories."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_utils import instruct_tokenizer, live_server, tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
jsonschema = pytest.importorskip("jsonschema")

from smollm2.serve import create_app  # noqa: E402
from smollm2.serve.protocol import APIError, parse_messages  # noqa: E402
from smollm2.serve.tools import SYSTEM_PROMPT, parse_reply, parse_tools, render_history, with_tools  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8},
                                                                        "hour24": {"type": "boolean"}},
                                       "required": ["zone", "hour24"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def offered(choice="auto"):
    return parse_tools(TOOLS, choice, None)


# ---- the prompt and the reply, without a model ----------------------------------------------------------


def test_replies_parse_into_calls_or_stay_content() -> None:
    tools = offered()
    one = parse_reply('<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>', tools)
    assert [(c.name, c.arguments) for c in one] == [("get_weather", {"city": "Paris"})]
    several = parse_reply('\n<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Oslo"}},\n'
                          '{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\", \\"hour24\\": true}"}\n]', tools)
    assert [(c.name, c.arguments) for c in several] == [("get_weather", {"city": "Oslo"}),
                                                        ("get_time", {"zone": "CET", "hour24": True})]
    assert parse_reply('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', tools)[0].name == "get_time"
    call = one[0].openai()
    assert call["type"] == "function" and call["id"].startswith("call_") and json.loads(
        call["function"]["arguments"]) == {"city": "Paris"}
    assert one[0].openai(3)["index"] == 3
    for text in ("It is sunny in Paris.",
                 '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}]</tool_call>',  # bad JSON
                 '<tool_call>[{"name": "launch_rocket", "arguments": {}}]</tool_call>',  # not a listed function
                 '<tool_call>[{"name": "get_weather", "arguments": [1]}]</tool_call>',  # arguments not an object
                 '<tool_call>[]</tool_call>',  # the format's "no call needed"
                 'Sure! <tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>',  # text before the call
                 '<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call> and more text'):
        assert parse_reply(text, tools) is None, text


def test_the_prompt_is_smollm2s_function_calling_format() -> None:
    tokenizer = instruct_tokenizer()
    history = parse_messages([
        {"role": "system", "content": "Answer briefly."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ])
    messages = with_tools(render_history(history), offered())
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tools_json = json.dumps([{"name": "get_weather", "description": "The weather in a city",
                              "parameters": WEATHER["function"]["parameters"]},
                             {"name": "get_time", "parameters": TIME["function"]["parameters"]}])
    system = SYSTEM_PROMPT.format(tools=tools_json)
    assert "<tools>[{\"name\": \"get_weather\"" in system
    assert system.endswith("(more tool calls as required)\n]</tool_call>")
    assert prompt == (
        f"<|im_start|>system\n{system}\n\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_call>'
        "<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"sky": "clear"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n")


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([], None, "tools"),
    ("get_weather", None, "tools"),
    ([{"type": "function"}], None, "tools[0]"),
    ([{"type": "retrieval", "function": {"name": "x"}}], None, "tools[0]"),
    ([{"type": "function", "function": {"name": "get weather"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}], None,
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "x", "colour": "red"}}], None, "tools[0].function.colour"),
    ([{"type": "function", "function": {"name": "x"}, "colour": "red"}], None, "tools[0].colour"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    (TOOLS, {"type": "function", "function": {"name": "launch_rocket"}}, "tool_choice.function.name"),
    (TOOLS, "always", "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_name_the_field(tools, choice, param) -> None:
    with pytest.raises(APIError) as raised:
        parse_tools(tools, choice, None)
    assert raised.value.status == 400 and raised.value.param == param, raised.value


# ---- through the server, on a random model -------------------------------------------------------------


@pytest.fixture(scope="module")
def url():
    with live_server(create_app(tiny_model(), instruct_tokenizer(), model_name="tiny")) as url:
        yield url


def api(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_required_and_named_calls_are_always_valid(url) -> None:
    """Sampled at temperature 1 on a random model, a constrained reply is still a valid call every time (the
    schemas bound their strings: a random model would otherwise fill max_tokens inside one, a cut-off call)."""
    client = api(url)
    for seed in range(12):
        reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                               temperature=1, seed=seed, max_tokens=400)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named,
                                               temperature=1, seed=seed, max_tokens=400)
        (call,) = reply.choices[0].message.tool_calls  # one call, of that function
        assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_time"])


def test_streamed_calls_equal_the_whole_reply(url) -> None:
    client = api(url)
    whole = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=200)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                                 temperature=0, max_tokens=200, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(whole.choices[0].message.tool_calls)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # nothing leaked as content


def test_auto_and_none_leave_plain_replies_as_content(url) -> None:
    client = api(url)
    for choice in ("auto", "none"):
        whole = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                               temperature=0, max_tokens=12)
        streamed = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                  temperature=0, max_tokens=12, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert whole.choices[0].message.tool_calls is None and whole.choices[0].finish_reason == "length"
        assert text == whole.choices[0].message.content  # held back while it might have been a call, then sent
    # "none" shows the model no tools: the prompt is the plain chat's
    plain = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=12)
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=12)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_the_clients_round_trip_with_a_tools_result(url) -> None:
    client = api(url)
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=200)
    message = first.choices[0].message
    history = [*ASK, message.model_dump(exclude_none=True),
               *({"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "celsius": 21}'}
                 for call in message.tool_calls)]
    second = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, temperature=0,
                                            max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": {"a": {"type": 5}}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [*ASK, {"role": "tool", "content": "x", "tool_call_id": 5}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"parallel_tool_calls": "yes", "tools": TOOLS}, "parallel_tool_calls"),
])
def test_bad_tool_requests_are_400(url, body, param) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": ASK, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


# ---- the real model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_real_model_calls_the_weather_tool_for_paris(real) -> None:
    with live_server(create_app(*real, model_name="smollm2")) as url:
        reply = api(url).chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER],
                                                 tool_choice="required", temperature=0, max_tokens=60)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
