"""The FastAPI app: the OpenAI routes, the chat page and /health over one batching engine, and uvicorn to run it.

This is the one module of smollm2.serve that imports FastAPI, at the top: FastAPI reads the route functions'
annotations to inject `Request`, so the class must be a real object here (hence, too, no `from __future__ import
annotations`). smollm2/serve/__init__.py imports this module only when create_app or run_server is asked for,
so the rest of the package works without the serve extra.

What a request means and what the answer looks like is smollm2/serve/protocol.py; this module moves bytes
between it, the engine thread and the client.
"""

import asyncio
import contextlib
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..inference.config import GenerationConfig
from ..inference.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFIX_CACHE_MB, Engine, Job, QueueFull
from ..inference.generate import StepFn, prompt_logprobs
from ..inference.stopping import TokenLogprob
from . import page, protocol, tools
from .protocol import APIError, invalid

if TYPE_CHECKING:
    from ..model import SmolLM2
    from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Slow clients (make_server, read_json): a slowloris must not hold connections or engine slots for long.
HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's headers (each request's, keep-alive too)
BODY_TIMEOUT = 30.0  # seconds a request body may take to arrive: 1 MiB at 35 KB/s
MAX_CONNECTIONS = 512  # open connections; more are closed at once (file descriptors stay for real clients)


# ---- one request in the engine -------------------------------------------------------------------------


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
            raise protocol.busy(e) from None
        except ValueError as e:
            raise invalid(str(e)) from None

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[str, object]]:
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

    def usage(self) -> dict[str, Any]:
        return protocol.usage_counts(len(self.job.prompt_ids), len(self.job.new_ids), self.job.cached_tokens)


@dataclass
class Echo:
    """A completion prompt sent back before its completion (`echo`): its text and, with logprobs, each token's
    (id, TokenLogprob), None for the first token, which has no log-probability."""

    text: str
    entries: list[tuple[int, TokenLogprob | None]] | None


async def collect(request: Request, generation: Generation) -> str:
    """A generation's whole text; ClientGone if the client leaves meanwhile."""
    pieces: list[str] = []
    async for kind, value in generation.events(request):
        if kind == "text":
            pieces.append(str(value))
        elif kind == "error":
            raise protocol.server_error(str(value))
    return "".join(pieces)


def generated_entries(job: Job) -> list[tuple[int, TokenLogprob | None]]:
    return [(record.token, record) for record in job.logprobs]


async def reply_whole(request: Request, generation: Generation, *, chat: bool, model_name: str,
                      tokenizer: "Tokenizer", offered: tools.Tools | None = None) -> Response:
    """The whole reply as one JSON object, once generation is done; with tools offered, a reply that calls
    them is message.tool_calls."""
    base = protocol.response_base(chat, model_name)
    try:
        text = await collect(request, generation)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the job is cancelled below
    finally:
        generation.cancel()
    job = generation.job
    logprobs = None
    if job.config.logprobs is not None:
        logprobs = (protocol.logprobs_content(tokenizer, job.logprobs) if chat
                    else protocol.text_completion_logprobs(tokenizer, generated_entries(job)))
    calls = tools.parse_reply(text, offered) if offered is not None else None
    return JSONResponse(protocol.completion_response(
        base, chat, text, "tool_calls" if calls else job.finish_reason, generation.usage(), logprobs,
        tool_calls=[call.openai() for call in calls] if calls else None))


async def reply_completions(request: Request, generations: list[Generation | None], echoes: list[Echo | None],
                            prompts: list[list[int]], *, logprobs: int | None, model_name: str,
                            tokenizer: "Tokenizer") -> Response:
    """Completions of several prompts, or with their prompts echoed, as one JSON object: a choice per prompt.
    A None generation (max_tokens 0) generates nothing: the choice is the echoed prompt alone."""
    base = protocol.response_base(False, model_name)
    texts = []
    try:  # one after the other: the engine runs them all together meanwhile
        for generation in generations:
            texts.append(await collect(request, generation) if generation is not None else "")
    except ClientGone:
        return Response(status_code=499)
    finally:
        for generation in generations:
            if generation is not None:
                generation.cancel()
    choices, usage = [], protocol.usage_counts(0, 0)
    for index, (generation, echo, ids, text) in enumerate(zip(generations, echoes, prompts, texts, strict=True)):
        job = generation.job if generation is not None else None
        entries = None
        if logprobs is not None:
            entries = [*(echo.entries or [] if echo is not None else []), *(generated_entries(job) if job else [])]
        choices.append(protocol.text_choice(
            index, (echo.text if echo is not None else "") + text, job.finish_reason if job else "length",
            protocol.text_completion_logprobs(tokenizer, entries) if entries is not None else None))
        counts = generation.usage() if generation is not None else protocol.usage_counts(len(ids), 0)
        usage = protocol.add_usage(usage, counts)
    return JSONResponse(protocol.text_completion_response(base, choices, usage))


def reply_stream(generation: Generation, *, chat: bool, include_usage: bool, model_name: str,
                 tokenizer: "Tokenizer", echo: Echo | None = None, offered: tools.Tools | None = None) -> Response:
    """The reply as server-sent events: chunks as text arrives, a finish_reason, usage if asked, [DONE]. An
    echoed completion prompt comes first, in a chunk of its own. With tools offered, text that may still become
    a tool call is held back: at the end it is one tool_calls delta (finish_reason "tool_calls"), or content.

    With logprobs, each chunk carries those of the tokens recorded since the previous chunk (the engine may be a
    token or two ahead of the text it has sent: the last chunk carries the rest), so the stream's logprobs are
    the whole reply's, in order."""
    base = protocol.response_base(chat, model_name)
    sent = offset = 0

    def text_logprobs(entries: list[tuple[int, TokenLogprob | None]]) -> dict[str, Any]:
        nonlocal offset  # character offsets run on across chunks
        result = protocol.text_completion_logprobs(tokenizer, entries, offset)
        offset += sum(len(token) for token in result["tokens"])
        return result

    def new_logprobs() -> Any:
        nonlocal sent
        job = generation.job
        if job.config.logprobs is None:
            return None
        records = job.logprobs[sent:]
        sent += len(records)
        if chat:
            return protocol.logprobs_content(tokenizer, records)
        return text_logprobs([(record.token, record) for record in records])

    async def events() -> AsyncIterator[str]:
        # Starlette cancels this generator when the client disconnects; `finally` then frees the slot.
        try:
            if chat:
                yield protocol.sse(protocol.chunk(base, chat, None, None, role=True))
            if echo is not None:
                echoed = text_logprobs(echo.entries) if echo.entries is not None else None
                yield protocol.sse(protocol.chunk(base, chat, echo.text, None, logprobs=echoed))
            held: str | None = "" if offered is not None else None  # None: streaming freely
            async for kind, value in generation.events():
                if kind == "text" and held is not None and tools.may_become_a_call(held + str(value)):
                    held += str(value)
                elif kind == "text":
                    text, held = (held or "") + str(value), None
                    yield protocol.sse(protocol.chunk(base, chat, text, None, logprobs=new_logprobs()))
                elif kind == "done":
                    calls = tools.parse_reply(held, offered) if held and offered is not None else None
                    if calls:
                        deltas = [call.openai(index) for index, call in enumerate(calls)]
                        yield protocol.sse(protocol.chunk(base, chat, None, None, logprobs=new_logprobs(),
                                                          tool_calls=deltas))
                        value, held = "tool_calls", None
                    yield protocol.sse(protocol.chunk(base, chat, held or None, str(value), logprobs=new_logprobs()))
                else:
                    yield protocol.sse(protocol.server_error(str(value)).body())
            if include_usage:
                yield protocol.sse(protocol.usage_chunk(base, chat, generation.usage()))
            yield protocol.sse("[DONE]")
        finally:
            generation.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, refusing bodies over MAX_BODY_BYTES with 413 before reading them whole, and
    bodies still arriving after BODY_TIMEOUT seconds with 408 (a client dripping bytes holds no slot forever)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > protocol.MAX_BODY_BYTES:
        raise protocol.too_large()
    raw = bytearray()

    async def read() -> None:
        async for piece in request.stream():  # counted as it arrives: a chunked body has no length header
            raw.extend(piece)
            if len(raw) > protocol.MAX_BODY_BYTES:
                raise protocol.too_large()

    try:
        await asyncio.wait_for(read(), timeout=request.app.state.body_timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {request.app.state.body_timeout:g} seconds.",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:  # a client that leaves mid-body: normal, one info line
        log.info("%s left while sending its request body", _client(request.scope))
        raise ClientGone from None
    return protocol.parse_body(bytes(raw))


def _client(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


# ---- errors in OpenAI's shape --------------------------------------------------------------------------


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def on_api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e)


async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    return error_response(protocol.route_error(e.status_code, request.method, request.url.path, e.detail,
                                               getattr(e, "headers", None)))


async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(protocol.validation_error(list(e.errors()), e))


async def on_client_gone(request: Request, e: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it; uvicorn drops it


async def on_server_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(protocol.server_error())


# ---- the routes ----------------------------------------------------------------------------------------


class Routes:
    """What the routes share (the engine, the tokenizer, the model's name, the API key), one method per route."""

    def __init__(self, engine: Engine, tokenizer: "Tokenizer", *, name: str, vocab_size: int,
                 api_key: str | None) -> None:
        self.engine, self.tokenizer, self.name, self.vocab_size = engine, tokenizer, name, vocab_size
        self.api_key = api_key
        self.created = int(time.time())
        self.scoring = threading.Lock()  # echoed prompts' forwards: one at a time
        try:
            self.end_of_turn: tuple[int, ...] = (tokenizer.token_id("<|im_end|>"),)
        except ValueError:
            self.end_of_turn = ()  # a base model's tokenizer: the reply ends at its end-of-sequence token

    def authorize(self, request: Request) -> None:
        protocol.check_api_key(request.headers.get("authorization", ""), self.api_key)

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [protocol.model_card(self.name, self.created)]}

    async def get_model(self, model_id: str) -> dict[str, Any]:
        if model_id != self.name:
            raise APIError(404, f"The model {protocol.show(model_id)} does not exist.", param="model",
                           code="model_not_found")
        return protocol.model_card(self.name, self.created)

    async def chat_completions(self, request: Request) -> Response:
        fields, messages = protocol.read_chat_request(await read_json(request), self.name)
        body = fields.body
        offered = tools.parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
        messages = tools.render_history(messages)
        if offered is not None and offered.offered:
            messages = tools.with_tools(messages, offered)
        else:
            offered = None  # tool_choice "none": a plain chat
        try:  # in a worker thread: tokenizing a 1 MiB body takes long enough to stall the other streams
            prompt_ids = await asyncio.to_thread(self.tokenizer.apply_chat_template, messages,
                                                 add_generation_prompt=True, tokenize=True)
        except ValueError as e:
            raise invalid(str(e), "messages") from None
        constraint, logprobs = protocol.response_format(fields), protocol.chat_logprobs(fields)
        call_constraint = tools.constraint(offered) if offered is not None else None
        if constraint is not None and call_constraint is not None:
            raise invalid("'response_format' cannot be combined with a required tool call ('tool_choice').",
                          "tool_choice")
        constraint = constraint or call_constraint
        if constraint is not None:  # llguidance's view of the vocabulary: seconds, once, off the event loop
            from ..inference.constraints import grammar_tokenizer

            await asyncio.to_thread(grammar_tokenizer, self.tokenizer, self.vocab_size)
        config = protocol.generation_config(fields, len(prompt_ids), self.engine.context_length,
                                            prompt_param="messages", stop_ids=self.end_of_turn,
                                            default_max_tokens=GenerationConfig().max_new_tokens,
                                            constraint=constraint, logprobs=logprobs)
        return await self.reply(request, fields, prompt_ids, config, chat=True, offered=offered)

    async def completions(self, request: Request) -> Response:
        fields, prompt = protocol.read_completion_request(await read_json(request), self.name)
        prompts = await asyncio.to_thread(protocol.parse_prompts, prompt, self.tokenizer, self.vocab_size)
        echo, logprobs = protocol.completion_logprobs(fields)
        configs = [protocol.generation_config(fields, len(ids), self.engine.context_length, prompt_param="prompt",
                                              default_max_tokens=protocol.COMPLETION_MAX_TOKENS, logprobs=logprobs,
                                              min_tokens=0 if echo else 1) for ids in prompts]
        no_tokens = protocol.wants_no_tokens(fields)
        stream, include_usage = fields.stream()
        if stream and (len(prompts) > 1 or no_tokens):
            raise invalid("A streamed completion takes one prompt and max_tokens of at least 1; send several "
                          "prompts, or max_tokens 0 with echo, without 'stream'.", "stream")
        echoes = [await asyncio.to_thread(self.echo, ids, logprobs) if echo else None for ids in prompts]
        if not echo and len(prompts) == 1:
            return await self.reply(request, fields, prompts[0], configs[0], chat=False)
        if stream:
            return reply_stream(Generation(self.engine, prompts[0], configs[0]), chat=False,
                                include_usage=include_usage, model_name=self.name, tokenizer=self.tokenizer,
                                echo=echoes[0])
        generations: list[Generation | None] = []
        try:
            for ids, config in zip(prompts, configs, strict=True):
                generations.append(None if no_tokens else Generation(self.engine, ids, config))
        except APIError:  # e.g. the queue filled up part way: the prompts already submitted are dropped
            for generation in generations:
                if generation is not None:
                    generation.cancel()
            raise
        return await reply_completions(request, generations, echoes, prompts, logprobs=logprobs,
                                       model_name=self.name, tokenizer=self.tokenizer)

    def echo(self, ids: list[int], logprobs: int | None) -> Echo:
        """The prompt to echo; with logprobs, its tokens' log-probabilities from one forward of the model, one
        request at a time (beside the engine's own steps, on the same weights)."""
        text = self.tokenizer.decode(ids)
        if logprobs is None:
            return Echo(text, None)
        with self.scoring:
            records = prompt_logprobs(self.engine.model, ids, logprobs)
        return Echo(text, [(ids[0], None), *((record.token, record) for record in records)])

    async def reply(self, request: Request, fields: protocol.Fields, prompt_ids: list[int],
                    config: GenerationConfig, *, chat: bool, offered: tools.Tools | None = None) -> Response:
        stream, include_usage = fields.stream()
        generation = Generation(self.engine, prompt_ids, config)
        if stream:
            return reply_stream(generation, chat=chat, include_usage=include_usage, model_name=self.name,
                                tokenizer=self.tokenizer, offered=offered)
        return await reply_whole(request, generation, chat=chat, model_name=self.name, tokenizer=self.tokenizer,
                                 offered=offered)

    async def tokenize(self, request: Request) -> dict[str, Any]:
        text = protocol.read_tokenize_request(await read_json(request))
        ids = await asyncio.to_thread(self.tokenizer.encode, text)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.context_length}

    async def detokenize(self, request: Request) -> dict[str, Any]:
        ids = protocol.read_detokenize_request(await read_json(request), self.vocab_size)
        return {"prompt": await asyncio.to_thread(self.tokenizer.decode, ids)}

    async def tokenizer_info(self) -> dict[str, Any]:
        return protocol.tokenizer_info(self.tokenizer, self.engine.context_length)

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.name, **self.engine.stats()}


def page_route(text: str, media_type: str) -> Callable[[], Any]:
    """A route answering one of the page's files, with the page's security headers."""

    async def serve_file() -> Response:
        return Response(text, media_type=media_type, headers=page.PAGE_HEADERS)

    return serve_file


def add_page(app: FastAPI) -> None:
    """The chat page's files at their URLs, read once now: a broken install fails at startup, not on a visit."""
    for file in page.PAGE_FILES:
        app.add_api_route(file.path, page_route(page.read_static(file.name), file.media_type), methods=["GET"],
                          name=f"page:{file.name}")


def engine_lifespan(engine: Engine) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: the engine thread runs from startup to shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()  # uvicorn has drained the in-flight requests by now

    return lifespan


# ---- the app -------------------------------------------------------------------------------------------


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
    step: StepFn | None = None,
    allowed_hosts: Collection[str] | None = None,
    body_timeout: float = BODY_TIMEOUT,
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB,
) -> FastAPI:
    """The FastAPI app. The engine (built here unless given) starts and stops with the app's lifespan.
    step: the engine's decode step; None = the model's compiled one where `load(compile=True)` made it, else
    `generate.decode_step`.

    max_concurrency requests are generated together and max_queue more may wait; beyond that, 429.
    prefix_cache_mb: memory for the keys/values of prompt beginnings already prefilled (0 = off): a
    conversation's next turn, or requests sharing a system prompt, prefill only what is new.
    allowed_hosts: the Host header names answered (others get 403, against DNS rebinding); None = any, until
    run_server sets them from the address it binds (allowed_hosts_for).
    """
    check_api_key_value(api_key)
    engine = engine or Engine(model, tokenizer, max_batch=max_concurrency, max_queue=max_queue,
                              context_length=context_length, step=step, prefix_cache_mb=prefix_cache_mb)
    routes = Routes(engine, tokenizer, name=model_name or protocol.default_model_name(model),
                    vocab_size=model.config.vocab_size, api_key=api_key)

    app = FastAPI(title="smollm2", lifespan=engine_lifespan(engine), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_server_error)

    api = APIRouter(prefix="/v1", dependencies=[Depends(routes.authorize)])
    api.add_api_route("/models", routes.list_models, methods=["GET"])
    api.add_api_route("/models/{model_id:path}", routes.get_model, methods=["GET"])
    api.add_api_route("/chat/completions", routes.chat_completions, methods=["POST"])
    api.add_api_route("/completions", routes.completions, methods=["POST"])
    app.include_router(api)
    # vLLM's tokenizer routes, which lm-eval's `tokenizer_backend=remote` reads: clients count and build
    # prompts with this server's own tokenizer, never a copy that might split text differently
    tokens = APIRouter(dependencies=[Depends(routes.authorize)])
    tokens.add_api_route("/tokenize", routes.tokenize, methods=["POST"])
    tokens.add_api_route("/detokenize", routes.detokenize, methods=["POST"])
    tokens.add_api_route("/tokenizer_info", routes.tokenizer_info, methods=["GET"])
    app.include_router(tokens)
    app.add_api_route("/health", routes.health, methods=["GET"])  # open: never needs the API key
    add_page(app)

    app.add_middleware(RequestGuard, allowed_hosts=lambda: app.state.allowed_hosts)

    app.state.engine = engine
    app.state.api_key_required = api_key is not None
    app.state.allowed_hosts = None if allowed_hosts is None else frozenset(host_name(h) for h in allowed_hosts)
    app.state.allowed_hosts_given = allowed_hosts is not None
    app.state.body_timeout = body_timeout
    return app


def check_api_key_value(api_key: str | None) -> None:
    """A ValueError for a key no client could send: empty, or not printable ASCII (HTTP headers arrive as
    latin-1, so a key with 'é' in it would be compared with bytes the client never sent)."""
    if api_key is None:
        return
    if not api_key:
        raise ValueError("api_key must be a non-empty string (or None for no key)")
    bad = next((c for c in api_key if not "!" <= c <= "~"), None)
    if bad is not None:
        raise ValueError(f"the API key holds {bad!r} (position {api_key.index(bad)}): a key must be printable "
                         "ASCII without spaces, the characters an Authorization header carries as they are")


# ---- cross-site requests and DNS rebinding -------------------------------------------------------------

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_JSON = "application/json"
_BODY_METHODS = ("POST", "PUT", "PATCH")


def host_name(host: str) -> str:
    """The name of a Host header value or --allowed-hosts entry: no port, no brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host_name(host)).is_loopback
    except ValueError:
        return host_name(host) == "localhost"


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to bind_host answers: its address and the localhost names, plus extra
    (as Jupyter and Ollama do). None = any: extra holds "*", or the server listens beyond this machine
    (0.0.0.0, a LAN address) under names it cannot know and extra does not name them."""
    names = {host_name(h) for h in extra if h.strip()}
    if "*" in names:
        return None
    if not _is_loopback(bind_host) and not names:
        return None
    return frozenset({*LOCAL_NAMES, host_name(bind_host), *names} - {"0.0.0.0", "::", ""})


class RequestGuard:
    """ASGI middleware run before routing: a Host the server does not answer to is 403 (a web page that
    rebinds its own name to 127.0.0.1 cannot read the replies), and a request body that is not
    `Content-Type: application/json` is 415 (a page can POST text/plain anywhere without a CORS preflight;
    JSON needs one, which this server never grants: it sends no CORS headers)."""

    def __init__(self, app: Any, allowed_hosts: Callable[[], frozenset[str] | None]) -> None:
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        error = self.check(scope) if scope["type"] == "http" else None
        if error is None:
            await self.app(scope, receive, send)
        else:
            await error_response(error)(scope, receive, send)

    def check(self, scope: dict[str, Any]) -> APIError | None:
        headers = {name: value.decode("latin-1") for name, value in scope["headers"]}
        allowed = self.allowed_hosts()
        host = headers.get(b"host")
        if allowed is not None and host is not None and host_name(host) not in allowed:
            log.info("refused %s: Host %r is not allowed", _client(scope), host)
            return APIError(403, f"Host {protocol.show(host)} is not allowed: this server answers requests "
                                 f"addressed to {', '.join(sorted(allowed))}. To allow this name, start it with "
                                 f"--allowed-hosts {host_name(host) or 'NAME'}.", code="host_not_allowed")
        if scope["method"] in _BODY_METHODS:
            media_type = headers.get(b"content-type", "").partition(";")[0].strip().lower()
            if media_type != _JSON:
                return APIError(415, f"Content-Type must be {_JSON}, got {protocol.show(media_type or 'none')}.",
                                code="unsupported_media_type")
        return None


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
               allowed_hosts: Iterable[str] = (), header_timeout: float = HEADER_TIMEOUT,
               max_connections: int = MAX_CONNECTIONS) -> None:
    """Serve app with uvicorn until SIGINT/SIGTERM; both drain the requests in flight before returning.

    allowed_hosts: Host names answered besides this address and localhost's (see allowed_hosts_for), unless
    create_app was given its own. header_timeout, max_connections: see make_server.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port}")
    if not getattr(app.state, "allowed_hosts_given", True):
        app.state.allowed_hosts = allowed_hosts_for(host, allowed_hosts)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving on %s: reachable from other machines%s", host,
                    "" if getattr(app.state, "api_key_required", False) else ", with no API key (--api-key)")
    server = make_server(app, host, port, log_level=log_level, header_timeout=header_timeout,
                         max_connections=max_connections)
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


# ---- slow clients ----------------------------------------------------------------------------------------


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
                header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS):  # -> uvicorn.Server
    """A uvicorn server whose connections must send each request's headers within header_timeout seconds and
    of which at most max_connections are open: a slowloris client (headers dripped a byte at a time, hundreds
    of connections) cannot exhaust the file descriptors. uvicorn has no header timeout of its own (its
    keep-alive timeout is cancelled by any byte), so its h11 protocol gets one here."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            http=guarded_protocol(header_timeout, max_connections))
    return uvicorn.Server(config)


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a per-request header deadline and a cap on open connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.info("refused a connection from %s: %d open, the limit", _client({"client": self.client}),
                         max_connections)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
                log.info("closed %s: no complete request headers within %g s", _client({"client": self.client}),
                         header_timeout)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are complete: the app takes it from here
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # a kept-alive connection's next request has the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
