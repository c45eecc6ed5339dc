"""Tests for the card's few-shot and generative tasks' data half: eval/gsm8k.py, bbh.py, mmlu.py, ifeval.py
(loading) and generative.py (prompts, few-shot choice, lengths). No model: the real tokenizer's chat template only.

Each expected prompt is written out by hand from lighteval's code at ea46419a (the commit SmolLM2's evaluation
pins) and huggingface/smollm text/evaluation/smollm2/tasks.py (at d3bb683, where it moved to smollm2/):
  gsm8k  lighteval src/lighteval/tasks/default_prompts.py `gsm8k`: "Question: {question}\\nAnswer:" / " {answer}"
  bbh    smollm2 tasks.py `bbh_prompt`: "Question: " + input + "\\nAnswer: " / target
  mmlu   smollm2 tasks.py `mmlu_cloze_prompt`: "The following are questions about {subject}.\\nQuestion: "
         + question + "\\nAnswer:" / " {choice}"
  ifeval lighteval src/lighteval/tasks/extended/ifeval/main.py `ifeval_prompt`: the prompt as is
  few-shot layout: lighteval src/lighteval/tasks/prompt_manager.py `get_examples` ("\\n\\n"-joined
  query+target blocks; with a chat template, user/assistant turns).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import SHARED_DATA, require
from smollm2.eval import bbh, gsm8k, ifeval, mmlu
from smollm2.eval.generative import GenItem, balanced_fewshot, generation_length, render_prompt
from smollm2.eval.tasks import Item
from smollm2.tokenizer import Tokenizer

EVAL_DATA = SHARED_DATA / "eval"
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

# Raw text of the first lines of the data files (gsm8k/train.jsonl line 1, test.jsonl line 1).
NATALIA_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?")
NATALIA_A = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
             "in April and May.\n#### 72")
JANET_Q = ("Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
           "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
           "duck egg. How much in dollars does she make every day at the farmers' market?")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(require(SHARED_DATA / "smollm2-135m-instruct"))


# --- prompts, string for string ------------------------------------------------------------------------


def test_gsm8k_prompt_first_item(tokenizer: Tokenizer) -> None:
    data = require(EVAL_DATA)
    (item,) = gsm8k.load_gsm8k(data, limit=1, exemplars="first")
    assert item.query == f"Question: {JANET_Q}\nAnswer:"
    assert item.reference.endswith("\n#### 18") and item.reference.startswith(" Janet sells 16 - 3 - 4")
    assert item.fewshot[0] == (f"Question: {NATALIA_Q}\nAnswer:", f" {NATALIA_A}")
    assert (item.stop, item.max_new_tokens) == (("Question:", "Question"), 256)
    plain = render_prompt(item, tokenizer, chat_template=False)
    assert plain.startswith(f"Question: {NATALIA_Q}\nAnswer: {NATALIA_A}\n\nQuestion: ")
    assert plain.endswith(f"#### 624\n\nQuestion: {JANET_Q}\nAnswer:")  # train item 4 (line 5) ends "#### 624"
    assert plain.count("\n\nQuestion: ") == 5
    chat = render_prompt(item, tokenizer, chat_template=True)
    assert chat.startswith(f"{SYSTEM}<|im_start|>user\nQuestion: {NATALIA_Q}\nAnswer:<|im_end|>\n"
                           f"<|im_start|>assistant\n {NATALIA_A}<|im_end|>\n<|im_start|>user\n")
    assert chat.endswith(f"<|im_start|>user\nQuestion: {JANET_Q}\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert chat.count("<|im_start|>assistant\n") == 6


def test_bbh_prompt_first_item(tokenizer: Tokenizer) -> None:
    (item, *_) = bbh.load_bbh(require(EVAL_DATA), limit=1)  # limit 1: one item of each of the 27 tasks
    assert item.id == "bbh/boolean_expressions/0"
    assert (item.query, item.reference) == ("Question: not ( True ) and ( True ) is\nAnswer: ", "False")
    # lighteval's balanced draw from the task's own 250 examples (seed 0), the same 3 for every item here.
    expected_plain = ("Question: not ( not not False ) and True is\nAnswer: True\n\n"
                      "Question: False and False or not True and True is\nAnswer: False\n\n"
                      "Question: True and True or False and not True is\nAnswer: True\n\n"
                      "Question: not ( True ) and ( True ) is\nAnswer: ")
    assert render_prompt(item, tokenizer, chat_template=False) == expected_plain
    expected_chat = (SYSTEM
                     + "<|im_start|>user\nQuestion: not ( not not False ) and True is\nAnswer: <|im_end|>\n"
                       "<|im_start|>assistant\nTrue<|im_end|>\n"
                       "<|im_start|>user\nQuestion: False and False or not True and True is\nAnswer: <|im_end|>\n"
                       "<|im_start|>assistant\nFalse<|im_end|>\n"
                       "<|im_start|>user\nQuestion: True and True or False and not True is\nAnswer: <|im_end|>\n"
                       "<|im_start|>assistant\nTrue<|im_end|>\n"
                       "<|im_start|>user\nQuestion: not ( True ) and ( True ) is\nAnswer: <|im_end|>\n"
                       "<|im_start|>assistant\n")
    assert render_prompt(item, tokenizer, chat_template=True) == expected_chat
    assert (item.stop, item.max_new_tokens) == (("Question:", "Question"), None)


def test_mmlu_cloze_first_item() -> None:
    items = mmlu.load_mmlu(require(EVAL_DATA))
    assert len(items) == 14042
    assert items[0] == Item(
        context="The following are questions about abstract algebra.\nQuestion: Find the degree for the given field "
                "extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nAnswer:",
        choices=(" 0", " 4", " 2", " 6"), gold=1, id="mmlu/abstract_algebra/0")
    # --limit spreads over the 57 subjects: ceil(100 / 57) = 2 of each.
    limited = mmlu.load_mmlu(EVAL_DATA, limit=100)
    assert len(limited) == 114 and len({i.id.split("/")[1] for i in limited}) == 57
    assert limited[:2] == items[:2]


def test_ifeval_first_item(tokenizer: Tokenizer) -> None:
    items = ifeval.load_ifeval(require(EVAL_DATA))
    assert len(items) == 541
    first = items[0]
    assert first.query.startswith("Write a 300+ word summary of the wikipedia page \"https://en.wikipedia.org/wiki/"
                                  "Raymond_III,_Count_of_Tripoli\". Do not use any commas")
    assert first.reference["instruction_id_list"] == ["punctuation:no_comma",
                                                      "detectable_format:number_highlighted_sections",
                                                      "length_constraints:number_words"]
    assert first.reference["kwargs"][2] == {"relation": "at least", "num_words": 300}
    assert (first.fewshot, first.stop, first.max_new_tokens) == ((), (), 1280)
    assert render_prompt(first, tokenizer, True) == (f"{SYSTEM}<|im_start|>user\n{first.query}<|im_end|>\n"
                                                     "<|im_start|>assistant\n")


# --- few-shot choice and lengths ------------------------------------------------------------------------


def test_gsm8k_lighteval_draw() -> None:
    shots = gsm8k.lighteval_exemplars(1319, 7473)
    # Replayed here step by step as lighteval_task.py create_requests_from_tasks does it.
    rng = random.Random()
    rng.seed(42)
    order = list(range(1319))
    rng.shuffle(order)
    first_visited = order[0]
    assert shots[first_visited] == rng.sample(range(7473), 5)
    assert shots[0] == [1946, 403, 6109, 3892, 2200]  # test item 0's exemplars (a regression guard)
    assert all(len(set(s)) == 5 for s in shots) and len({tuple(s) for s in shots}) > 1300
    # The draw does not depend on --limit.
    items = gsm8k.load_gsm8k(require(EVAL_DATA), limit=2)
    train = [json.loads(line) for line in (EVAL_DATA / "gsm8k" / "train.jsonl").open()]
    assert items[1].fewshot[0] == (f"Question: {train[shots[1][0]]['question']}\nAnswer:",
                                   f" {train[shots[1][0]]['answer']}")


def test_balanced_fewshot_follows_lighteval() -> None:
    # Pool: 5 "A", 3 "B", 3 "C", 1 "D". Groups by size: A (5), then B and C (3 each, shuffled), then D.
    pool = [(f"q{i}", t) for i, t in enumerate("AAAAABBBCCD")]
    chosen = balanced_fewshot(pool, k=3, seed=0)
    assert len(chosen) == 4 and len(set(chosen)) == 4  # k + 1, one spare for the evaluated item
    targets = [pool[i][1] for i in chosen]
    assert targets[0] == "A" and sorted(targets[1:3]) == ["B", "C"] and targets[3] == "D"
    # The same numbers as Python's global random seeded with 0, which is what lighteval uses.
    rng = random.Random(0)
    labels_3 = ["B", "C"]
    rng.shuffle([])  # (a one-label group draws nothing: shuffle of one element uses no random numbers)
    rng.shuffle(labels_3)
    assert targets[1:3] == labels_3
    assert balanced_fewshot(pool, k=3, seed=0) == chosen and balanced_fewshot(pool, k=20) != []


def test_bbh_drops_the_evaluated_example() -> None:
    items = bbh.load_bbh(require(EVAL_DATA))
    assert len(items) == 6511 and {len(i.fewshot) for i in items} == {3}
    by_task: dict[str, list[GenItem]] = {}
    for item in items:
        by_task.setdefault(item.id.split("/")[1], []).append(item)
    assert {name: len(v) for name, v in by_task.items()} == bbh.SUBTASKS
    for task_items in by_task.values():
        for item in task_items:
            assert (item.query, item.reference) not in item.fewshot
        # Exactly those items among the 4 picked get the spare: at most 4 distinct exemplar sets.
        assert 1 <= len({i.fewshot for i in task_items}) <= 5


def test_generation_length_is_lightevals() -> None:
    item = GenItem("x", "q", None, max_new_tokens=256)
    assert generation_length(item, 1000) == 256
    assert generation_length(item, 1900) == 148  # capped by max_length 2048
    assert generation_length(item, 2100) == 1  # lighteval still asks for one token
    assert generation_length(GenItem("y", "q", None), 500) == 1548  # no size: the rest of the 2048


# --- malformed files: errors name the file and line ------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_gsm8k(tmp_path: Path) -> None:
    good = json.dumps({"question": "q", "answer": "a\n#### 1"})
    test = _write(tmp_path / "gsm8k" / "test.jsonl", f"{good}\n{{not json\n")
    _write(tmp_path / "gsm8k" / "train.jsonl", "\n".join([good] * 5) + "\n")
    with pytest.raises(ValueError, match=rf"{test}, line 2: invalid JSON"):
        gsm8k.load_gsm8k(tmp_path, exemplars="first")
    _write(test, f'{good}\n{good}\n{json.dumps({"question": "q", "answer": "no final line"})}\n')
    with pytest.raises(ValueError, match=rf"{test}, line 3: the answer has no final"):
        gsm8k.load_gsm8k(tmp_path, exemplars="first")
    _write(test, f'{json.dumps({"question": "q"})}\n')
    with pytest.raises(ValueError, match=rf"{test}, line 1: missing field 'answer'"):
        gsm8k.load_gsm8k(tmp_path, exemplars="first")


def test_malformed_ifeval_and_mmlu(tmp_path: Path) -> None:
    row = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = _write(tmp_path / "ifeval" / "input_data.jsonl",
                  json.dumps(row) + "\n" + json.dumps({**row, "kwargs": []}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: 'kwargs' must be one object per instruction"):
        ifeval.load_ifeval(tmp_path)
    good = {"subject": "anatomy", "question": "q", "choices": ["a", "b", "c", "d"], "answer": 2}
    path = _write(tmp_path / "mmlu" / "test.jsonl",
                  json.dumps(good) + "\n" + json.dumps({**good, "answer": 4}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: 'answer' must be 0..3, got 4"):
        mmlu.load_mmlu(tmp_path)


def test_malformed_bbh(tmp_path: Path) -> None:
    folder = tmp_path / "bbh" / "bbh"
    for name in bbh.SUBTASKS:
        _write(folder / f"{name}.json", json.dumps({"examples": [{"input": "i", "target": "t"}] * 4}, indent=1))
    bad = folder / "navigate.json"
    _write(bad, '{\n "examples": [\n  {"input": "a", "target": "b"},\n  {"input": "c"}\n ]\n}\n')
    with pytest.raises(ValueError, match=rf"{bad}, line 4: example 1 needs non-empty string fields"):
        bbh.load_bbh(tmp_path)
    _write(bad, '{\n "examples": [\n  {"input": "a", "target": "b"},\n  {"input": "c" "target": "d"}\n ]\n}\n')
    with pytest.raises(ValueError, match=rf"{bad}, line 4: invalid JSON"):
        bbh.load_bbh(tmp_path)
