"""`smollm2 bench`: prefill and decode speed of our modes beside transformers and llama.cpp, as one table.

The measuring is in smollm2/bench/inference.py (each configuration in its own process,
`python -m smollm2.bench --worker`); this file parses the options (for `python -m smollm2.bench` too), prints the
table and, last, the whole result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..defaults import BENCH_PEERS as PEERS
from ..defaults import QUANTIZE_MODES as OUR_MODES
from .options import add_source_argument


def _names(allowed: tuple[str, ...], flag: str):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {flag} value(s) {', '.join(bad)}; choose from "
                                             f"{', '.join(allowed)}")
        return names

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_argument(parser)
    parser.add_argument("--modes", "--quantize", dest="modes", type=_names(OUR_MODES, "--modes"), default=OUR_MODES,
                        help=f"our modes (--quantize values) to run, comma-separated (default: {','.join(OUR_MODES)})")
    parser.add_argument("--against", type=_names(PEERS + ("none",), "--against"), default=PEERS,
                        help=f"peers to run when installed, comma-separated, or 'none' (default: {','.join(PEERS)})")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to decode (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs after one warm-up; the median is reported (default: %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="decode eagerly (no torch.compile)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the result to FILE")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..bench.inference import format_table, run_bench

    console = Console(width=None if sys.stdout.isatty() else 160)  # a file or pipe gets the whole table
    against = tuple(p for p in args.against if p != "none")
    report = run_bench(
        source=args.source, modes=args.modes, against=against, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, repeats=args.repeats, compile=not args.no_compile, device=args.device,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    machine = report["machine"]
    console.print(format_table(report))
    bandwidth = report["bandwidth_gb_s"]
    console.print(f"{machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads, "
                  f"torch {machine['torch']} ({machine['capability']})"
                  + (f"; memory read bandwidth {bandwidth:.1f} GB/s" if bandwidth else ""))
    if report["skipped"]:
        console.print("not run: " + ", ".join(report["skipped"]))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report))
    return 0
