"""Token ids outside the model's vocabulary: `prepare` records the largest id in the manifest, and training checks
both the manifest and the files themselves before its first step, naming the file and the first bad offset
(instead of an IndexError from deep inside torch mid-run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_utils import (
    byte_corpus,
    one_thread,  # noqa: F401 (fixture)
    quick_config,
    tiny_model_json,
    write_tokens,
)

from conftest import ORIGINAL_TOKENIZER, require
from smollm2.train import train
from smollm2.train.data import TokenData, first_id_at_least
from smollm2.train.prepare import prepare, read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("split", ["train", "val"])
def test_out_of_vocabulary_id_stops_training_before_the_first_step(tmp_path: Path, split: str) -> None:
    good = byte_corpus(tmp_path / "good")
    tokens = {name: np.fromfile(good / f"{name}.bin", dtype="<u2") for name in ("train", "val")}
    tokens[split][123] = 300  # a 256-id model: one id past its embedding table (the manifest says nothing)
    tokens[split][200] = 40000
    data = write_tokens(tmp_path / "data", tokens["train"], tokens["val"])
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"{split}.bin: token 123 \(byte offset 246\) is id 300, outside the "
                                         rf"vocabulary of the model \(.*tiny_model.json: 256 ids, 0-255\)"):
        train(quick_config(data, run, tiny_model_json(tmp_path)))
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # no step ran


def test_the_command_line_says_it_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from smollm2.cli import main

    good = byte_corpus(tmp_path / "good")
    tokens = np.fromfile(good / "train.bin", dtype="<u2")
    tokens[-1] = 65535
    data = write_tokens(tmp_path / "data", tokens, np.fromfile(good / "val.bin", dtype="<u2"))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model",
                 str(tiny_model_json(tmp_path)), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"train.bin: token {len(tokens) - 1} (byte offset {2 * (len(tokens) - 1)}) is id 65535" in err
    assert "Traceback" not in err and "IndexError" not in err


def test_first_id_at_least_across_pieces() -> None:
    tokens = np.zeros(1000, dtype=np.uint16)
    assert first_id_at_least(tokens, 1, chunk=64) is None
    tokens[[700, 900]] = 5
    assert first_id_at_least(tokens, 5, chunk=64) == 700
    assert first_id_at_least(tokens, 6, chunk=64) is None


def test_prepare_records_the_max_id_and_the_manifest_is_checked(tmp_path: Path) -> None:
    from smollm2.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(require(ORIGINAL_TOKENIZER).parent)
    source = tmp_path / "text.txt"
    source.write_text("Zebras quietly juxtapose xylophones. " * 20, encoding="utf-8")
    manifest = prepare(source, tmp_path / "data", tokenizer=tokenizer, progress=False)
    data = TokenData.open(tmp_path / "data")
    assert manifest["max_id"] == max(int(data.train.max()), int(data.val.max())) > 1000
    data.check_ids(49152, "135m")  # the real vocabulary takes them
    with pytest.raises(ValueError, match=rf"is id {manifest['max_id']}, outside the vocabulary"):
        data.check_ids(manifest["max_id"], "small")

    path = tmp_path / "data" / "manifest.json"
    path.write_text(json.dumps(manifest | {"max_id": 49152}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"manifest.json: max_id 49152 is not an id of the vocabulary of 49152"):
        read_manifest(tmp_path / "data")
