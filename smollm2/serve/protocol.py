"""The OpenAI API's wire format, without a web framework: reading request bodies and answering in OpenAI's shapes.

Everything here is plain Python over dicts and strings (no FastAPI, Starlette or uvicorn, no engine thread), so
it can be tested directly: the body's JSON, each field's type and range, the prompt or the chat messages, the
sampling options as a GenerationConfig, the API key check, and the dicts of responses, stream chunks and errors.
smollm2/serve/app.py wires these to HTTP.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..inference.config import GenerationConfig

if TYPE_CHECKING:
    from ..model import SmolLM2
    from ..tokenizer import Tokenizer

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 8k-token context is ~40 KB of text, so this is generous
MAX_STOP_STRINGS = 4  # OpenAI's limit
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",  # -> template role
         "tool": "tool"}  # (a tool's result: tools.render_history makes it a user turn)

_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                  "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                "tool_choice", "parallel_tool_calls"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}
# Accepted only at the value that means "off": the engine has no such penalties (chat completions have logprobs:
# CHAT_OPTIONS; completions logprobs and echo: COMPLETION_OPTIONS).
_NO_OP_VALUES = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "logprobs": (False, 0),
                 "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "best_of": (1,)}
CHAT_OPTIONS = {"logprobs", "top_logprobs"}  # checked by chat_logprobs instead
COMPLETION_OPTIONS = {"logprobs", "echo"}  # checked by completion_logprobs instead
MAX_PROMPTS = 64  # prompts in one completion request (each is a job: one choice each)
_ROUTE_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


# ---- errors ----------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error response in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400: the request's body or one of its parameters is wrong."""
    return APIError(400, message, param=param, code=code)


def too_large() -> APIError:
    return APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.", code="request_too_large")


def busy(reason: object) -> APIError:
    """A 429: the engine's queue is full (clients retry after Retry-After)."""
    return APIError(429, f"The server is busy: {reason}", type="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": "1"})


def server_error(message: str = "The server had an error while processing your request.") -> APIError:
    return APIError(500, message, type="server_error")


def route_error(status: int, method: str, path: str, detail: object,
                headers: dict[str, str] | None = None) -> APIError:
    """An unknown path (404) or method (405), or another error the router raised, in OpenAI's shape."""
    return APIError(status, f"{method} {path}: {detail}", code=_ROUTE_ERROR_CODES.get(status), headers=headers)


def validation_error(errors: list[dict[str, Any]], fallback: object) -> APIError:
    """A 400 from the framework's own validation (errors as pydantic lists them: the first one is named)."""
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return invalid(f"Invalid request: {first.get('msg', fallback)}", param)


def check_api_key(authorization: str, api_key: str | None) -> None:
    """A 401 unless the Authorization header is 'Bearer <api_key>' (nothing is needed when api_key is None)."""
    if api_key is None:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):  # constant time
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


# ---- reading a request -----------------------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; anything that is not exactly that is a 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"The request body is not valid UTF-8 (byte {e.start} is {raw[e.start:e.start + 1]!r}).") \
            from None

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(text, parse_constant=no_constants)  # NaN and Infinity are Python's, not JSON's
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise invalid(f"The request body is not valid JSON ({str(e) or type(e).__name__}).") from None
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, got {json_type(body)}.")
    _check_strings(body)
    return body


def _check_strings(value: object) -> None:
    """Reject lone surrogates ("\\ud800"): JSON escapes can spell them, UTF-8 (and the tokenizer) cannot."""
    stack = [value]
    while stack:  # iterative: the nesting depth is the client's choice
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise invalid(f"The request body contains a lone surrogate ({item[e.start]!r}), which is not "
                              "valid Unicode text.") from None


def _same(value: object, expected: object) -> bool:
    """value == expected, without Python's True == 1 == 1.0 (but 0 and 0.0 are the same JSON number)."""
    number = (int, float)
    return (value == expected and isinstance(value, bool) == isinstance(expected, bool)
            and isinstance(value, number) == isinstance(expected, number))


def show(value: object, limit: int = 60) -> str:
    """A client's value for an error message, cut short: the message must not echo a 1 MiB body."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_type(value: object) -> str:
    """What a JSON value is, as an error message says it: "an integer", "null", ..."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class Fields:
    """A request's JSON object, read one field at a time; each bad field is a 400 that names it."""

    def __init__(self, body: dict[str, Any], known: set[str], supported: set[str] = frozenset()) -> None:
        unknown = sorted(set(body) - known)
        if unknown:
            raise invalid(f"Unrecognized request argument supplied: {show(unknown[0])}", unknown[0][:100])
        for name, allowed in _NO_OP_VALUES.items():
            if name in supported:
                continue
            value = body.get(name)
            if value is not None and not any(_same(value, a) for a in allowed):
                raise invalid(f"'{name}' is not supported by this server (only {allowed[0]!r} or null), "
                              f"got {show(value)}", name)
        self.body = body

    def get(self, name: str, kinds: tuple[type, ...], what: str) -> Any:
        value = self.body.get(name)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise invalid(f"Invalid type for '{name}': expected {what}, but got {json_type(value)}.", name)
        return value

    def number(self, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
        value = self.get(name, (int, float), "a number")
        if value is None:
            return default
        if not (low < value <= high if low_open else low <= value <= high):
            bounds = f"{'>' if low_open else '>='} {low} and <= {high}"
            raise invalid(f"Invalid value for '{name}': {show(value)} (it must be {bounds}).", name)
        return float(value)

    def integer(self, name: str, low: int, high: int | None = None) -> int | None:
        value = self.get(name, (int,), "an integer")
        if value is not None and (value < low or (high is not None and value > high)):
            bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise invalid(f"Invalid value for '{name}': {show(value)} (it must be {bounds}).", name)
        return value

    def stop(self) -> list[str]:
        value = self.body.get("stop")
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return []
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise invalid("Invalid value for 'stop': expected a non-empty string or an array of them.", "stop")
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid(f"Invalid value for 'stop': at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}.",
                          "stop")
        return stops

    def stream(self) -> tuple[bool, bool]:
        """(stream, include_usage)."""
        stream = bool(self.get("stream", (bool,), "a boolean"))
        options = self.get("stream_options", (dict,), "an object")
        if options is None:
            return stream, False
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        unknown = sorted(set(options) - {"include_usage"})
        if unknown:
            raise invalid(f"Unrecognized argument in 'stream_options': {show(unknown[0])}",
                          f"stream_options.{unknown[0][:100]}")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise invalid("Invalid type for 'stream_options.include_usage': expected a boolean.",
                          "stream_options.include_usage")
        return stream, include_usage


def check_model(fields: Fields, served: str) -> None:
    """A 400 without a model, a 404 for any model but the one this server runs."""
    requested = fields.get("model", (str,), "a string")
    if requested is None:
        raise invalid("You must provide a model parameter.", "model")
    if requested != served:
        raise APIError(404, f"The model {show(requested)} does not exist; this server runs '{served}'.",
                       param="model", code="model_not_found")


def read_chat_request(body: dict[str, Any], served: str) -> tuple[Fields, list[dict[str, str]]]:
    """A /v1/chat/completions body -> (its fields, the messages for the chat template)."""
    fields = Fields(body, CHAT_FIELDS, CHAT_OPTIONS)
    check_model(fields, served)
    if "messages" not in fields.body:
        raise invalid("Missing required parameter: 'messages'.", "messages")
    return fields, parse_messages(fields.body["messages"])


def read_completion_request(body: dict[str, Any], served: str) -> tuple[Fields, object]:
    """A /v1/completions body -> (its fields, the prompt as sent; parse_prompts turns it into token ids)."""
    fields = Fields(body, COMPLETION_FIELDS, COMPLETION_OPTIONS)
    check_model(fields, served)
    if "prompt" not in fields.body:
        raise invalid("Missing required parameter: 'prompt'.", "prompt")
    return fields, fields.body["prompt"]


def parse_messages(value: object) -> list[dict[str, Any]]:
    """OpenAI chat messages -> [{"role", "content"}] (text content only), an assistant's earlier `tool_calls`
    kept beside its content (tools.render_history writes them into it for the chat template)."""
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty array of {\"role\", \"content\"} objects.", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{where}' must be an object with 'role' and 'content', got {json_type(message)}.",
                          where)
        role = message.get("role")
        extra = {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}.get(role, set()) if isinstance(role, str) \
            else set()
        unknown = sorted(set(message) - {"role", "content", "name"} - extra)
        if unknown:
            raise invalid(f"Unrecognized argument in '{where}': {show(unknown[0])}", f"{where}.{unknown[0][:100]}")
        if role not in ROLES:
            raise invalid(f"Invalid value for '{where}.role': {show(role)} (supported: system, developer, user, "
                          "assistant, tool).", f"{where}.role")
        content = message.get("content")
        if content is None and message.get("tool_calls") is not None:
            content = ""  # an assistant turn that only called tools
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       and set(p) == {"type", "text"} for p in content):
                raise invalid(f"Invalid value for '{where}.content': only text parts "
                              "({\"type\": \"text\", \"text\": ...}) are supported.", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"Invalid type for '{where}.content': expected a string or an array of text parts, "
                          f"but got {json_type(content)}.", f"{where}.content")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise invalid(f"Invalid type for '{where}.name': expected a string.", f"{where}.name")
        if role == "tool" and not isinstance(message.get("tool_call_id", ""), str):
            raise invalid(f"Invalid type for '{where}.tool_call_id': expected a string.", f"{where}.tool_call_id")
        parsed = {"role": ROLES[role], "content": content}
        if message.get("tool_calls") is not None:
            parsed["tool_calls"] = message["tool_calls"]  # checked where they are rendered (tools.py)
        messages.append(parsed)
    return messages


def parse_prompts(value: object, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    """A completion's prompt -> token ids, one list per prompt: a string (special tokens allowed), an array of
    token ids, or an array of several strings or token-id arrays (one choice each, as OpenAI's API batches)."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > MAX_PROMPTS:
            raise invalid(f"Invalid value for 'prompt': {len(value)} prompts; at most {MAX_PROMPTS} in one "
                          "request.", "prompt")
        return [parse_prompt(p, tokenizer, vocab_size, f"prompt[{i}]") for i, p in enumerate(value)]
    return [parse_prompt(value, tokenizer, vocab_size)]


def parse_prompt(value: object, tokenizer: Tokenizer, vocab_size: int, where: str = "prompt") -> list[int]:
    """One prompt -> token ids: a non-empty string or a non-empty array of token ids."""
    if isinstance(value, str):
        if not value:
            raise invalid(f"'{where}' must not be empty.", "prompt")
        return tokenizer.encode(value)
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        bad = [t for t in value if not 0 <= t < vocab_size]
        if bad:
            raise invalid(f"Invalid value for '{where}': token id {bad[0]} is outside the vocabulary "
                          f"(0..{vocab_size - 1}).", "prompt")
        return list(value)
    raise invalid(f"Invalid value for '{where}': expected a non-empty string, a non-empty array of token ids, "
                  "or an array of such prompts.", "prompt")


def response_format(fields: Fields):  # -> Constraint | None
    """OpenAI's response_format: {"type": "text"} (no constraint), {"type": "json_object"}, or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}: the reply's tokens are
    then constrained to JSON (valid against the schema), whatever `strict` says."""
    value = fields.get("response_format", (dict,), "an object")
    if value is None:
        return None
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise invalid(f"Invalid value for 'response_format.type': {show(kind)} (supported: text, json_object, "
                      "json_schema).", "response_format.type")
    unknown = sorted(set(value) - allowed[kind])
    if unknown:
        raise invalid(f"Unrecognized argument in 'response_format': {show(unknown[0])}",
                      f"response_format.{str(unknown[0])[:100]}")
    if kind == "text":
        return None
    try:
        from ..inference.constraints import Constraint

        if kind == "json_object":
            return Constraint.json_object()
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid("Missing required parameter: 'response_format.json_schema' (an object with 'name' and "
                          "'schema').", "response_format.json_schema")
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise invalid(f"Unrecognized argument in 'response_format.json_schema': {show(unknown[0])}",
                          f"response_format.json_schema.{str(unknown[0])[:100]}")
        name = spec.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise invalid("Invalid value for 'response_format.json_schema.name': a string of 1 to 64 characters "
                          "is required.", "response_format.json_schema.name")
        if "strict" in spec and not isinstance(spec["strict"], bool) and spec["strict"] is not None:
            raise invalid("Invalid type for 'response_format.json_schema.strict': expected a boolean.",
                          "response_format.json_schema.strict")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise invalid(f"Invalid type for 'response_format.json_schema.schema': expected an object, but got "
                          f"{json_type(schema)}.", "response_format.json_schema.schema")
        return Constraint.json_schema(schema)
    except ImportError as e:
        raise APIError(501, f"This server cannot constrain its output: {e}", type="server_error",
                       param="response_format") from None
    except ValueError as e:
        raise invalid(f"Invalid 'response_format': {e}", "response_format") from None


def chat_logprobs(fields: Fields) -> int | None:
    """logprobs (a boolean) and top_logprobs (0-20, only with logprobs) of a chat request: None when off."""
    on = fields.get("logprobs", (bool,), "a boolean")
    top = fields.integer("top_logprobs", 0, 20)
    if top is not None and not on:
        raise invalid("'top_logprobs' needs 'logprobs' to be true.", "top_logprobs")
    return (top or 0) if on else None


def read_tokenize_request(body: dict[str, Any]) -> str:
    """A /tokenize body, {"prompt": text, "add_special_tokens": bool}, -> the text (SmolLM2's tokenizer adds no
    special tokens of its own, so the flag changes nothing)."""
    unknown = sorted(set(body) - {"prompt", "add_special_tokens", "model"})
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise invalid(f"Invalid type for 'prompt': expected a string, but got {json_type(prompt)}.", "prompt")
    if not isinstance(body.get("add_special_tokens", False), bool):
        raise invalid("Invalid type for 'add_special_tokens': expected a boolean.", "add_special_tokens")
    return prompt


def read_detokenize_request(body: dict[str, Any], vocab_size: int) -> list[int]:
    """A /detokenize body, {"tokens": [ids]}, -> the ids."""
    unknown = sorted(set(body) - {"tokens", "model"})
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise invalid("Invalid value for 'tokens': expected an array of token ids.", "tokens")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise invalid(f"Invalid value for 'tokens': token id {bad[0]} is outside the vocabulary "
                      f"(0..{vocab_size - 1}).", "tokens")
    return ids


def tokenizer_info(tokenizer: Tokenizer, context: int) -> dict[str, Any]:
    """GET /tokenizer_info, as vLLM answers it: the special tokens, the chat template, the context length."""

    def name(token_id: int | None) -> str | None:
        return tokenizer.decode([token_id]) if token_id is not None else None

    return {"tokenizer_class": "smollm2.Tokenizer", "eos_token": name(tokenizer.eos_id),
            "bos_token": name(tokenizer.bos_id), "pad_token": name(tokenizer.pad_id),
            "chat_template": tokenizer.chat_template, "model_max_length": context}


def completion_logprobs(fields: Fields) -> tuple[bool, int | None]:
    """(echo, logprobs) of a completion request: echo the prompt before the completion (a boolean); logprobs the
    number of most likely tokens (0-20) reported beside each token's own log-probability, None when off."""
    echo = fields.get("echo", (bool,), "a boolean") or False
    return echo, fields.integer("logprobs", 0, 20)


def text_completion_logprobs(tokenizer: Tokenizer, entries: list, offset: int = 0) -> dict[str, Any]:
    """The completions API's choice.logprobs for (token id, TokenLogprob) pairs (None for an echoed prompt's first
    token, which has no log-probability): each token's text, its log-probability, the most likely tokens there
    as {text: logprob}, and each token's character offset in the text, counted from `offset`."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for token, record in entries:
        text = tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")
        tokens.append(text)
        token_logprobs.append(record.logprob if record is not None else None)
        top_logprobs.append({tokenizer.decode_bytes([t]).decode("utf-8", errors="replace"): lp
                             for t, lp in record.top} if record is not None else None)
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def logprobs_content(tokenizer: Tokenizer, records: list) -> list[dict[str, Any]]:
    """OpenAI's choice.logprobs.content for recorded TokenLogprobs: each token's text, UTF-8 bytes, log-prob and
    its top alternatives."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [{**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top]} for r in records]


def generation_config(fields: Fields, prompt_tokens: int, context: int, *, default_max_tokens: int,
                      prompt_param: str, stop_ids: tuple[int, ...] = (), constraint=None,
                      logprobs: int | None = None, min_tokens: int = 1) -> GenerationConfig:
    """The request's sampling options, after checking them and the prompt's length against the context.
    min_tokens 0 (completions with echo): max_tokens 0 asks for the prompt's log-probabilities alone; the
    config then says 1 and the caller generates nothing (wants_no_tokens)."""
    max_tokens = fields.integer("max_tokens", min_tokens)
    if "max_completion_tokens" in fields.body:  # the chat API's newer name for the same thing
        newer = fields.integer("max_completion_tokens", 1)
        if max_tokens is not None and newer is not None and newer != max_tokens:
            raise invalid("'max_tokens' and 'max_completion_tokens' disagree; send one of them.",
                          "max_completion_tokens")
        max_tokens = newer if newer is not None else max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, context - prompt_tokens))
    if prompt_tokens + max_tokens > context:
        raise invalid(f"This model's maximum context length is {context} tokens. However, you requested "
                      f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {prompt_param}, {max_tokens} "
                      "in the completion). Please reduce the length of the messages or completion.",
                      prompt_param, code="context_length_exceeded")
    n = fields.get("n", (int,), "an integer")
    if n is not None and n != 1:
        raise invalid(f"Invalid value for 'n': {show(n)}; this server generates one choice per request (n=1).", "n")
    fields.get("user", (str,), "a string")
    try:
        return GenerationConfig(
            max_new_tokens=max(max_tokens, 1),
            temperature=fields.number("temperature", 1.0, 0.0, 2.0),
            top_p=fields.number("top_p", 1.0, 0.0, 1.0, low_open=True),
            seed=fields.integer("seed", 0, 2**63 - 1),
            stop=(*fields.stop(), *stop_ids),
            constraint=constraint,
            logprobs=logprobs,
        )
    except ValueError as e:  # the checks above should catch everything first; never a 500 if they don't
        raise invalid(str(e)) from None


def wants_no_tokens(fields: Fields) -> bool:
    """max_tokens 0 (accepted with echo only, by generation_config): score the prompt, generate nothing."""
    value = fields.body.get("max_tokens")
    return value == 0 and not isinstance(value, bool)


# ---- answering -------------------------------------------------------------------------------------------


def default_model_name(model: SmolLM2) -> str:
    """"SmolLM2-135M-Instruct" for the bundled weights; else the source's file or directory name."""
    source = getattr(model, "source", None)
    if not source:
        return "smollm2"
    name = Path(str(source)).name
    return name.split(".")[0] if name.endswith(".gguf") else name


def model_card(name: str, created: int) -> dict[str, Any]:
    """The one model this server runs, as /v1/models lists it."""
    return {"id": name, "object": "model", "created": created, "owned_by": "smollm2"}


def response_base(chat: bool, model_name: str) -> dict[str, Any]:
    """The fields every response and chunk of one request share: a fresh id, the time, the model."""
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model_name}


def usage_counts(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: the prompt tokens whose keys/values came from the prefix cache
    (prefilled for an earlier request that began the same way), as OpenAI reports its own prompt caching."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def add_usage(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The usage of two jobs together (a request of several prompts)."""
    return usage_counts(a["prompt_tokens"] + b["prompt_tokens"], a["completion_tokens"] + b["completion_tokens"],
                        a["prompt_tokens_details"]["cached_tokens"] + b["prompt_tokens_details"]["cached_tokens"])


def completion_response(base: dict[str, Any], chat: bool, text: str, finish_reason: str | None,
                        usage: dict[str, Any], logprobs: Any = None,
                        tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A whole (non-streamed) reply: a chat.completion with a message, or a text_completion with text. logprobs:
    logprobs_content's list (chat) or text_completion_logprobs' object (completions). tool_calls: the message's
    calls instead of content."""
    if chat:
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls} if tool_calls else \
            {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message,
                  "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
                  "finish_reason": finish_reason}
    else:
        choice = text_choice(0, text, finish_reason, logprobs)
    return {**base, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": usage}


def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def text_completion_response(base: dict[str, Any], choices: list[dict[str, Any]], usage: dict[str, Any]
                             ) -> dict[str, Any]:
    """A completion of several prompts: one choice each, in the prompts' order."""
    return {**base, "object": "text_completion", "choices": choices, "usage": usage}


def chunk(base: dict[str, Any], chat: bool, text: str | None, finish_reason: str | None,
          role: bool = False, logprobs: Any = None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One streamed piece: chat chunks carry a delta (the first one the role; or tool calls, each with its
    index), completion chunks the text."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {"index": 0, "delta": delta,
                  "logprobs": {"content": logprobs, "refusal": None} if logprobs else None,
                  "finish_reason": finish_reason}
        return {**base, "object": "chat.completion.chunk", "choices": [choice]}
    return {**base, "object": "text_completion", "choices": [text_choice(0, text or "", finish_reason, logprobs)]}


def usage_chunk(base: dict[str, Any], chat: bool, usage: dict[str, Any]) -> dict[str, Any]:
    """The stream's last chunk with `stream_options.include_usage`: no choices, the token counts."""
    return {**base, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
            "usage": usage}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: a dict as JSON, or a string ("[DONE]") as it is."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
