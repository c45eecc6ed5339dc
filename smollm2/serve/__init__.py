"""An OpenAI-compatible HTTP server over the batching engine, with a chat page at `/`.

    GET  /v1/models                 the one model this server runs
    POST /v1/completions            text after a prompt (a string or token ids; or several: a choice each)
    POST /v1/chat/completions       the assistant's reply to messages, with the model's chat template
    POST /tokenize, /detokenize     text <-> token ids with the server's own tokenizer (as vLLM has them)
    GET  /tokenizer_info            the special tokens and the chat template (lm-eval's remote tokenizer)
    GET  /health                    liveness and the engine's load; never needs the API key
    GET  /                          the chat page (page.py; its files are in static/)

Both POST endpoints answer with one JSON object, or with server-sent events (`"stream": true`): one
`data: {chunk}` per piece of text, a last chunk with finish_reason, a usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`. Supported parameters: model, max_tokens
(max_completion_tokens), temperature, top_p, stop (up to 4 strings), seed, n (1 only), stream, stream_options,
user; on chat completions response_format, logprobs and top_logprobs (0-20), tools, tool_choice and
parallel_tool_calls (tools.py); on completions logprobs (0-20)
and echo (max_tokens 0 with echo scores the prompt alone: what lm-eval's local-completions model asks for);
presence_penalty, frequency_penalty, logit_bias, suffix and best_of only at their no-op values. Any other
field is a 400, as OpenAI answers. usage.prompt_tokens_details.cached_tokens counts the prompt tokens the
prefix cache gave. Defaults are OpenAI's: temperature 1, top_p 1,
max_tokens 16 for completions; for chat, GenerationConfig's max_new_tokens (OpenAI's "the rest of the
context" would let one request hold a slot for 8k tokens).

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for any invalid body or
parameter (including invalid UTF-8 and lone surrogates, and context_length_exceeded with the numbers), 401
for a missing or wrong API key, 404 for an unknown model or path, 413 for bodies over 1 MiB, 429 when the
engine's queue is full. A client that disconnects has its generation cancelled within a step or two.

The package:
    protocol.py   the API's wire format: parsing and checking requests, the shapes of answers and errors
    tools.py      tool calls: the tools in the prompt, the reply's <tool_call> as message.tool_calls
    app.py        the FastAPI app (create_app) and uvicorn (run_server)
    page.py       the chat page: its static/ files and the headers they are served with

FastAPI is imported only by app.py, and app.py only when create_app or run_server is first used, so
`import smollm2.serve` (and smollm2.serve.protocol) works without the serve extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .protocol import (
    COMPLETION_MAX_TOKENS,
    MAX_BODY_BYTES,
    MAX_STOP_STRINGS,
    APIError,
    Fields,
    default_model_name,
    generation_config,
    parse_body,
    parse_messages,
    parse_prompts,
)

if TYPE_CHECKING:
    from .app import create_app, run_server

__all__ = ["COMPLETION_MAX_TOKENS", "MAX_BODY_BYTES", "MAX_STOP_STRINGS", "APIError", "Fields", "create_app",
           "default_model_name", "generation_config", "parse_body", "parse_messages", "parse_prompts", "run_server"]

_FROM_APP = {"create_app", "run_server"}
_SERVE_EXTRA = {"fastapi", "starlette", "uvicorn", "pydantic"}


def __getattr__(name: str) -> Any:
    """create_app and run_server, importing app.py (and FastAPI) the first time one is asked for."""
    if name not in _FROM_APP:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import app
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _SERVE_EXTRA:
            raise
        raise ModuleNotFoundError(f"the server needs the serve extra (pip install 'smollm2[serve]'): {e}",
                                  name=e.name) from e
    return getattr(app, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | _FROM_APP)
