"""`smollm2 generate "Gravity is"`: stream a continuation of the prompt, then one line of counts and speed.

The sampling flags map one to one onto `GenerationConfig` fields and take their defaults from it; `chat` uses
the same flags through `add_generation_options` and `generation_config`.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..generate import GenerationConfig, Stream, chat, stream_text


def add_source_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=None,
                        help="weights: a .gguf file, an original-layout directory or a hub id "
                             "(default: the bundled SmolLM2-135M-Instruct GGUF)")


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    """--quantize and --compile, shared by generate, chat and serve."""
    from ..quantize import DEFAULT_MODE, MODES

    group = parser.add_argument_group("speed (BENCHMARKS.md measures each choice)")
    group.add_argument("--quantize", choices=MODES, default=DEFAULT_MODE,
                       help="weights: none (float32, exactly the original's numbers), bf16, int8 or int4 "
                            "(weight-only, llama.cpp's Q8_0 / Q4_1 blocks of 32). Default: %(default)s, the "
                            "fastest decode that keeps quality (+0.1-0.3%% perplexity on held-out text)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step: faster tokens after a one-off compile "
                            "(seconds to a minute, cached by torch for later runs)")


def load_for_inference(args: argparse.Namespace):  # -> (SmolLM2, Tokenizer, step)
    """The model of --source, quantised as --quantize says, with the decode step --compile asks for."""
    from ..generate import decode_step
    from ..loading import load

    model, tokenizer = load(args.source, quantize=args.quantize)
    model.eval()
    if not args.compile:
        return model, tokenizer, decode_step
    from ..fast import FastDecoder

    return model, tokenizer, FastDecoder(model)


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    defaults = GenerationConfig()
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, metavar="N",
                       help="generate at most N tokens (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=defaults.temperature, metavar="T",
                       help="sampling temperature; 0 = greedy (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K",
                       help="sample among the K most likely tokens; 0 = off (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=defaults.top_p, metavar="P",
                       help="sample among the most likely tokens up to total probability P; 1 = off "
                            "(default: %(default)s)")
    group.add_argument("--min-p", type=float, default=defaults.min_p, metavar="P",
                       help="drop tokens less than P times as likely as the best; 0 = off (default: %(default)s)")
    group.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty, metavar="R",
                       help="> 1 discourages repeating tokens; 1 = off (default: %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed,
                       help="random seed: the same seed gives the same text (default: a fresh one)")
    group.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="stop when TEXT is generated (not shown); repeat for several")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of the parsed flags; invalid values raise ValueError before anything is loaded."""
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=tuple(args.stop or ()),
    )


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


def run(args: argparse.Namespace) -> int:
    config = generation_config(args)
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    model, tokenizer, step = load_for_inference(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        stream = chat(model, tokenizer, [*messages, {"role": "user", "content": args.prompt}], config=config,
                      step=step)
    else:
        stream = stream_text(model, tokenizer, args.prompt, config=config, step=step)
    seconds = print_stream(stream)
    print()
    new = len(stream.new_ids)
    compiling = getattr(step, "compile_seconds", None) or 0.0  # the first step's one-off compile, if any
    speed = new / max(seconds - compiling, 1e-9)
    compiled = f", compiled in {compiling:.1f} s" if compiling else ""
    print(f"[{len(stream.prompt_ids)} prompt tokens, {new} new tokens, {speed:.1f} tokens/s{compiled}, "
          f"finish: {stream.finish_reason}]", file=sys.stderr)
    return 0
