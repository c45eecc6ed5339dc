"""Tool calls: OpenAI's `tools` / `tool_choice` on chat completions, in the format SmolLM2's instruct models were
trained on (Hugging Face's instructions_function_calling.md for SmolLM2-1.7B-Instruct; Ollama's SmolLM2 template
renders the same text):

    system:    "You are an expert in composing functions. ... <tools>[{"name", "description", "parameters"}]</tools>
                ... <tool_call>[ {"name": ..., "arguments": {...}}, ... ]</tool_call>"
    assistant: <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>
    tool:      a user turn "<tool_response>\\n{content}\\n</tool_response>"

The reply's <tool_call> list becomes `message.tool_calls` with finish_reason "tool_calls"; a reply that is not a
well-formed call of a listed function stays plain content (finish_reason "stop"). With tool_choice "required" or
a named function the reply is constrained (llguidance, the `grammar` extra) to such a call, its arguments valid
against the function's JSON schema (and, unless the schema says otherwise, no arguments it does not declare);
"auto" lets the model choose, "none" leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .protocol import APIError, invalid, json_type, show

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
SYSTEM_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the functions can be used, point it out and refuse to answer.\n"
    "If the given question lacks the parameters required by the function, also point it out.\n"
    "You have access to the following tools:\n"
    "<tools>{tools}</tools>\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct. If no function call is "
    "needed, please make the tool calls an empty list '[]'.\n"
    "<tool_call>[\n"
    '{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
    "(more tool calls as required)\n"
    "]</tool_call>"
)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def described(self) -> dict[str, Any]:
        """The function as the system prompt lists it."""
        return {"name": self.name, **({"description": self.description} if self.description else {}),
                "parameters": self.parameters}


@dataclass(frozen=True)
class Tools:
    """A request's tools and what tool_choice asks: "auto", "none", "required" or "function" (then `name`)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True  # parallel_tool_calls: more than one call in a reply

    @property
    def offered(self) -> bool:
        """Whether the model is shown the tools (and its reply read for calls)."""
        return bool(self.tools) and self.choice != "none"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's message.tool_calls entry (with `index`: a streamed delta's)."""
        entry = {"id": self.id, "type": "function",
                 "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return {"index": index, **entry} if index is not None else entry


# ---- the request ---------------------------------------------------------------------------------------


def parse_tools(tools: object, tool_choice: object, parallel: object) -> Tools | None:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls`; None when it has no tools."""
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid(f"Invalid type for 'parallel_tool_calls': expected a boolean, but got {json_type(parallel)}.",
                      "parallel_tool_calls")
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise invalid("'tool_choice' needs 'tools'.", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise invalid("Invalid value for 'tools': expected a non-empty array of {\"type\": \"function\", "
                      "\"function\": {...}} objects.", "tools")
    parsed = [_parse_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    names = [t.name for t in parsed]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise invalid(f"Invalid value for 'tools[{i}].function.name': {show(name)} is listed twice.",
                          f"tools[{i}].function.name")
    choice, name = _parse_choice(tool_choice, names)
    return Tools(tuple(parsed), choice, name, parallel is not False)


def _parse_tool(tool: object, where: str) -> Tool:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise invalid(f"Invalid value for '{where}': expected {{\"type\": \"function\", \"function\": {{\"name\", "
                      "\"description\", \"parameters\"}}}}.", where)
    function = tool["function"]
    for inside, keys, allowed in ((where, tool, {"type", "function"}),
                                  (f"{where}.function", function, {"name", "description", "parameters", "strict"})):
        unknown = sorted(set(keys) - allowed)
        if unknown:
            raise invalid(f"Unrecognized argument in '{inside}': {show(unknown[0])}",
                          f"{inside}.{str(unknown[0])[:100]}")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise invalid(f"Invalid value for '{where}.function.name': {show(name)} (1 to 64 letters, digits, '_' or "
                      "'-').", f"{where}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid(f"Invalid type for '{where}.function.description': expected a string.",
                      f"{where}.function.description")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise invalid(f"Invalid value for '{where}.function.parameters': expected a JSON schema of type "
                      "\"object\".", f"{where}.function.parameters")
    return Tool(name, description, parameters)


def _parse_choice(value: object, names: list[str]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if value in ("auto", "none", "required"):
        return str(value), None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if name not in names:
            raise invalid(f"Invalid value for 'tool_choice.function.name': {show(name)} is not in 'tools' "
                          f"({', '.join(names)}).", "tool_choice.function.name")
        return "function", str(name)
    raise invalid(f"Invalid value for 'tool_choice': {show(value)} (supported: \"auto\", \"none\", \"required\", "
                  "or {\"type\": \"function\", \"function\": {\"name\": ...}}).", "tool_choice")


def render_tool_calls(value: object, where: str) -> str:
    """An assistant message's `tool_calls` (from an earlier reply) as the model wrote them."""
    if not isinstance(value, list) or not value:
        raise invalid(f"Invalid value for '{where}': expected a non-empty array of tool calls.", where)
    calls = []
    for i, call in enumerate(value):
        here = f"{where}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), str):
            raise invalid(f"Invalid value for '{here}': expected {{\"id\", \"type\": \"function\", \"function\": "
                          "{\"name\", \"arguments\": JSON text}}.", here)
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError as e:
            raise invalid(f"Invalid value for '{here}.function.arguments': not JSON ({e}).",
                          f"{here}.function.arguments") from None
        calls.append(json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False))
    return OPEN + "[\n" + ",\n".join(calls) + "\n]" + CLOSE


def render_history(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """parse_messages' messages as the chat template takes them: an assistant's earlier tool calls written
    into its content as the model writes them, a tool's result as a user turn in <tool_response> tags."""
    rendered = []
    for i, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
            continue
        if "tool_calls" in message:
            calls = render_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
            content = f"{content}\n{calls}" if content else calls
        rendered.append({"role": message["role"], "content": content})
    return rendered


def with_tools(messages: list[dict[str, str]], tools: Tools) -> list[dict[str, str]]:
    """The messages with the tools' system prompt first (a system message of the request's own follows it in
    the same turn)."""
    prompt = SYSTEM_PROMPT.format(tools=json.dumps([t.described() for t in tools.tools], ensure_ascii=False))
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{prompt}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def constraint(tools: Tools):  # -> Constraint | None
    """With tool_choice "required" or a named function: a grammar whose every sentence is a call list of the
    allowed functions, each call's arguments valid against its schema (llguidance's Lark with %json)."""
    if tools.choice not in ("required", "function"):
        return None
    allowed = [t for t in tools.tools if tools.choice == "required" or t.name == tools.name]
    try:
        from ..inference.constraints import JSON_FORMAT, Constraint

        rules = []
        for i, tool in enumerate(allowed):
            try:  # each schema alone first, so an error names its tool
                Constraint.json_schema(tool.parameters)
            except ValueError as e:
                where = f"tools[{tools.tools.index(tool)}].function.parameters"
                raise invalid(f"Invalid value for '{where}': {e}", where) from None
            # arguments beyond the declared ones are left out unless the schema allows them (a function
            # called with an unknown keyword fails), as OpenAI's strict mode does
            arguments = {"additionalProperties": False, **tool.parameters}
            schema = {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": arguments},
                      "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_FORMAT}
            rules.append(f"call{i}: %json {json.dumps(schema)}")
        more = ' (SEP call)*' if tools.parallel and tools.choice == "required" else ""
        grammar = "\n".join([
            f'start: "{OPEN}[" NL? call{more} NL? "]{CLOSE}"',
            "call: " + " | ".join(f"call{i}" for i in range(len(allowed))),
            'SEP: /,\\n?/', "NL: /\\n/",
            *rules,
        ])
        return Constraint.lark(grammar)
    except ImportError as e:
        raise APIError(501, f"This server cannot constrain its output to a tool call: {e}", type="server_error",
                       param="tool_choice") from None


# ---- the reply -----------------------------------------------------------------------------------------


def parse_reply(text: str, tools: Tools) -> list[ToolCall] | None:
    """The calls, when the reply is a <tool_call> list (or one call) of listed functions with object arguments
    and nothing else (the closing tag may be missing: the model can end its turn there); None when it is not,
    and the reply is then plain content."""
    text = text.strip()
    if not text.startswith(OPEN):
        return None
    end = text.find(CLOSE)
    if end >= 0 and text[end + len(CLOSE):].strip():
        return None
    body = text[len(OPEN): end if end >= 0 else len(text)]
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    names = {t.name for t in tools.tools}
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):  # some replies quote the arguments object
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(item["name"], arguments))
    return calls or None  # "[]": the model says no call is needed


def may_become_a_call(text: str) -> bool:
    """Whether a reply that begins so could still be a tool call (a stream holds such text back)."""
    stripped = text.lstrip()
    return stripped.startswith(OPEN) or OPEN.startswith(stripped)
