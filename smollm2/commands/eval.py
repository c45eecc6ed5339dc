"""`smollm2 eval`: perplexity of a model on a prepared data directory's split or on a raw UTF-8 text file.

Windows and loss are defined in smollm2/perplexity.py: non-overlapping windows of --seq-len tokens by default,
a sliding window with --stride. A text file is encoded as plain text with the model's own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .options import add_quantize_argument, add_source_argument

log = logging.getLogger(__name__)
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype: torch's name for it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DATA_DIR|TEXT_FILE",
                        help="a directory made by `smollm2 prepare`, or a UTF-8 text file")
    add_source_argument(parser)
    parser.add_argument("--split", choices=["val", "train"], default="val",
                        help="which split of a data directory (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=1024, help="window length in tokens (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=None,
                        help="slide the window by this many tokens, scoring only the new ones "
                             "(default: --seq-len, non-overlapping windows)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="(default: %(default)s)")
    add_quantize_argument(parser, "none", help="weights: none (default), bf16, int8 or int4 (weight-only, CPU): "
                                              "what each mode costs")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..eval.perplexity import perplexity
    from ..loading import load
    from ..train.prepare import encode_file, load_tokens, read_manifest, tokenizer_sha256

    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    data = Path(args.data).expanduser()
    if not data.exists():
        raise ValueError(f"--data {data}: no such file or directory")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, _DTYPES[args.dtype])
    model, tokenizer = load(args.source, dtype=dtype, device=device, quantize=args.quantize)
    if data.is_dir():
        manifest = read_manifest(data)
        if manifest["tokenizer"].get("sha256") != tokenizer_sha256(tokenizer):
            log.warning("%s was tokenized with %s, not this model's tokenizer: the ids may mean other tokens",
                        data, manifest["tokenizer"].get("source"))
        tokens: np.ndarray = load_tokens(data, args.split)
        if len(tokens) == 0:
            raise ValueError(f"{data}: the {args.split} split holds no tokens (prepared with --val-fraction 0?); "
                             "try --split train")
    else:
        tokens = encode_file(data, tokenizer)
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    if len(tokens) < 2:
        raise ValueError(f"{data}: {len(tokens)} token{'s' * (len(tokens) != 1)}, too few to measure perplexity "
                         "(need at least 2)")
    result = perplexity(model, tokens, args.seq_len, args.batch_size, stride=args.stride, progress=True)
    stride = args.stride or args.seq_len
    if args.json:
        print(json.dumps({"data": str(data), "source": getattr(model, "source", args.source), "nll": result.nll,
                          "ppl": result.ppl, "quantize": args.quantize, "tokens": result.tokens,
                          "seq_len": args.seq_len, "stride": stride}))
    else:
        print(f"perplexity {result.ppl:.4f}  (loss {result.nll:.4f} nats/token over {result.tokens:,} predicted "
              f"tokens; windows of {args.seq_len}, stride {stride})")
    return 0
