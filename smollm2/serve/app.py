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
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..inference.config import GenerationConfig
from ..inference.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, Engine, Job, QueueFull
from ..inference.generate import StepFn
from . import page, protocol
from .protocol import APIError, invalid

if TYPE_CHECKING:
    from ..model import SmolLM2
    from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)


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

    def usage(self) -> dict[str, int]:
        return protocol.usage_counts(len(self.job.prompt_ids), len(self.job.new_ids))


async def reply_whole(request: Request, generation: Generation, *, chat: bool, model_name: str) -> Response:
    """The whole reply as one JSON object, once generation is done."""
    base = protocol.response_base(chat, model_name)
    pieces: list[str] = []
    try:
        async for kind, value in generation.events(request):
            if kind == "text":
                pieces.append(str(value))
            elif kind == "error":
                raise protocol.server_error(str(value))
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the job is cancelled below
    finally:
        generation.cancel()
    return JSONResponse(protocol.completion_response(base, chat, "".join(pieces), generation.job.finish_reason,
                                                     generation.usage()))


def reply_stream(generation: Generation, *, chat: bool, include_usage: bool, model_name: str) -> Response:
    """The reply as server-sent events: chunks as text arrives, a finish_reason, usage if asked, [DONE]."""
    base = protocol.response_base(chat, model_name)

    async def events() -> AsyncIterator[str]:
        # Starlette cancels this generator when the client disconnects; `finally` then frees the slot.
        try:
            if chat:
                yield protocol.sse(protocol.chunk(base, chat, None, None, role=True))
            async for kind, value in generation.events():
                if kind == "text":
                    yield protocol.sse(protocol.chunk(base, chat, str(value), None))
                elif kind == "done":
                    yield protocol.sse(protocol.chunk(base, chat, None, str(value)))
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
    """The request's JSON object, refusing bodies over MAX_BODY_BYTES with 413 before reading them whole."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > protocol.MAX_BODY_BYTES:
        raise protocol.too_large()
    raw = bytearray()
    async for piece in request.stream():  # counted as it arrives: a chunked body has no length header
        raw += piece
        if len(raw) > protocol.MAX_BODY_BYTES:
            raise protocol.too_large()
    return protocol.parse_body(bytes(raw))


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
        try:  # in a worker thread: tokenizing a 1 MiB body takes long enough to stall the other streams
            prompt_ids = await asyncio.to_thread(self.tokenizer.apply_chat_template, messages,
                                                 add_generation_prompt=True, tokenize=True)
        except ValueError as e:
            raise invalid(str(e), "messages") from None
        config = protocol.generation_config(fields, len(prompt_ids), self.engine.context_length,
                                            prompt_param="messages", stop_ids=self.end_of_turn,
                                            default_max_tokens=GenerationConfig().max_new_tokens)
        return await self.reply(request, fields, prompt_ids, config, chat=True)

    async def completions(self, request: Request) -> Response:
        fields, prompt = protocol.read_completion_request(await read_json(request), self.name)
        prompt_ids = await asyncio.to_thread(protocol.parse_prompt, prompt, self.tokenizer, self.vocab_size)
        config = protocol.generation_config(fields, len(prompt_ids), self.engine.context_length,
                                            prompt_param="prompt", default_max_tokens=protocol.COMPLETION_MAX_TOKENS)
        return await self.reply(request, fields, prompt_ids, config, chat=False)

    async def reply(self, request: Request, fields: protocol.Fields, prompt_ids: list[int],
                    config: GenerationConfig, *, chat: bool) -> Response:
        stream, include_usage = fields.stream()
        generation = Generation(self.engine, prompt_ids, config)
        if stream:
            return reply_stream(generation, chat=chat, include_usage=include_usage, model_name=self.name)
        return await reply_whole(request, generation, chat=chat, model_name=self.name)

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
) -> FastAPI:
    """The FastAPI app. The engine (built here unless given) starts and stops with the app's lifespan.
    step: the engine's decode step; None = the model's compiled one where `load(compile=True)` made it, else
    `generate.decode_step`.

    max_concurrency requests are generated together and max_queue more may wait; beyond that, 429.
    """
    if api_key is not None and not api_key:
        raise ValueError("api_key must be a non-empty string (or None for no key)")
    engine = engine or Engine(model, tokenizer, max_batch=max_concurrency, max_queue=max_queue,
                              context_length=context_length, step=step)
    routes = Routes(engine, tokenizer, name=model_name or protocol.default_model_name(model),
                    vocab_size=model.config.vocab_size, api_key=api_key)

    app = FastAPI(title="smollm2", lifespan=engine_lifespan(engine), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_server_error)

    api = APIRouter(prefix="/v1", dependencies=[Depends(routes.authorize)])
    api.add_api_route("/models", routes.list_models, methods=["GET"])
    api.add_api_route("/models/{model_id:path}", routes.get_model, methods=["GET"])
    api.add_api_route("/chat/completions", routes.chat_completions, methods=["POST"])
    api.add_api_route("/completions", routes.completions, methods=["POST"])
    app.include_router(api)
    app.add_api_route("/health", routes.health, methods=["GET"])  # open: never needs the API key
    add_page(app)

    app.state.engine = engine
    app.state.api_key_required = api_key is not None
    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
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
