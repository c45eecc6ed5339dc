"""`smollm2 prepare`: tokenize a text corpus into uint16 token files and a manifest (see smollm2/train/prepare.py)."""

from __future__ import annotations

import argparse

from ..defaults import MIN_VAL_DOCUMENTS, VAL_FRACTION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="FILE_OR_DIR",
                        help="a UTF-8 text file (one document) or a directory (each *.txt file inside, "
                             "recursively, is one document)")
    parser.add_argument("--out", required=True, metavar="DATA_DIR",
                        help="the data directory to write: train.bin, val.bin, manifest.json, tokenizer.json")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                        help="share held out for validation, in [0, 1): the last part of each document's tokens, "
                             f"or whole documents when that holds out at least {MIN_VAL_DOCUMENTS} "
                             "(default: %(default)s)")
    parser.add_argument("--tokenizer", default=None, metavar="SOURCE",
                        help="a .gguf file, a directory with tokenizer.json, a tokenizer.json file or a hub id "
                             "(default: the bundled SmolLM2-135M-Instruct GGUF's tokenizer)")
    parser.add_argument("--force", action="store_true",
                        help="replace DATA_DIR if it is an existing data directory")


def run(args: argparse.Namespace) -> int:
    from ..train.prepare import prepare

    manifest = prepare(args.input, args.out, val_fraction=args.val_fraction, tokenizer_source=args.tokenizer,
                       force=args.force, progress=True)
    documents = sum(s["documents"] for s in manifest["sources"])
    print(f"{args.out}: {manifest['train_tokens']:,} train tokens, {manifest['val_tokens']:,} val tokens "
          f"from {documents:,} document{'s' * (documents != 1)} (split: {manifest['split']}, "
          f"vocab {manifest['vocab_size']:,}, end-of-text id {manifest['eot_id']})")
    return 0
