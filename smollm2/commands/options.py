"""Options shared by several commands: the model (--source, --quantize, --compile) and the sampling flags.

Building a parser imports no torch (the defaults shown in --help come from smollm2/defaults.py); the library
is imported when a command runs, by `generation_config` and `load_for_inference`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..defaults import (
    DEFAULT_QUANTIZE,
    MAX_NEW_TOKENS,
    MIN_P,
    QUANTIZE_MODES,
    REPETITION_PENALTY,
    TEMPERATURE,
    TOP_K,
    TOP_P,
)

if TYPE_CHECKING:
    from ..inference.config import GenerationConfig

SOURCE_HELP = ("the model: a .gguf file, an original-layout directory or a hub id "
               "(default: the bundled SmolLM2-135M-Instruct Q4_1 GGUF)")


def add_source_argument(parser: argparse._ActionsContainer, help: str = SOURCE_HELP) -> None:
    """--source: where the weights come from (smollm2.load's `source`; None is the bundled model)."""
    parser.add_argument("--source", default=None, help=help)


def add_quantize_argument(parser: argparse._ActionsContainer, default: str, help: str) -> None:
    """--quantize MODE, one of smollm2.quantize's modes (smollm2.load's `quantize`)."""
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=default, help=help)


def add_speed_options(parser: argparse.ArgumentParser, *, compile: bool = False) -> None:
    """--quantize and --compile/--no-compile, shared by generate, chat and serve (see load_for_inference).

    compile: the default, True where a compile pays back (a server runs for long; a one-off generate does
    not: BENCHMARKS.md has the compile times)."""
    group = parser.add_argument_group("speed (BENCHMARKS.md measures each choice)")
    add_quantize_argument(
        group, DEFAULT_QUANTIZE,
        help="weights: none (float32, exactly the original's numbers), bf16, int8 or int4 (weight-only, "
             "llama.cpp's Q8_0 / Q4_1 blocks of 32). Default: %(default)s, the fastest decode that keeps quality "
             "(+0.1-0.3%% perplexity on held-out text)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile,
                       help="the fast path, smollm2.load(..., compile=True): our decode kernels and a compiled "
                            "decode step, ~2x faster tokens after a one-off compile (seconds to a minute, cached "
                            "by torch for later runs) (default: %(default)s)")


def load_for_inference(args: argparse.Namespace):  # -> (SmolLM2, Tokenizer)
    """The model of --source, quantised as --quantize says, on the fast path if --compile: the library's one
    switch, `smollm2.load(..., compile=True)`, so the command line decodes exactly as the library does."""
    from ..loading import load

    model, tokenizer = load(args.source, quantize=args.quantize, compile=args.compile)
    return model.eval(), tokenizer


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The sampling flags, one per GenerationConfig field; `generation_config(args)` reads them back."""
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, metavar="N",
                       help="generate at most N tokens (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=TEMPERATURE, metavar="T",
                       help="sampling temperature; 0 = greedy (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=TOP_K, metavar="K",
                       help="sample among the K most likely tokens; 0 = off (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=TOP_P, metavar="P",
                       help="sample among the most likely tokens up to total probability P; 1 = off "
                            "(default: %(default)s)")
    group.add_argument("--min-p", type=float, default=MIN_P, metavar="P",
                       help="drop tokens less than P times as likely as the best; 0 = off (default: %(default)s)")
    group.add_argument("--repetition-penalty", type=float, default=REPETITION_PENALTY, metavar="R",
                       help="> 1 discourages repeating tokens; 1 = off (default: %(default)s)")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed: the same seed gives the same text (default: a fresh one)")
    group.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="stop when TEXT is generated (not shown); repeat for several")
    shape = parser.add_argument_group("constrained output (the grammar extra: pip install llguidance)")
    only = shape.add_mutually_exclusive_group()
    only.add_argument("--json-schema", type=Path, default=None, metavar="FILE",
                      help="the output is JSON valid against the JSON schema in FILE")
    only.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    only.add_argument("--regex", default=None, metavar="PATTERN", help="the output matches PATTERN as a whole")
    only.add_argument("--choice", action="append", default=None, metavar="TEXT",
                      help="the output is exactly one of the TEXTs; repeat for each")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of the parsed flags; invalid values raise ValueError before anything is loaded."""
    from ..inference.config import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=tuple(args.stop or ()), constraint=_constraint(args),
    )


def _constraint(args: argparse.Namespace):  # -> Constraint | None
    """The constraint of --json-schema / --json-object / --regex / --choice, checked before anything loads."""
    if args.json_schema is None and not args.json_object and args.regex is None and not args.choice:
        return None
    from ..inference.constraints import Constraint

    if args.json_schema is not None:
        try:
            text = args.json_schema.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read the JSON schema {args.json_schema}: {e.strerror}") from None
        return Constraint.json_schema(text)
    if args.json_object:
        return Constraint.json_object()
    return Constraint.regex(args.regex) if args.regex is not None else Constraint.choice(args.choice)


def resumed_config(config_class: type, run_dir: Path, given: dict):
    """The config a resumed fine-tuning or DPO run continues with: its newest checkpoint's settings, then the
    flags given now. Its --out must be the run itself, passed as the run directory."""
    import dataclasses
    import json

    from ..train.checkpoint import resolve_checkpoint

    if "out" in given and Path(given["out"]) != run_dir:
        raise ValueError(f"--out {given['out']} and --resume {run_dir}: a resumed run writes to its own directory")
    checkpoint = resolve_checkpoint(run_dir)
    if checkpoint.parent.parent != run_dir:
        raise ValueError(f"--resume {run_dir}: pass the run directory ({checkpoint.parent.parent}); a run "
                         "continues from its newest checkpoint")
    saved = config_class.from_checkpoint(json.loads((checkpoint / "train_config.json").read_text(encoding="utf-8")),
                                         json.loads((checkpoint / "trainer.json").read_text(encoding="utf-8")),
                                         str(checkpoint / "trainer.json"))
    # stop_at belongs to one invocation: a resumed run goes to --steps unless told otherwise.
    return config_class.from_dict({**dataclasses.asdict(saved), "out": str(run_dir), "stop_at": None, **given})


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass (--batch-size for batch_size), its help and default from the
    field's knob(). Flags not given are absent from args (SUPPRESS), so a resumed run keeps its own settings."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        options = {k: v for k, v in field.metadata.items() if k != "help"}
        help_text = field.metadata["help"] + ("" if default in ("", None) else f" (default: {default!r})")
        common = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%"), **options}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind == list[str]:
            parser.add_argument(flag.removesuffix("s"), dest=field.name, action="append", **common)
        else:
            scalar = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(flag, type=scalar, **common)
