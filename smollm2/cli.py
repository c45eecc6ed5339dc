"""The `smollm2` command line: one subcommand per module in smollm2/commands/, each with
`add_arguments(parser)` and `run(args) -> int`. This file only wires them together.

Building the parsers imports no torch: a command module imports the library inside run(), and the defaults its
options show come from smollm2/defaults.py, so `smollm2 --help` is instant (tests/test_cli.py)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module in smollm2.commands, one-line help)
COMMANDS = {
    "compare": ("compare", "compare our model with the original (transformers) on the same weights"),
    "generate": ("generate", "continue a prompt, streaming the text"),
    "chat": ("chat", "chat with the model in the terminal"),
    "prepare": ("prepare", "tokenize a text corpus for training"),
    "train": ("train", "train a model from scratch, or resume a run"),
    "finetune": ("finetune", "supervised training on chats from any model (full or LoRA), or resume such a run"),
    "dpo": ("dpo", "align a model with Direct Preference Optimization on chosen/rejected pairs (full or LoRA)"),
    "eval": ("eval", "perplexity of a model on a text corpus"),
    "evaluate": ("evaluate", "the model card's benchmarks (zero-shot PIQA, ARC, HellaSwag, ...; IFEval, GSM8K, "
                             "MMLU, BBH) next to its numbers"),
    "export": ("export", "write a model in the original's layout (transformers loads it) or as a GGUF file "
                         "(llama.cpp runs it)"),
    "bench": ("bench", "measure prefill and decode speed against transformers and llama.cpp"),
    "serve": ("serve", "an OpenAI-compatible HTTP server with a chat page"),
    "lens": ("lens", "the logit lens: what each layer would predict, as a table and a heat map"),
    "patch": ("patch", "activation patching: which layers, positions and heads carry an answer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smollm2", description="SmolLM2 rebuilt from torch primitives.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(f"smollm2.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != f"smollm2.commands.{module_name}":
                raise
            continue  # not written yet
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        # User errors (bad files, bad options, no network) are one line, never a traceback.
        print(f"smollm2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
