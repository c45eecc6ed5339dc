"""`smollm2 generate "Gravity is"`: stream a continuation of the prompt, then one line of counts and speed.

The sampling flags map one to one onto `GenerationConfig` fields, with its defaults (smollm2/defaults.py); they,
--source, --quantize and --compile are commands/options.py's, shared with `chat` and `serve`. --speculative
(with --draft-tokens and --draft-ngram) is this command's: prompt-lookup speculative decoding
(inference/speculative.py), the same tokens at temperature 0, faster when the reply copies from the prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import TYPE_CHECKING

from ..defaults import DRAFT_NGRAM, DRAFT_TOKENS, SPECULATIVE_MODES
from .options import (
    add_generation_options,
    add_source_argument,
    add_speed_options,
    generation_config,
    load_for_inference,
)

if TYPE_CHECKING:
    from ..inference.generate import Stream


def print_stream(stream: Stream[str]) -> float:
    """Write the pieces to stdout as they come; the seconds it took."""
    begin = time.perf_counter()
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    return time.perf_counter() - begin


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text to continue")
    add_source_argument(parser)
    add_speed_options(parser)
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message in the model's chat template")
    parser.add_argument("--system", default=None, help="system prompt, with --chat (default: the template's)")
    add_generation_options(parser)
    group = parser.add_argument_group("speculative decoding (lossless: the same tokens at temperature 0)")
    group.add_argument("--speculative", nargs="?", const=SPECULATIVE_MODES[0], choices=SPECULATIVE_MODES,
                       default=None,
                       help="draft tokens by copying from the prompt and the output so far, and verify them in "
                            "one forward: faster when the reply repeats its prompt (summaries, extraction, "
                            "edits); backs off when drafts are rejected (default: off; the flag alone: "
                            f"{SPECULATIVE_MODES[0]})")
    group.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, metavar="K",
                       help="with --speculative: draft at most K tokens per verify forward (default: %(default)s)")
    group.add_argument("--draft-ngram", type=int, default=DRAFT_NGRAM, metavar="N",
                       help="with --speculative: look up the last N tokens, then N-1 ... 1 (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..inference.generate import chat, stream_text

    config = dataclasses.replace(generation_config(args), speculative=args.speculative,
                                 draft_tokens=args.draft_tokens, draft_ngram=args.draft_ngram)
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    model, tokenizer = load_for_inference(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        stream = chat(model, tokenizer, [*messages, {"role": "user", "content": args.prompt}], config=config)
    else:
        stream = stream_text(model, tokenizer, args.prompt, config=config)
    seconds = print_stream(stream)
    print()
    new = len(stream.new_ids)
    step = model.compiled_step  # (load_for_inference made one for --compile)
    compiling = (step.compile_seconds if step is not None else None) or 0.0  # its first call compiled
    speed = new / max(seconds - compiling, 1e-9)
    compiled = f", compiled in {compiling:.1f} s" if compiling else ""
    drafts = stream.speculation
    drafted = (f", drafts accepted {drafts.accepted}/{drafts.drafted} ({drafts.acceptance:.0%})"
               if drafts is not None else "")
    print(f"[{len(stream.prompt_ids)} prompt tokens, {new} new tokens, {speed:.1f} tokens/s{compiled}{drafted}, "
          f"finish: {stream.finish_reason}]", file=sys.stderr)
    return 0
