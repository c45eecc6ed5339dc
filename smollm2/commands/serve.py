"""`smollm2 serve`: an OpenAI-compatible HTTP server with a chat page (smollm2/serve.py).

    smollm2 serve                                  # the bundled SmolLM2-135M-Instruct on http://127.0.0.1:8000
    smollm2 serve --api-key KEY --max-concurrency 8
    smollm2 serve --allowed-hosts mybox.local      # also answer requests addressed to that name

Then point any OpenAI client at it (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY or "none")`) or
open http://127.0.0.1:8000/ in a browser. SIGTERM or Ctrl-C finish the requests in flight, then exit.
"""

from __future__ import annotations

import argparse
import os

from ..defaults import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFIX_CACHE_MB
from .options import add_source_argument, add_speed_options, load_for_inference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_argument(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("SMOLLM2_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $SMOLLM2_API_KEY, else none)")
    parser.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                        help="requests generated together, as one batch (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                        help="requests that may wait for a free slot; more get 429 (default: %(default)s)")
    parser.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                        help="memory for the keys/values of prompt beginnings already prefilled, reused by later "
                             "requests that begin the same way (a chat's next turn, a shared system prompt); "
                             "usage.prompt_tokens_details.cached_tokens counts them; 0 = off (default: %(default)s)")
    parser.add_argument("--context-length", type=int, default=None, metavar="TOKENS",
                        help="longest prompt + completion accepted (default: the model's)")
    parser.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME[,NAME...]",
                        help="Host header names to answer besides the bound address and localhost (others get "
                             "403, against DNS rebinding); '*' = any. Bound beyond loopback (0.0.0.0), the "
                             "server answers any name unless this is given")
    parser.add_argument("--model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: from the source)")
    add_speed_options(parser, compile=True)  # a server runs long: the one-off compile pays back


def run(args: argparse.Namespace) -> int:
    from ..serve import create_app, run_server
    from ..serve.app import check_api_key_value

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty")
    try:  # before the model loads: a key no client can send is a start-up error
        check_api_key_value(args.api_key)
    except ValueError as e:
        raise ValueError(f"--api-key: {e}") from None
    allowed_hosts = [name.strip() for value in args.allowed_hosts for name in value.split(",") if name.strip()]
    for flag, value, minimum in (("--max-concurrency", args.max_concurrency, 1), ("--max-queue", args.max_queue, 0),
                                 ("--prefix-cache-mb", args.prefix_cache_mb, 0)):
        if value < minimum:
            raise ValueError(f"{flag} must be at least {minimum}, got {value}")
    model, tokenizer = load_for_inference(args)
    app = create_app(model, tokenizer, api_key=args.api_key, max_concurrency=args.max_concurrency,
                     max_queue=args.max_queue, model_name=args.model_name, context_length=args.context_length,
                     prefix_cache_mb=args.prefix_cache_mb)
    if args.compile:  # the step's graphs now, not in the first requests' time to first token
        print("smollm2 serve: compiling the decode step (cached on disk for the next "
              "start) ...", flush=True)
        print(f"smollm2 serve: decode step ready in {app.state.engine.warm_up():.1f} s", flush=True)
    print(f"smollm2 serve: http://{args.host}:{args.port}/ (chat page), http://{args.host}:{args.port}/v1 (API)",
          flush=True)
    run_server(app, args.host, args.port, allowed_hosts=allowed_hosts)
    return 0
