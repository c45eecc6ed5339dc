"""Training data on disk: UTF-8 text -> flat uint16 token files plus a JSON manifest (`smollm2 prepare`).

A prepared data directory holds (format "smollm2-tokens-v1"):

  train.bin, val.bin   flat little-endian uint16 token streams (numpy `tofile`); every document (or piece of
                       one, see below) is followed by the end-of-text token `<|endoftext|>` (id 0 in SmolLM2)
  manifest.json        {"format", "dtype", "vocab_size", "eot_id", "tokenizer": {"source", "sha256"},
                        "train_tokens", "val_tokens", "max_id", "val_fraction", "split", "sources": [{"path",
                        "bytes", "sha256", "documents"}], "created"}; tokenizer.sha256 is the sha256 of the
                       tokenizer's JSON (`tokenizer.backend.to_str()`), so two tokenizers with equal hashes give
                       equal ids; max_id is the largest id in either file (checked against a model's vocabulary
                       before training, with the files themselves: TokenData.check_ids)
  tokenizer.json, tokenizer_config.json
                       the tokenizer that made the ids, so `load_tokenizer(DATA_DIR)` decodes them anywhere

Documents: a file is one document; a directory's documents are its *.txt files (recursive, sorted by path).
Files with no text (empty or whitespace only) are skipped. Text is encoded as plain text: a literal
"<|endoftext|>" inside a document is spelled out, so the only end-of-text tokens are the separators we add.

The validation split ("split" in the manifest):
  "tail"       the last `val_fraction` of each document's tokens, the rest being training data
               (nanoGPT's 90/10 split of Tiny Shakespeare: n_train = int(n * (1 - val_fraction))). Each
               piece is followed by the end-of-text token. Used when there are few documents.
  "documents"  whole documents, spread evenly over the sorted list (document i is held out when
               floor((i + 1) * f) > floor(i * f)). Used when at least MIN_VAL_DOCUMENTS would be held out.

Big inputs stream: files are read in blocks and tokenized in pieces cut only where the cut cannot change the
tokens (see `_safe_cuts`), so memory stays flat for a 1 GB file and the ids equal encoding the whole text.
Output goes to a temporary directory next to DATA_DIR, renamed into place when complete.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from ..defaults import MIN_VAL_DOCUMENTS, VAL_FRACTION
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "smollm2-tokens-v1"
DTYPE = np.dtype("<u2")  # uint16, little-endian: every SmolLM2 id (< 49152) fits
EOT_TOKEN = "<|endoftext|>"
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
BLOCK_BYTES = 1 << 22  # read 4 MiB of text at a time
PIECE_CHARS = 1 << 16  # encode ~64k-character pieces, several at once (tokenizers runs a batch in parallel)
PROGRESS_MIN_BYTES = 1 << 20  # no progress bar for inputs under 1 MiB
_COPY_TOKENS = 1 << 22  # tokens per read when moving a document's tail from train.bin to val.bin


# ---- tokenizer -----------------------------------------------------------------------------------------------


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The tokenizer's identity: sha256 of its serialized JSON."""
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


def plain_encoder(tokenizer: Tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """A batch encoder that reads special-token strings as plain text (for corpora, where they are data)."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.encode_special_tokens = True

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    return encode


# ---- reading text --------------------------------------------------------------------------------------------


@dataclass
class _FileStats:
    bytes: int = 0
    sha256: Any = None
    has_text: bool = False  # any non-whitespace character


def read_text(path: Path, stats: _FileStats | None = None, block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """A file's text in blocks, strictly UTF-8: a bad byte is a ValueError naming the file and its offset."""
    stats = stats if stats is not None else _FileStats()
    stats.sha256 = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes read so far
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        first = True
        while True:
            try:
                block = f.read(block_bytes)
            except OSError as e:
                raise ValueError(f"{path}: cannot read ({e.strerror})") from None
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the last block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                # e.start counts from the pending bytes, which sit just before this block in the file.
                bad = offset - pending + e.start
                raise ValueError(f"{path}: not UTF-8 text: invalid byte 0x{e.object[e.start]:02x} at byte offset "
                                 f"{bad} ({e.reason})") from None
            offset += len(block)
            stats.bytes = offset
            stats.sha256.update(block)
            if first and text:
                text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the text
                first = False
            if text:
                stats.has_text = stats.has_text or not text.isspace()
                yield text
            if not block:
                return


def _safe_cuts(text: str, every: int) -> list[int]:
    """Positions about `every` characters apart where text can be cut without changing its tokens.

    A cut goes just before a "\\n" that is followed by a letter. SmolLM2 pre-tokenizes with GPT-2's regex
    (`...| ?\\p{L}+|...|\\s+(?!\\S)|\\s+`) after splitting off digits, and a whitespace run is split differently
    at the end of a string ("a\\n\\n" -> "\\n\\n") than before a letter ("a\\n\\nb" -> "\\n", "\\n", "b"). Before
    the run's last "\\n", both sides see the same thing: the run's head ends a pre-token either way, and a
    "\\n" followed by a letter is a pre-token of its own. (Not before a digit: digits are split off first, and
    "a\\n\\n5" keeps "\\n\\n" whole.)
    """
    cuts = []
    i = text.find("\n", every)
    while i != -1 and i + 1 < len(text):
        if text[i + 1].isalpha():
            cuts.append(i)
            i = text.find("\n", i + every)
        else:
            i = text.find("\n", i + 1)
    return cuts


def iter_tokens(
    path: Path,
    encode: Callable[[list[str]], list[list[int]]],
    stats: _FileStats | None = None,
    block_bytes: int = BLOCK_BYTES,
    piece_chars: int = PIECE_CHARS,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[np.ndarray]:
    """The token ids of one file (as int32 arrays, a block at a time), equal to encoding the whole text."""
    rest = ""  # text after the last safe cut, carried into the next block
    read = 0
    for text in read_text(path, stats, block_bytes):
        text = rest + text
        cuts = _safe_cuts(text, piece_chars)
        if cuts:
            pieces = [text[a:b] for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
            rest = text[cuts[-1]:]
            yield np.fromiter((t for ids in encode(pieces) for t in ids), dtype=np.int32)
        else:
            rest = text  # no safe cut yet (one very long line): keep reading
        if on_bytes is not None and stats is not None:
            on_bytes(stats.bytes - read)
            read = stats.bytes
    if rest:
        yield np.asarray(encode([rest])[0], dtype=np.int32)


def encode_file(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """All token ids of a UTF-8 text file (plain text, no end-of-text token), as int32."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    chunks = list(iter_tokens(path, plain_encoder(tokenizer)))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def find_documents(input_path: str | Path) -> list[Path]:
    """The documents of an input: the file itself, or every *.txt file under a directory, sorted by path."""
    path = Path(input_path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if not p.is_dir())
        if not files:
            raise ValueError(f"{path}: no .txt files in this directory")
        return files
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: not a regular file or a directory")
    if not os.path.lexists(path):
        raise ValueError(f"{path}: no such file or directory")
    return [path]


# ---- prepare -------------------------------------------------------------------------------------------------


def prepare(
    input_path: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = VAL_FRACTION,
    tokenizer: Tokenizer | None = None,
    tokenizer_source: str | Path | None = None,
    force: bool = False,
    progress: bool = False,
    block_bytes: int = BLOCK_BYTES,
    piece_chars: int = PIECE_CHARS,
) -> dict[str, Any]:
    """Tokenize a text file or a directory of .txt files into a data directory; returns the manifest.

    tokenizer: a Tokenizer to use (its origin given by tokenizer_source); else load_tokenizer(tokenizer_source).
    force: replace an existing data directory (never a directory that is not one).
    """
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    input_path, out_dir = Path(input_path).expanduser(), Path(out_dir).expanduser()
    documents = find_documents(input_path)
    _check_out_dir(out_dir, input_path, force)
    if tokenizer is None:
        from ..loading import load_tokenizer  # (torch is not needed until here)

        tokenizer, source = load_tokenizer(tokenizer_source)
    else:
        source = str(tokenizer_source) if tokenizer_source is not None else "unknown"
    if tokenizer.vocab_size > np.iinfo(DTYPE).max + 1:
        raise ValueError(f"the tokenizer's {tokenizer.vocab_size} ids do not fit in uint16 (at most 65536)")
    eot = tokenizer.token_id(EOT_TOKEN)
    encode = plain_encoder(tokenizer)
    split = "documents" if len(documents) * val_fraction >= MIN_VAL_DOCUMENTS else "tail"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(out_dir.parent, f".{out_dir.name}.", ".tmp")  # same filesystem, so the rename is atomic
    try:
        total = sum(p.stat().st_size for p in documents if p.is_file())
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                   disable=not progress or total < PROGRESS_MIN_BYTES)
        sources = []
        with open(tmp / "train.bin", "wb+") as train, open(tmp / "val.bin", "wb+") as val, bar:
            for i, path in enumerate(documents):
                stats = _FileStats()
                if split == "documents":
                    held_out = math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
                    kept = _write_document(path, encode, stats, val if held_out else train, eot, block_bytes,
                                           piece_chars, bar.update)
                else:
                    kept = _write_document_split(path, encode, stats, train, val, eot, val_fraction,
                                                 block_bytes, piece_chars, bar.update)
                if not kept:
                    log.info("%s: no text, skipped", path)
                sources.append({"path": str(path.resolve()), "bytes": stats.bytes,
                                "sha256": stats.sha256.hexdigest(), "documents": int(kept)})
            train_tokens, val_tokens = train.tell() // DTYPE.itemsize, val.tell() // DTYPE.itemsize
            for f in (train, val):
                f.flush()
                os.fsync(f.fileno())
        if not any(s["documents"] for s in sources):
            where = documents[0] if len(documents) == 1 else f"{input_path} ({len(documents)} .txt files)"
            raise ValueError(f"{where}: no text to tokenize (empty or whitespace only)")
        manifest = {
            "format": FORMAT,
            "dtype": "uint16",
            "vocab_size": tokenizer.vocab_size,
            "eot_id": eot,
            "tokenizer": {"source": source, "sha256": tokenizer_sha256(tokenizer)},
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "max_id": max(max_token_id(tmp / "train.bin"), max_token_id(tmp / "val.bin")),
            "val_fraction": val_fraction,
            "split": split,
            "sources": sources,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tokenizer.save(tmp)
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        fsync_dir(tmp)
        _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_document(path, encode, stats, out, eot, block_bytes, piece_chars, on_bytes) -> bool:
    """Append one document and its end-of-text token to `out`; False (nothing written) if it has no text."""
    start = out.tell()
    for ids in iter_tokens(path, encode, stats, block_bytes, piece_chars, on_bytes):
        out.write(ids.astype(DTYPE).tobytes())
    if not stats.has_text:
        out.truncate(start)
        out.seek(start)
        return False
    out.write(np.array([eot], dtype=DTYPE).tobytes())
    return True


def _write_document_split(path, encode, stats, train, val, eot, val_fraction, block_bytes, piece_chars,
                          on_bytes) -> bool:
    """Append a document's head to train and its last val_fraction of tokens to val, each followed by EOT.

    The token count is known only at the end, so the whole document goes to train.bin first and its tail is
    then moved (in bounded reads) to val.bin.
    """
    start = train.tell()
    if not _write_document(path, encode, stats, train, eot, block_bytes, piece_chars, on_bytes):
        return False
    n = (train.tell() - start) // DTYPE.itemsize - 1  # without the end-of-text token just written
    n_train = int(n * (1 - val_fraction))
    if n_train == n:
        return True  # nothing held out: the document stays whole
    train.seek(start + n_train * DTYPE.itemsize)
    remaining = n - n_train
    while remaining:
        chunk = train.read(min(remaining, _COPY_TOKENS) * DTYPE.itemsize)
        val.write(chunk)
        remaining -= len(chunk) // DTYPE.itemsize
    val.write(np.array([eot], dtype=DTYPE).tobytes())
    train.truncate(start + n_train * DTYPE.itemsize)
    train.seek(start + n_train * DTYPE.itemsize)
    if n_train:
        train.write(np.array([eot], dtype=DTYPE).tobytes())
    return True


def _is_data_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir: Path, input_path: Path, force: bool) -> None:
    """Refuse to write where data would be lost: over the input, over a non-empty directory without force,
    or (even with force) over a directory that is not a prepared data directory."""
    out, inp = out_dir.resolve(), input_path.resolve()
    if out == inp or out in inp.parents:
        raise ValueError(f"--out {out_dir} contains the input {input_path}; choose another output directory")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise ValueError(f"--out {out_dir} exists and is not empty (pass --force to replace a prepared data "
                         "directory)")
    if not _is_data_dir(out_dir):
        raise ValueError(f"--out {out_dir} is not a prepared data directory (no {MANIFEST} of format {FORMAT}); "
                         "refusing to replace it even with --force")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory to out_dir; an old data directory is moved aside first, deleted last."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if out_dir.exists():
        old = _new_dir(out_dir.parent, f".{out_dir.name}.", ".old")
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)


def _new_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new directory with a unique name (mode from the umask, unlike tempfile.mkdtemp's 0o700)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable. Not possible on Windows, where it is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- reading a data directory --------------------------------------------------------------------------------


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The checked manifest of a prepared data directory (ValueError naming what is wrong)."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: no such data directory (make one with: smollm2 prepare --input TEXT "
                         f"--out {data_dir})")
    path = data_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{data_dir}: no {MANIFEST}; not a prepared data directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("dtype") != "uint16":
        raise ValueError(f"{path}: dtype {manifest.get('dtype')!r} is not 'uint16'")
    for key in ("vocab_size", "eot_id", "train_tokens", "val_tokens"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path}: {key} must be a non-negative integer, got {value!r}")
    if manifest["vocab_size"] > np.iinfo(DTYPE).max + 1:
        raise ValueError(f"{path}: vocab_size {manifest['vocab_size']} is too large for uint16 tokens "
                         "(at most 65536)")
    if manifest["eot_id"] >= manifest["vocab_size"]:
        raise ValueError(f"{path}: eot_id {manifest['eot_id']} is outside the vocabulary of "
                         f"{manifest['vocab_size']}")
    max_id = manifest.get("max_id")  # absent in directories prepared before it was recorded
    if max_id is not None and (not isinstance(max_id, int) or isinstance(max_id, bool) or max_id < 0
                               or max_id >= manifest["vocab_size"]):
        raise ValueError(f"{path}: max_id {max_id!r} is not an id of the vocabulary of {manifest['vocab_size']}")
    return manifest


def max_token_id(path: Path, chunk: int = 1 << 24) -> int:
    """The largest id in a token file (-1 when empty), read in pieces of 16M tokens."""
    if path.stat().st_size == 0:
        return -1
    tokens = np.memmap(path, dtype=DTYPE, mode="r")
    return max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))


def load_tokens(data_dir: str | Path, split: str, manifest: dict[str, Any] | None = None) -> np.ndarray:
    """One split's tokens as a read-only uint16 np.memmap (an empty array when the split holds no tokens).

    The size is checked against the manifest (`read_manifest(data_dir)`, read here unless given); the ids
    are not scanned (that would read the whole file).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    path = Path(data_dir).expanduser() / f"{split}.bin"
    if not path.is_file():
        raise ValueError(f"{path}: missing (the manifest lists {manifest[f'{split}_tokens']} {split} tokens)")
    size, expected = path.stat().st_size, manifest[f"{split}_tokens"]
    if size != expected * DTYPE.itemsize:
        raise ValueError(f"{path}: {size} bytes, but the manifest says {expected} tokens "
                         f"({expected * DTYPE.itemsize} bytes); the directory is damaged, prepare it again")
    if expected == 0:
        return np.zeros(0, dtype=DTYPE)  # numpy cannot map an empty file
    return np.memmap(path, dtype=DTYPE, mode="r")
