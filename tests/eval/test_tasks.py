"""Tests for smollm2/eval_tasks.py: prompts rendered from the real benchmark files, lighteval's tokenisation
split, acc / acc_norm arithmetic, and errors on malformed files. The data is never copied into the repo."""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from smollm2.eval.tasks import (
    TASKS,
    Item,
    accuracy,
    card_scores,
    continuation_length,
    default_data_dir,
    load_task,
    model_card_scores,
    predict,
    split_context_continuation,
    wilson_interval,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
TOKENIZER = DATA.parent / "smollm2-135m" / "tokenizer.json"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")

# Item counts from shared/data/eval/README.txt, and the first item of each split written out by hand from the
# first line of the raw file (hellaswag: the first 6 lines of the decompressed text).
EXPECTED = {
    "piqa": (
        1838,
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        (
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips,"
            " you will also need to supply it with a water bottle and a food dish.",
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans"
            " material, you will also need to supply it with a water bottle and a food dish.",
        ),
        0,
        "piqa/0",
    ),
    "arc_easy": (
        2376,
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
        "\nAnswer:",
        (
            " Sunlight is the source of energy for nearly all ecosystems.",
            " Most ecosystems are found on land instead of in water.",
            " Carbon dioxide is more available than other gases.",
            " The producers in all ecosystems are plants.",
        ),
        0,
        "Mercury_417466",
    ),
    "arc_challenge": (
        1172,
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact."
        " Which is the most likely effect of this increase in rotation?\nAnswer:",
        (
            " Planetary density will decrease.",
            " Planetary years will become longer.",
            " Planetary days will become shorter.",
            " Planetary gravity will become stronger.",
        ),
        2,
        "Mercury_7175875",
    ),
    "hellaswag": (
        10042,
        # raw: "Roof shingle removal: A man is sitting on a roof. he": ctx_b capitalised, a space appended.
        "Roof shingle removal: A man is sitting on a roof. He ",
        (
            " is using wrap to wrap a pair of skis.",
            " is ripping level tiles off.",
            " is holding a rubik's cube.",
            " starts pulling up roofing on a roof.",
        ),
        3,
        "hellaswag/0",
    ),
    "winogrande": (
        1267,
        "Sarah was a much better surgeon than Maria so ",
        ("Sarah always got the easier cases.", "Maria always got the easier cases."),
        1,
        "3FCO4VKOZ4BJQ6IFC0VAIBK4KTWE7U-2",
    ),
    "openbookqa": (
        500,
        "Frilled sharks and angler fish live far beneath the surface of the ocean,"
        " which is why they are known as",
        (" Deep sea animals", " fish", " Long Sea Fish", " Far Sea Animals"),
        0,
        "8-376",
    ),
    "commonsense_qa": (
        1221,
        "A revolving door is convenient for two direction travel,"
        " but it also serves as a security measure at a what?",
        (" bank", " library", " department store", " mall", " new york"),
        0,
        "1afa02df02c908a558b4036e80242fac",
    ),
}


def test_registry_names() -> None:
    assert set(TASKS) == set(EXPECTED)
    assert {name: spec.num_items for name, spec in TASKS.items()} == {n: e[0] for n, e in EXPECTED.items()}


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_data_count_and_first_item(name: str) -> None:
    count, context, choices, gold, item_id = EXPECTED[name]
    items = load_task(name, DATA)
    assert len(items) == count
    assert items[0] == Item(context=context, choices=choices, gold=gold, id=item_id)
    assert len({item.id for item in items}) == count
    assert load_task(name, DATA, limit=2) == items[:2]
    assert load_task(name, DATA, limit=0) == []


@needs_data
def test_real_data_gold_distribution() -> None:
    # Label counts from the PROVENANCE files: a guard against off-by-one gold indices.
    piqa = [item.gold for item in load_task("piqa", DATA)]
    assert (piqa.count(0), piqa.count(1)) == (910, 928)
    wino = [item.gold for item in load_task("winogrande", DATA)]
    assert (wino.count(0), wino.count(1)) == (628, 639)
    hella = [item.gold for item in load_task("hellaswag", DATA)]
    assert [hella.count(k) for k in range(4)] == [2515, 2485, 2584, 2458]
    csqa = [item.gold for item in load_task("commonsense_qa", DATA)]
    assert [csqa.count(k) for k in range(5)] == [239, 255, 241, 251, 235]


@needs_data
def test_default_data_dir() -> None:
    assert default_data_dir() == DATA


def test_continuation_length() -> None:
    assert continuation_length(" Paris") == 5
    assert continuation_length("Paris") == 5
    assert continuation_length("  two spaces") == 11  # only the first space is free
    assert continuation_length(" ") == 0
    assert continuation_length("") == 0


def _char_encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def _word_encoder() -> tuple[dict[str, int], Callable[[str], list[int]]]:
    # GPT-2-style pre-tokenisation: a space is glued to the next word, so "wor" + "ld" merge into " world".
    vocab: dict[str, int] = {}

    def encode(text: str) -> list[int]:
        return [vocab.setdefault(piece, len(vocab)) for piece in re.findall(r" ?\S+|\s+(?!\S)|\s+", text)]

    return vocab, encode


def test_split_toy_character_encoder() -> None:
    ctx, cont = split_context_continuation("Question: 2+2?\nAnswer:", " 4", _char_encode)
    assert ctx == _char_encode("Question: 2+2?\nAnswer:")
    assert cont == _char_encode(" 4")
    # Trailing whitespace of the context (spaces and newlines) moves onto the continuation.
    ctx, cont = split_context_continuation("ab \n ", "cd", _char_encode)
    assert ctx == _char_encode("ab")
    assert cont == _char_encode(" \n cd")


def test_split_toy_word_encoder_merge_and_space() -> None:
    vocab, encode = _word_encoder()
    ctx, cont = split_context_continuation("He ", " is here", encode)
    assert ctx == [vocab["He"]]
    assert cont == [vocab[" "], vocab[" is"], vocab[" here"]]  # "  is here": HellaSwag's doubled space
    # The continuation merges into the last context token: that merged token is scored instead.
    ctx, cont = split_context_continuation("Hello wor", "ld", encode)
    assert ctx == [vocab["Hello"]]
    assert cont == [vocab[" world"]]
    with pytest.raises(ValueError, match="nothing to score"):
        split_context_continuation("", "", encode)


@pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"SmolLM2 tokenizer not found at {TOKENIZER}")
def test_split_real_tokenizer() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER))

    def encode(text: str) -> list[int]:
        return tok.encode(text).ids

    context = "Roof shingle removal: A man is sitting on a roof. He "
    choice = " starts pulling up roofing on a roof."
    if DATA.is_dir():
        item = load_task("hellaswag", DATA, limit=1)[0]
        assert (item.context, item.choices[item.gold]) == (context, choice)
    ctx, cont = split_context_continuation(context, choice, encode)
    assert ctx == encode("Roof shingle removal: A man is sitting on a roof. He")
    assert ctx + cont == encode(context + choice)
    assert tok.decode(cont) == "  starts pulling up roofing on a roof."
    assert tok.id_to_token(cont[0]) == "Ġ"  # the moved space is its own token before "Ġstarts"
    # Merge case with real BPE: "Hello wor" -> [Hello, Ġwor], "Hello world" -> [Hello, Ġworld].
    ctx, cont = split_context_continuation("Hello wor", "ld", encode)
    assert ctx == [tok.token_to_id("Hello")]
    assert cont == [tok.token_to_id("Ġworld")]


def test_acc_and_acc_norm_disagree() -> None:
    short_long = (" a", " bbbbbbbbb")  # normalisers 1 and 9
    # Raw sums favour the short choice (-2 > -9); per character the long one wins (-1 > -2).
    assert predict([-2.0, -9.0], short_long, normalize=False) == 0
    assert predict([-2.0, -9.0], short_long, normalize=True) == 1
    items = [
        Item(context="q1", choices=short_long, gold=1, id="norm-right"),
        Item(context="q2", choices=short_long, gold=0, id="raw-right"),
        Item(context="q3", choices=("x", "yyyy"), gold=0, id="both-right"),  # no leading space: 1 and 4
        Item(context="q4", choices=(" c", " d", " e"), gold=2, id="tie"),  # ties go to the first index
    ]
    sums = [[-2.0, -9.0], [-2.0, -9.0], [-1.0, -8.0], [-3.0, -3.0, -3.0]]
    result = accuracy(items, sums)
    assert result.n == 4
    assert result.acc == pytest.approx(2 / 4)  # raw-right, both-right
    assert result.acc_norm == pytest.approx(2 / 4)  # norm-right, both-right
    assert result.acc_ci == pytest.approx(wilson_interval(2, 4))
    # Winogrande-style choices with no leading space divide by the full length.
    assert predict([-6.0, -10.0], ("abc", "abcdefghij"), normalize=True) == 1
    with pytest.raises(ValueError, match="3 log-prob sums for 2 choices"):
        accuracy(items[:1], [[-1.0, -2.0, -3.0]])


def test_wilson_interval() -> None:
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    low, high = wilson_interval(421, 1000)
    # Far from 0 and 1 the Wilson width is close to the normal approximation's 2 * z * sqrt(p(1-p)/n).
    assert low < 0.421 < high
    assert high - low == pytest.approx(2 * 1.96 * (0.421 * 0.579 / 1000) ** 0.5, rel=0.01)
    with pytest.raises(ValueError, match="successes=11, n=10"):
        wilson_interval(11, 10)


def test_model_card_scores() -> None:
    card = model_card_scores()
    assert card["base"] == {"hellaswag": 42.1, "arc": 43.9, "piqa": 68.4, "commonsense_qa": 33.9,
                            "winogrande": 51.3, "openbookqa": 34.6}
    assert card["instruct"] == {"hellaswag": 40.9, "arc": 37.3, "piqa": 66.3}
    rows = card_scores({"arc_easy": 0.5, "arc_challenge": 0.3, "piqa": 0.684})
    assert rows == pytest.approx({"arc": 40.0, "piqa": 68.4})


def test_item_and_load_task_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gold=2 is out of range for 2 choices"):
        Item(context="q", choices=(" a", " b"), gold=2, id="x")
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        load_task("mmlu", tmp_path)
    with pytest.raises(ValueError, match="limit must be None or an int >= 0, got -1"):
        load_task("piqa", tmp_path, limit=-1)


# --- malformed files -----------------------------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


PIQA_ROW = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})


def _message(excinfo: pytest.ExceptionInfo[ValueError]) -> str:
    return str(excinfo.value)


def test_bad_json_line(tmp_path: Path) -> None:
    data = _write(tmp_path / "piqa" / "valid.jsonl", [PIQA_ROW, '{"goal": "g", "sol1":', PIQA_ROW])
    _write(tmp_path / "piqa" / "valid-labels.lst", ["0", "1", "0"])
    with pytest.raises(ValueError) as excinfo:
        load_task("piqa", tmp_path)
    assert f"{data}, line 2: invalid JSON" in _message(excinfo)


def test_missing_field(tmp_path: Path) -> None:
    row = {"id": "q1", "question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}
    data = _write(tmp_path / "arc_easy" / "ARC-Easy-test.hf.jsonl", [json.dumps(row)])
    with pytest.raises(ValueError) as excinfo:
        load_task("arc_easy", tmp_path)
    assert _message(excinfo) == f"{data}, line 1: missing field 'answerKey'"


def test_label_out_of_range(tmp_path: Path) -> None:
    _write(tmp_path / "piqa" / "valid.jsonl", [PIQA_ROW] * 3)
    labels = _write(tmp_path / "piqa" / "valid-labels.lst", ["0", "1", "2"])
    with pytest.raises(ValueError) as excinfo:
        load_task("piqa", tmp_path)
    assert f"{labels}, line 3: label '2'" in _message(excinfo)

    row = {"id": "c1", "answerKey": "F",
           "question": {"stem": "s", "choices": [{"label": "A", "text": "x"}, {"label": "B", "text": "y"}]}}
    good = json.dumps({**row, "answerKey": "A"})
    data = _write(tmp_path / "commonsense_qa" / "dev_rand_split.jsonl", [good, json.dumps(row)])
    with pytest.raises(ValueError) as excinfo:
        load_task("commonsense_qa", tmp_path)
    assert f"{data}, line 2: answerKey 'F'" in _message(excinfo)

    wino = {"qID": "w1", "sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "3"}
    data = _write(tmp_path / "winogrande" / "dev.jsonl", [json.dumps(wino)])
    _write(tmp_path / "winogrande" / "dev-labels.lst", ["1"])
    with pytest.raises(ValueError) as excinfo:
        load_task("winogrande", tmp_path)
    assert f"{data}, line 1: answer '3'" in _message(excinfo)


def test_labels_file_length_mismatch(tmp_path: Path) -> None:
    data = _write(tmp_path / "piqa" / "valid.jsonl", [PIQA_ROW] * 3)
    labels = _write(tmp_path / "piqa" / "valid-labels.lst", ["0", "1"])
    with pytest.raises(ValueError) as excinfo:
        load_task("piqa", tmp_path)
    assert _message(excinfo) == (
        f"{labels} has 2 lines but {data} has 3: line 3 of the longer file has no partner"
    )


def _write_bz2(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bz2.compress("".join(line + "\n" for line in lines).encode("utf-8")))
    return path


def test_hellaswag_synthetic_and_malformed(tmp_path: Path) -> None:
    path = tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2"
    good = ["Cooking: A man stands in a kitchen. the man", "1",
            "cuts an onion [www.x.org] slowly.", "sings.", "sleeps.", "runs."]
    _write_bz2(path, good)
    (item,) = load_task("hellaswag", tmp_path)
    # lighteval: "... kitchen. " + ctx_b.capitalize() + " "; any "[...]" removed, the double space collapsed.
    choices = (" cuts an onion slowly.", " sings.", " sleeps.", " runs.")
    assert item == Item(context="Cooking: A man stands in a kitchen. The man ", choices=choices, gold=1,
                        id="hellaswag/0")

    _write_bz2(path, good + ["Next: ctx", "7", "a", "b", "c", "d"])
    with pytest.raises(ValueError) as excinfo:
        load_task("hellaswag", tmp_path)
    assert f"{path}, line 8: gold label '7'" in _message(excinfo)

    _write_bz2(path, good + ["Next: ctx", "0", "a"])
    with pytest.raises(ValueError) as excinfo:
        load_task("hellaswag", tmp_path)
    assert f"{path}: ends inside an item: lines 7..9" in _message(excinfo)
