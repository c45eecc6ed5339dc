"""`smollm2 export`: a model in the original's layout (--format hf) or as one GGUF file (--format gguf).

  smollm2 export RUN_DIR[/checkpoints/step_N] --out DIR [--dtype fp32|bf16]
      DIR gets config.json, generation_config.json, model.safetensors and the tokenizer files, as the original
      SmolLM2 repositories have them: `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
      `smollm2 generate --source DIR` both load it.
  smollm2 export [SOURCE] --format gguf [--quantize f16|q8_0|q4_1] --out FILE.gguf
      SOURCE: a run or checkpoint, or anything smollm2.load() accepts (default: the bundled model). FILE.gguf is
      what llama.cpp's converter and quantiser would make of it (smollm2/quant/gguf_export.py): llama.cpp and
      Ollama run it, `smollm2.load(FILE)` and transformers (gguf_file=) read it back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

_DTYPES = ("fp32", "bf16")
_FORMATS = ("hf", "gguf")
_GGUF_DEFAULT = "f16"  # convert_hf_to_gguf.py's default too: the weights to f16 rounding


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                        help="hf: a run directory (its newest complete checkpoint) or one checkpoint directory; "
                             "gguf: also a .gguf file, an original-layout directory or a hub id (default: the "
                             "bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="hf: the directory to write; gguf: the file to write (FILE.gguf)")
    parser.add_argument("--format", choices=_FORMATS, default="hf",
                        help="hf: safetensors in the original's layout (transformers); gguf: one file for "
                             "llama.cpp and Ollama (default: %(default)s)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="hf: weight dtype to write (default: fp32)")
    parser.add_argument("--quantize", default=None, metavar="TYPE",
                        help="gguf: f16, q8_0 or q4_1, each tensor in the type llama.cpp gives it for that file "
                             f"type (norms F32; with q4_1, a tied embedding Q8_0) (default: {_GGUF_DEFAULT})")


def run(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _run_gguf(args)
    if args.quantize is not None:
        raise ValueError("--quantize is for --format gguf (--format hf writes floats: --dtype fp32 or bf16)")
    if args.source is None:
        raise ValueError("--format hf exports a training run: pass RUN_DIR (or RUN_DIR/checkpoints/step_N)")
    if Path(args.out).suffix == ".gguf":
        raise ValueError(f"--out {args.out} names a GGUF file, but --format hf writes a directory; "
                         "add --format gguf")
    return _run_hf(args)


def _run_hf(args: argparse.Namespace) -> int:
    import torch

    from ..tokenizer import Tokenizer
    from ..train.checkpoint import checkpoint_model, resolve_checkpoint
    from ..weights import build_model, save_pretrained

    path = resolve_checkpoint(args.source)
    out = Path(args.out)
    if out.resolve() == path.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; choose another directory")
    config, state_dict = checkpoint_model(path)
    dtype_name = args.dtype or "fp32"
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model = build_model(config, state_dict, str(path), dtype=dtype)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    save_pretrained(model, out, tokenizer)
    note = "" if tokenizer is not None else " (the checkpoint has no tokenizer: none written)"
    print(f"exported {path} ({config.num_parameters() / 1e6:.1f}M parameters, {dtype_name}) to {out}{note}")
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    from ..gguf import config_from_gguf, read_gguf, state_dict_from_gguf, tokenizer_from_gguf
    from ..loading import BUNDLED_FILE, load_weights, resolve
    from ..quant.gguf_export import check_file_type, general_fields, write_gguf

    if args.dtype is not None:
        raise ValueError("--dtype is for --format hf; --format gguf takes --quantize f16, q8_0 or q4_1")
    file_type = check_file_type(args.quantize or _GGUF_DEFAULT)
    out = Path(args.out)
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out}: --format gguf writes one file, whose name ends in .gguf")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; --format gguf writes one file, e.g. --out {out}/model.gguf")
    kind, path = resolve(args.source)
    if out.resolve() == path.resolve():
        raise ValueError(f"--out {out} is the source itself; choose another file")
    general = None
    if kind == "gguf":  # read once: the model, and the general.* metadata (name, license, ...) it carries
        reader = read_gguf(path)
        config = config_from_gguf(reader, path)
        state_dict = state_dict_from_gguf(reader, config, path)
        tokenizer = tokenizer_from_gguf(reader, path)
        general = general_fields(reader)
    else:
        config, state_dict, tokenizer = load_weights(path)
    name = Path(str(args.source)).name if args.source is not None else BUNDLED_FILE
    types = write_gguf(out, config, state_dict, tokenizer, file_type, name=name, general=general)
    counts = ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda item: -item[1]))
    shown = path if args.source is not None else f"the bundled {BUNDLED_FILE}"
    print(f"exported {shown} ({config.num_parameters() / 1e6:.1f}M parameters) to {out}: {file_type}, "
          f"{out.stat().st_size / 1e6:.1f} MB, tensors {counts}")
    return 0
