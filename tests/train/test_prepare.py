"""`smollm2 prepare` and the data directory format, checked against the original tokenizer.json."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from conftest import ORIGINAL_TOKENIZER, REPO, TINYSHAKESPEARE, require
from smollm2.loading import load_tokenizer
from smollm2.tokenizer import Tokenizer
from smollm2.train.prepare import (
    EOT_TOKEN,
    FORMAT,
    MIN_VAL_DOCUMENTS,
    iter_tokens,
    load_tokens,
    plain_encoder,
    prepare,
    read_manifest,
    tokenizer_sha256,
)


@pytest.fixture(scope="module")
def original() -> tokenizers.Tokenizer:
    """The original tokenizer.json, reading special-token strings as text (as prepare does)."""
    backend = tokenizers.Tokenizer.from_file(str(require(ORIGINAL_TOKENIZER)))
    backend.encode_special_tokens = True
    return backend


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(require(ORIGINAL_TOKENIZER).parent)


def ids(backend: tokenizers.Tokenizer, text: str) -> list[int]:
    return backend.encode(text, add_special_tokens=False).ids


def bin_tokens(path: Path) -> list[int]:
    return np.fromfile(path, dtype="<u2").tolist()


# ---- Tiny Shakespeare, with the default (bundled GGUF) tokenizer ----------------------------------------------


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ts") / "data"
    # Small blocks and pieces, so the file is read in ~70 blocks and encoded in ~1000 separate pieces.
    prepare(require(TINYSHAKESPEARE), out, block_bytes=1 << 14, piece_chars=1 << 10)
    return out


def test_tinyshakespeare_tokens_equal_the_original_tokenizer(shakespeare, original) -> None:
    text = TINYSHAKESPEARE.read_text(encoding="utf-8")
    expected = ids(original, text)
    eot = original.token_to_id(EOT_TOKEN)
    n_train = int(len(expected) * 0.9)  # nanoGPT's split: the last 10% is validation
    assert bin_tokens(shakespeare / "train.bin") == expected[:n_train] + [eot]
    assert bin_tokens(shakespeare / "val.bin") == expected[n_train:] + [eot]

    manifest = read_manifest(shakespeare)
    assert manifest["format"] == FORMAT and manifest["dtype"] == "uint16" and manifest["split"] == "tail"
    assert manifest["eot_id"] == eot == 0
    assert manifest["vocab_size"] == original.get_vocab_size(with_added_tokens=True) == 49152
    assert manifest["train_tokens"] == n_train + 1
    assert manifest["val_tokens"] == len(expected) - n_train + 1
    assert manifest["val_fraction"] == 0.1
    data = TINYSHAKESPEARE.read_bytes()
    assert manifest["sources"] == [{"path": str(TINYSHAKESPEARE.resolve()), "bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest(), "documents": 1}]

    train, val = load_tokens(shakespeare, "train"), load_tokens(shakespeare, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and not train.flags.writeable
    assert len(train) == manifest["train_tokens"] and len(val) == manifest["val_tokens"]
    # Round trip: the validation split is exactly the text's tail, and train + val is the whole text.
    val_text = original.decode(val[:-1].tolist(), skip_special_tokens=False)
    assert len(val_text) > 0.09 * len(text) and text.endswith(val_text)
    assert original.decode(train[:-1].tolist(), skip_special_tokens=False) + val_text == text


def test_manifest_names_the_tokenizer(shakespeare, original) -> None:
    from smollm2.loading import bundled_gguf

    manifest = read_manifest(shakespeare)
    assert manifest["tokenizer"]["source"] == str(bundled_gguf().resolve())
    # The data directory carries the tokenizer that made the ids, and the hash identifies it.
    saved = Tokenizer.from_dir(shakespeare)
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(saved.backend.to_str().encode()).hexdigest()
    text = "Sweet prince, 2024 <|im_end|>\n\n  good night!"
    assert saved.encode(text, allow_special=False) == ids(original, text)


# ---- chunked encoding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "a\n\nb\n\n5\n \nc\r\nd\n\n\n\n e \n\tf",
    "First line.\nSecond line\n\n\nThird 12\n345 end\n",
    "né\nçà 😀\nΩmega\n\nЖук 日本語\n語\n\n",
    "a<|endoftext|>b\n<|im_start|>c\nd",
    "no newline at all " * 50,
])
@pytest.mark.parametrize("block_bytes,piece_chars", [(1, 1), (3, 2), (7, 5), (1 << 20, 1 << 16)])
def test_chunked_encoding_equals_whole_text(tmp_path, original, tokenizer, text, block_bytes, piece_chars) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    chunks = list(iter_tokens(path, plain_encoder(tokenizer), block_bytes=block_bytes, piece_chars=piece_chars))
    assert np.concatenate(chunks).tolist() == ids(original, text)


def test_chunked_encoding_fuzz(tmp_path, original, tokenizer) -> None:
    """Random texts over the characters whose pre-tokenization depends on context."""
    rng = random.Random(0)
    alphabet = ["a", "b", "Z", "é", "\n", "\n", "\n", " ", " ", "\t", "\r", "5", "!", "'s", "語", "😀"]
    encode = plain_encoder(tokenizer)
    path = tmp_path / "t.txt"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        path.write_bytes(text.encode("utf-8"))
        got = np.concatenate(list(iter_tokens(path, encode, block_bytes=rng.randint(1, 9),
                                              piece_chars=rng.randint(1, 6)))).tolist()
        assert got == ids(original, text), repr(text)


# ---- directory input -----------------------------------------------------------------------------------------


def test_directory_input_tail_split(tmp_path, original, tokenizer) -> None:
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    docs = {"b.txt": "Second document,\nwith two lines.\n", "a.txt": "First document: 1234 words " * 3,
            "sub/c.txt": "Third, in a subdirectory.", "empty.txt": "", "blank.txt": " \n\n"}
    for name, text in docs.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "notes.md").write_text("not a .txt file", encoding="utf-8")
    manifest = prepare(src, tmp_path / "data", val_fraction=0.25, tokenizer=tokenizer,
                       tokenizer_source=ORIGINAL_TOKENIZER.parent)

    order = ["a.txt", "b.txt", "blank.txt", "empty.txt", "sub/c.txt"]  # sorted by path
    train, val = [], []
    for name in order:
        if docs[name].strip():
            doc = ids(original, docs[name])
            n_train = int(len(doc) * 0.75)
            train += doc[:n_train] + [0]
            val += doc[n_train:] + [0]
    assert bin_tokens(tmp_path / "data" / "train.bin") == train
    assert bin_tokens(tmp_path / "data" / "val.bin") == val
    assert manifest["split"] == "tail"
    assert [(s["path"], s["documents"]) for s in manifest["sources"]] == \
        [(str((src / name).resolve()), int(bool(docs[name].strip()))) for name in order]
    assert [s["bytes"] for s in manifest["sources"]] == [len(docs[n].encode()) for n in order]
    assert manifest["tokenizer"] == {"source": str(ORIGINAL_TOKENIZER.parent),
                                     "sha256": tokenizer_sha256(tokenizer)}
    assert read_manifest(tmp_path / "data") == manifest


def test_directory_input_whole_document_split(tmp_path, original, tokenizer) -> None:
    src = tmp_path / "corpus"
    src.mkdir()
    n_docs, fraction = 4 * MIN_VAL_DOCUMENTS, 0.25
    texts = [f"Document number {i}.\nIt says {'la ' * i}." for i in range(n_docs)]
    for i, text in enumerate(texts):
        (src / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    manifest = prepare(src, tmp_path / "data", val_fraction=fraction, tokenizer=tokenizer)
    held_out = [i for i in range(n_docs) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]
    assert len(held_out) == MIN_VAL_DOCUMENTS and held_out[:2] == [3, 7]
    expected = {"train": [], "val": []}
    for i, text in enumerate(texts):
        expected["val" if i in held_out else "train"] += ids(original, text) + [0]
    assert manifest["split"] == "documents"
    assert bin_tokens(tmp_path / "data" / "train.bin") == expected["train"]
    assert bin_tokens(tmp_path / "data" / "val.bin") == expected["val"]
    assert manifest["val_tokens"] == len(expected["val"])


def test_zero_val_fraction_gives_an_empty_val_split(tmp_path, original, tokenizer) -> None:
    (tmp_path / "t.txt").write_text("All of it is training data.", encoding="utf-8")
    manifest = prepare(tmp_path / "t.txt", tmp_path / "data", val_fraction=0.0, tokenizer=tokenizer)
    assert manifest["val_tokens"] == 0 and len(load_tokens(tmp_path / "data", "val")) == 0
    assert load_tokens(tmp_path / "data", "train").tolist() == ids(original, "All of it is training data.") + [0]


# ---- prepare errors ------------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("files", [{"t.txt": ""}, {"t.txt": " \n\t\n"}, {"d/a.txt": "", "d/b.txt": "\n"}])
def test_empty_input_is_an_error(tmp_path, tokenizer, files) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    source = tmp_path / next(iter(files)).split("/")[0]
    with pytest.raises(ValueError, match="no text to tokenize") as e:
        prepare(source, tmp_path / "out", tokenizer=tokenizer)
    assert str(source) in str(e.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_directory_without_txt_files_is_an_error(tmp_path, tokenizer) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.md").write_text("text", encoding="utf-8")
    with pytest.raises(ValueError, match=r"src: no \.txt files"):
        prepare(tmp_path / "src", tmp_path / "out", tokenizer=tokenizer)


@pytest.mark.parametrize("data,offset,block_bytes", [
    (b"hello\nworld \xff more", 12, 1 << 20),
    (b"ab\xc3\xa9cd\xe2\x82Xyz", 6, 4),  # a 3-byte character cut short, read across blocks
    (b"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3", 8, 3),  # truncated at the end of the file
    (b"\x80abc", 0, 2),
])
def test_non_utf8_names_the_file_and_offset(tmp_path, tokenizer, data, offset, block_bytes) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "fine.txt").write_text("fine", encoding="utf-8")
    bad = tmp_path / "src" / "bad.txt"
    bad.write_bytes(data)
    with pytest.raises(ValueError) as e:
        prepare(tmp_path / "src", tmp_path / "out", tokenizer=tokenizer, block_bytes=block_bytes)
    assert f"{bad}: not UTF-8 text: invalid byte 0x{data[offset]:02x} at byte offset {offset} " in str(e.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_unreadable_paths_are_errors(tmp_path, tokenizer) -> None:
    with pytest.raises(ValueError, match="missing.txt: no such file or directory"):
        prepare(tmp_path / "missing.txt", tmp_path / "out", tokenizer=tokenizer)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(ValueError, match=r"dangling\.txt: cannot read \(No such file or directory\)"):
        prepare(tmp_path / "src", tmp_path / "out", tokenizer=tokenizer)
    locked = tmp_path / "locked.txt"
    locked.write_text("a secret, kept in a locked file", encoding="utf-8")
    locked.chmod(0)
    try:
        readable = os.access(locked, os.R_OK)  # root reads anything
        if readable:
            prepare(locked, tmp_path / "out", tokenizer=tokenizer)
            train, val = load_tokens(tmp_path / "out", "train"), load_tokens(tmp_path / "out", "val")
            assert train[:-1].tolist() + val[:-1].tolist() == tokenizer.encode("a secret, kept in a locked file")
        else:
            with pytest.raises(ValueError, match=r"locked\.txt: cannot read \(Permission denied\)"):
                prepare(locked, tmp_path / "out", tokenizer=tokenizer)
    finally:
        locked.chmod(0o644)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_val_fraction_outside_range_is_an_error(tmp_path, tokenizer, fraction) -> None:
    (tmp_path / "t.txt").write_text("text", encoding="utf-8")
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        prepare(tmp_path / "t.txt", tmp_path / "out", val_fraction=fraction, tokenizer=tokenizer)


def test_existing_out_dir_needs_force_and_is_never_lost(tmp_path, original, tokenizer) -> None:
    (tmp_path / "t.txt").write_text("new text", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="exists and is not empty"):
        prepare(tmp_path / "t.txt", out, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="not a prepared data directory"):
        prepare(tmp_path / "t.txt", out, tokenizer=tokenizer, force=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text(encoding="utf-8") == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare(tmp_path / "t.txt", empty, tokenizer=tokenizer)["train_tokens"] > 0  # an empty dir is fine

    data = tmp_path / "data"
    prepare(tmp_path / "t.txt", data, val_fraction=0.0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pass --force"):
        prepare(tmp_path / "t.txt", data, tokenizer=tokenizer)
    (tmp_path / "t.txt").write_text("newer text, longer", encoding="utf-8")
    prepare(tmp_path / "t.txt", data, val_fraction=0.0, tokenizer=tokenizer, force=True)
    assert load_tokens(data, "train").tolist() == ids(original, "newer text, longer") + [0]
    assert _leftovers(tmp_path) == []  # no temporary or old directories left behind

    with pytest.raises(ValueError, match="contains the input"):
        prepare(tmp_path / "t.txt", tmp_path, tokenizer=tokenizer, force=True)


# ---- reading a data directory --------------------------------------------------------------------------------


@pytest.fixture
def small_data(tmp_path, tokenizer) -> Path:
    (tmp_path / "t.txt").write_text("To be, or not to be:\nthat is the question.\n" * 20, encoding="utf-8")
    prepare(tmp_path / "t.txt", tmp_path / "data", tokenizer=tokenizer)
    return tmp_path / "data"


def _edit_manifest(data: Path, **changes: object) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def test_read_manifest_errors(tmp_path, small_data) -> None:
    with pytest.raises(ValueError, match="nowhere: no such data directory"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no manifest.json"):
        read_manifest(tmp_path)
    manifest_text = (small_data / "manifest.json").read_text()
    (small_data / "manifest.json").write_text(manifest_text[:-10])
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        read_manifest(small_data)
    (small_data / "manifest.json").write_text(manifest_text)
    for changes, message in [
        ({"format": "nanogpt"}, "format 'nanogpt' is not 'smollm2-tokens-v1'"),
        ({"dtype": "uint32"}, "dtype 'uint32' is not 'uint16'"),
        ({"vocab_size": 70000}, "vocab_size 70000 is too large for uint16"),
        ({"train_tokens": -1}, "train_tokens must be a non-negative integer, got -1"),
        ({"eot_id": 49152}, "eot_id 49152 is outside the vocabulary of 49152"),
    ]:
        _edit_manifest(small_data, **changes)
        with pytest.raises(ValueError, match=message):
            read_manifest(small_data)
        (small_data / "manifest.json").write_text(manifest_text)
    assert read_manifest(small_data)["val_tokens"] > 0


def test_load_tokens_errors(small_data) -> None:
    manifest = read_manifest(small_data)
    with pytest.raises(ValueError, match="split must be one of"):
        load_tokens(small_data, "test")
    with open(small_data / "train.bin", "r+b") as f:
        f.truncate(2 * manifest["train_tokens"] - 2)
    with pytest.raises(ValueError, match=rf"train.bin: {2 * manifest['train_tokens'] - 2} bytes, but the manifest "
                                         rf"says {manifest['train_tokens']} tokens"):
        load_tokens(small_data, "train")
    (small_data / "val.bin").unlink()
    with pytest.raises(ValueError, match=r"val.bin: missing"):
        load_tokens(small_data, "val")


def test_load_tokenizer_sources(shakespeare) -> None:
    tokenizer, source = load_tokenizer(shakespeare)  # a data directory carries its tokenizer
    assert source == str(shakespeare.resolve())
    assert tokenizer_sha256(tokenizer) == read_manifest(shakespeare)["tokenizer"]["sha256"]
    tokenizer, source = load_tokenizer(ORIGINAL_TOKENIZER)
    assert source == str(ORIGINAL_TOKENIZER.resolve()) and tokenizer.token_id(EOT_TOKEN) == 0
    with pytest.raises(ValueError, match="no-such-tokenizer: no such file or directory"):
        load_tokenizer("./no-such-tokenizer")


# ---- the command line ----------------------------------------------------------------------------------------


def test_cli_prepare(tmp_path, original) -> None:
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    cmd = [sys.executable, "-m", "smollm2", "prepare", "--input", str(tmp_path / "t.txt"), "--out",
           str(tmp_path / "data"), "--val-fraction", "0.2", "--tokenizer", str(ORIGINAL_TOKENIZER.parent)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = ids(original, text)
    n_train = int(len(expected) * 0.8)
    assert f"{n_train + 1:,} train tokens, {len(expected) - n_train + 1:,} val tokens from 1 document" in done.stdout
    assert load_tokens(tmp_path / "data", "val").tolist() == expected[n_train:] + [0]


def test_cli_prepare_error_is_one_line(tmp_path, capsys) -> None:
    from smollm2.cli import main

    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")  # Latin-1, not UTF-8
    assert main(["prepare", "--input", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "data"),
                 "--tokenizer", str(ORIGINAL_TOKENIZER.parent)]) == 2
    assert capsys.readouterr().err == (f"smollm2 prepare: error: {tmp_path / 'bad.txt'}: not UTF-8 text: invalid byte "
                                       "0xe9 at byte offset 3 (invalid continuation byte)\n")
    assert not (tmp_path / "data").exists()
