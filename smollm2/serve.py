"""An OpenAI-compatible HTTP server over the batching engine, with a chat page at `/`.

    GET  /v1/models                 the one model this server runs
    POST /v1/completions            text after a prompt (a string, or a list of token ids)
    POST /v1/chat/completions       the assistant's reply to messages, with the model's chat template
    GET  /health                    liveness and the engine's load; never needs the API key
    GET  /                          the chat page (chat_page.py)

Both POST endpoints answer with one JSON object, or with server-sent events (`"stream": true`): one
`data: {chunk}` per piece of text, a last chunk with finish_reason, a usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`. Supported parameters: model, max_tokens
(max_completion_tokens), temperature, top_p, stop (up to 4 strings), seed, n (1 only), stream, stream_options,
user; presence_penalty, frequency_penalty, logit_bias, logprobs, echo, suffix and best_of only at their
no-op values. Any other field is a 400, as OpenAI answers. Defaults are OpenAI's: temperature 1, top_p 1,
max_tokens 16 for completions; for chat, GenerationConfig's max_new_tokens (OpenAI's "the rest of the
context" would let one request hold a slot for 8k tokens).

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for any invalid body or
parameter (including invalid UTF-8 and lone surrogates, and context_length_exceeded with the numbers), 401
for a missing or wrong API key, 404 for an unknown model or path, 413 for bodies over 1 MiB, 429 when the
engine's queue is full. A client that disconnects has its generation cancelled within a step or two.

FastAPI is imported inside the functions that need it, so `import smollm2.serve` works without the extra.
(No `from __future__ import annotations` here: FastAPI reads the route functions' annotations to inject
`Request`, and it can resolve only real objects, not strings naming a class imported inside create_app.)
"""

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, Engine, Job, QueueFull
from .generate import GenerationConfig, StepFn, decode_step

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from starlette.responses import Response

    from .model import SmolLM2
    from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 8k-token context is ~40 KB of text, so this is generous
MAX_STOP_STRINGS = 4  # OpenAI's limit
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # -> template role

_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                  "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}
# Accepted only at the value that means "off": the engine has no penalties, logprobs or echo.
_NO_OP_VALUES = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "logprobs": (False, 0),
                 "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "best_of": (1,)}


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
    return APIError(400, message, param=param, code=code)


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
        raise invalid(f"The request body must be a JSON object, got {_json_type(body)}.")
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


def _show(value: object, limit: int = 60) -> str:
    """A client's value for an error message, cut short: the message must not echo a 1 MiB body."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class Fields:
    """A request's JSON object, read one field at a time; each bad field is a 400 that names it."""

    def __init__(self, body: dict[str, Any], known: set[str]) -> None:
        unknown = sorted(set(body) - known)
        if unknown:
            raise invalid(f"Unrecognized request argument supplied: {_show(unknown[0])}", unknown[0][:100])
        for name, allowed in _NO_OP_VALUES.items():
            value = body.get(name)
            if value is not None and not any(_same(value, a) for a in allowed):
                raise invalid(f"'{name}' is not supported by this server (only {allowed[0]!r} or null), "
                              f"got {_show(value)}", name)
        self.body = body

    def get(self, name: str, kinds: tuple[type, ...], what: str) -> Any:
        value = self.body.get(name)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise invalid(f"Invalid type for '{name}': expected {what}, but got {_json_type(value)}.", name)
        return value

    def number(self, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
        value = self.get(name, (int, float), "a number")
        if value is None:
            return default
        if not (low < value <= high if low_open else low <= value <= high):
            bounds = f"{'>' if low_open else '>='} {low} and <= {high}"
            raise invalid(f"Invalid value for '{name}': {_show(value)} (it must be {bounds}).", name)
        return float(value)

    def integer(self, name: str, low: int, high: int | None = None) -> int | None:
        value = self.get(name, (int,), "an integer")
        if value is not None and (value < low or (high is not None and value > high)):
            bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise invalid(f"Invalid value for '{name}': {_show(value)} (it must be {bounds}).", name)
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
            raise invalid(f"Unrecognized argument in 'stream_options': {_show(unknown[0])}",
                          f"stream_options.{unknown[0][:100]}")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise invalid("Invalid type for 'stream_options.include_usage': expected a boolean.",
                          "stream_options.include_usage")
        return stream, include_usage


def parse_messages(value: object) -> list[dict[str, str]]:
    """OpenAI chat messages -> [{"role", "content"}] for the chat template (text content only)."""
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty array of {\"role\", \"content\"} objects.", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{where}' must be an object with 'role' and 'content', got {_json_type(message)}.",
                          where)
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise invalid(f"Unrecognized argument in '{where}': {_show(unknown[0])}", f"{where}.{unknown[0][:100]}")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"Invalid value for '{where}.role': {_show(role)} (supported: system, developer, user, "
                          "assistant).", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       and set(p) == {"type", "text"} for p in content):
                raise invalid(f"Invalid value for '{where}.content': only text parts "
                              "({\"type\": \"text\", \"text\": ...}) are supported.", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"Invalid type for '{where}.content': expected a string or an array of text parts, "
                          f"but got {_json_type(content)}.", f"{where}.content")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise invalid(f"Invalid type for '{where}.name': expected a string.", f"{where}.name")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def parse_prompt(value: object, tokenizer: "Tokenizer", vocab_size: int) -> list[int]:
    """A completion prompt -> token ids: a string (special tokens allowed), one string in an array, or ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise invalid("'prompt' must not be empty.", "prompt")
        return tokenizer.encode(value)
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        bad = [t for t in value if not 0 <= t < vocab_size]
        if bad:
            raise invalid(f"Invalid value for 'prompt': token id {bad[0]} is outside the vocabulary "
                          f"(0..{vocab_size - 1}).", "prompt")
        return list(value)
    raise invalid("Invalid value for 'prompt': expected a non-empty string, an array with one string, or a "
                  "non-empty array of token ids (this server does not batch several prompts).", "prompt")


def generation_config(fields: Fields, prompt_tokens: int, context: int, *, default_max_tokens: int,
                      prompt_param: str, stop_ids: tuple[int, ...] = ()) -> GenerationConfig:
    """The request's sampling options, after checking them and the prompt's length against the context."""
    max_tokens = fields.integer("max_tokens", 1)
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
        raise invalid(f"Invalid value for 'n': {_show(n)}; this server generates one choice per request (n=1).", "n")
    fields.get("user", (str,), "a string")
    try:
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=fields.number("temperature", 1.0, 0.0, 2.0),
            top_p=fields.number("top_p", 1.0, 0.0, 1.0, low_open=True),
            seed=fields.integer("seed", 0, 2**63 - 1),
            stop=(*fields.stop(), *stop_ids),
        )
    except ValueError as e:  # the checks above should catch everything first; never a 500 if they don't
        raise invalid(str(e)) from None


# ---- answering -------------------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client disconnected while waiting for a non-streamed reply."""


class Generation:
    """One request in the engine, seen from the event loop: the engine thread's callbacks become queue items."""

    def __init__(self, engine: Engine, prompt_ids: list[int], config: GenerationConfig) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

        def on_event(kind: str, value: object) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

        self.engine = engine
        try:
            self.job: Job = engine.submit(prompt_ids, config, on_event)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise invalid(str(e)) from None

    async def events(self, request: "Request | None" = None) -> AsyncIterator[tuple[str, object]]:
        """(kind, value) pairs up to "done" or "error". With request, raise ClientGone if its client leaves."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while True:
            if request is None:
                item = await self.queue.get()
            else:
                # Look at the connection every half second, whether or not text is arriving meanwhile.
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    item = None
                if loop.time() - checked >= 0.5:
                    checked = loop.time()
                    if await request.is_disconnected():
                        raise ClientGone
                if item is None:
                    continue
            yield item
            if item[0] != "text":
                return

    def cancel(self) -> None:
        self.engine.cancel(self.job)

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.job.prompt_ids), len(self.job.new_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(base: dict[str, Any], chat: bool, text: str | None, finish_reason: str | None,
           role: bool = False) -> dict[str, Any]:
    if chat:
        delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**base, "object": "chat.completion.chunk", "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {**base, "object": "text_completion", "choices": [choice]}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def respond(request: "Request", generation: Generation, *, chat: bool, stream: bool, include_usage: bool,
                  model_name: str) -> "Response":
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model_name}
    if not stream:
        pieces: list[str] = []
        try:
            async for kind, value in generation.events(request):
                if kind == "text":
                    pieces.append(str(value))
                elif kind == "error":
                    raise APIError(500, str(value), type="server_error")
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; the job is cancelled below
        finally:
            generation.cancel()
        text, reason = "".join(pieces), generation.job.finish_reason
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": generation.usage()})

    async def events() -> AsyncIterator[str]:
        # Starlette cancels this generator when the client disconnects; `finally` then frees the slot.
        try:
            if chat:
                yield _sse(_chunk(base, chat, None, None, role=True))
            async for kind, value in generation.events():
                if kind == "text":
                    yield _sse(_chunk(base, chat, str(value), None))
                elif kind == "done":
                    yield _sse(_chunk(base, chat, None, str(value)))
                else:
                    yield _sse(APIError(500, str(value), type="server_error").body())
            if include_usage:
                yield _sse({**base, "object": "chat.completion.chunk" if chat else "text_completion",
                            "choices": [], "usage": generation.usage()})
            yield _sse("[DONE]")
        finally:
            generation.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the app ---------------------------------------------------------------------------------------------


def default_model_name(model: "SmolLM2") -> str:
    """"SmolLM2-135M-Instruct" for the bundled weights; else the source's file or directory name."""
    source = getattr(model, "source", None)
    if not source:
        return "smollm2"
    name = Path(str(source)).name
    return name.split(".")[0] if name.endswith(".gguf") else name


def create_app(
    model: "SmolLM2",
    tokenizer: "Tokenizer",
    *,
    api_key: str | None = None,
    max_concurrency: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    model_name: str | None = None,
    context_length: int | None = None,
    engine: Engine | None = None,
    step: StepFn = decode_step,
) -> "FastAPI":
    """The FastAPI app. The engine (built here unless given) starts and stops with the app's lifespan.
    step: the engine's decode step (`generate.decode_step`, or a compiled `fast.FastDecoder`).

    max_concurrency requests are generated together and max_queue more may wait; beyond that, 429.
    """
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    from . import chat_page

    if api_key is not None and not api_key:
        raise ValueError("api_key must be a non-empty string (or None for no key)")
    engine = engine or Engine(model, tokenizer, max_batch=max_concurrency, max_queue=max_queue,
                              context_length=context_length, step=step)
    name = model_name or default_model_name(model)
    created = int(time.time())
    vocab_size = model.config.vocab_size
    try:
        end_of_turn: tuple[int, ...] = (tokenizer.token_id("<|im_end|>"),)
    except ValueError:
        end_of_turn = ()  # a base model's tokenizer: the reply ends at its end-of-sequence token

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()  # uvicorn has drained the in-flight requests by now

    app = FastAPI(title="smollm2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(APIError(e.status_code, message, code=code, headers=getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(invalid(f"Invalid request: {first.get('msg', e)}", param))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "The server had an error while processing your request.",
                                       type="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):  # constant time
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict[str, Any]:
        too_large = APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.",
                             code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise too_large
        raw = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a chunked body has no length header
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise too_large
        return parse_body(bytes(raw))

    def check_model(fields: Fields) -> None:
        requested = fields.get("model", (str,), "a string")
        if requested is None:
            raise invalid("You must provide a model parameter.", "model")
        if requested != name:
            raise APIError(404, f"The model {_show(requested)} does not exist; this server runs '{name}'.",
                           param="model", code="model_not_found")

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "smollm2"}

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @api.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise APIError(404, f"The model {_show(model_id)} does not exist.", param="model",
                           code="model_not_found")
        return model_card()

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        fields = Fields(await read_json(request), CHAT_FIELDS)
        check_model(fields)
        if "messages" not in fields.body:
            raise invalid("Missing required parameter: 'messages'.", "messages")
        messages = parse_messages(fields.body["messages"])
        try:  # in a worker thread: tokenizing a 1 MiB body takes long enough to stall the other streams
            prompt_ids = await asyncio.to_thread(tokenizer.apply_chat_template, messages,
                                                 add_generation_prompt=True, tokenize=True)
        except ValueError as e:
            raise invalid(str(e), "messages") from None
        config = generation_config(fields, len(prompt_ids), engine.context_length, prompt_param="messages",
                                   default_max_tokens=GenerationConfig().max_new_tokens, stop_ids=end_of_turn)
        stream, include_usage = fields.stream()
        return await respond(request, Generation(engine, prompt_ids, config), chat=True, stream=stream,
                             include_usage=include_usage, model_name=name)

    @api.post("/completions")
    async def completions(request: Request) -> Response:
        fields = Fields(await read_json(request), COMPLETION_FIELDS)
        check_model(fields)
        if "prompt" not in fields.body:
            raise invalid("Missing required parameter: 'prompt'.", "prompt")
        prompt_ids = await asyncio.to_thread(parse_prompt, fields.body["prompt"], tokenizer, vocab_size)
        config = generation_config(fields, len(prompt_ids), engine.context_length, prompt_param="prompt",
                                   default_max_tokens=COMPLETION_MAX_TOKENS)
        stream, include_usage = fields.stream()
        return await respond(request, Generation(engine, prompt_ids, config), chat=False, stream=stream,
                             include_usage=include_usage, model_name=name)

    app.include_router(api)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, **engine.stats()}

    # The page loads only its own script and style: the policy forbids inline script, so even a reply that
    # slipped past escaping could not run code.
    page_headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                               "base-uri 'none'; frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> Response:
        return HTMLResponse(chat_page.HTML, headers=page_headers)

    @app.get("/chat.js")
    async def page_script() -> Response:
        return Response(chat_page.SCRIPT, media_type="text/javascript", headers=page_headers)

    @app.get("/chat.css")
    async def page_style() -> Response:
        return Response(chat_page.STYLE, media_type="text/css", headers=page_headers)

    app.state.engine = engine
    app.state.api_key_required = api_key is not None
    return app


def run_server(app: "FastAPI", host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serve app with uvicorn until SIGINT/SIGTERM; both drain the requests in flight before returning."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port}")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving on %s: reachable from other machines%s", host,
                    "" if getattr(app.state, "api_key_required", False) else ", with no API key (--api-key)")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # After a graceful shutdown uvicorn re-raises the signal it caught, to let the previous handler act. For
    # SIGTERM the default action kills the process (exit status 143) although every request was drained;
    # with this no-op handler in place the drained server returns and the process exits 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
