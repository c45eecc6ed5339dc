"""`smollm2 chat`: a multi-turn conversation in the terminal, the replies streamed as they are generated.

Commands: /reset starts over, /system TEXT sets the system prompt (and starts over), /exit leaves (so do
Ctrl-D and the end of piped input). Ctrl-C stops a reply without leaving. With stdin a pipe, each line is one
user message and stdout holds only the replies, one after the other, each ending with a newline.
"""

from __future__ import annotations

import argparse
import sys

from .options import (
    add_generation_options,
    add_source_argument,
    add_speed_options,
    generation_config,
    load_for_inference,
)

HELP = "/reset: start over · /system TEXT: set the system prompt · /exit: leave · Ctrl-C: stop a reply"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_argument(parser)
    add_speed_options(parser)
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    add_generation_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..inference.generate import chat

    config = generation_config(args)
    model, tokenizer = load_for_inference(args)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(HELP, file=sys.stderr)
    system: str | None = args.system
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: drop the line, as Python's own REPL does
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(new conversation)", file=sys.stderr)
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            history.clear()
            print(f"(new conversation, system prompt: {system or 'the default'})", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=sys.stderr)
            continue

        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system is not None else []) + history
        try:
            stream = chat(model, tokenizer, messages, config=config)
        except ValueError as e:  # e.g. the conversation no longer fits the context: keep the REPL alive
            history.pop()
            print(f"error: {e} (/reset starts over)", file=sys.stderr)
            continue
        reply: list[str] = []
        try:
            for piece in stream:
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            print(" [stopped]", end="", file=sys.stderr)
        print(flush=True)
        # The partial reply stays in the history: it is what the user saw.
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0
