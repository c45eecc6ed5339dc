"""GSM8K 5-shot as SmolLM2's card ran it: lighteval's prompt, few-shot draw and answer rule.

Data: shared/data/eval/gsm8k/{test,train}.jsonl (openai/grade-school-math, see its PROVENANCE.txt). The task is
huggingface/smollm text/evaluation/smollm2/tasks.py "gsm8k" ("custom|gsm8k|5|1") on lighteval ea46419a:
  prompt   default_prompts.gsm8k: query "Question: {question}\\nAnswer:", target " {answer}" (the worked
           solution, calculator annotations and the final "#### N" line included)
  shots    5, few_shots_select "random_sampling_from_train": lighteval shuffles the test items with
           random.Random(42) and then, item after item in that order, draws 5 train items with the same
           generator's sample() (prompt_manager.py). `lighteval_exemplars` replays that draw, so item i gets
           the exemplars lighteval gave it whatever --limit is; exemplars="first" uses train items 0-4 instead.
  generate greedy, generation_size 256, stop sequences "Question:" and "Question"
  metric   quasi_exact_match_gsm8k: prediction and gold are stripped, then both go through lighteval's
           gsm8k_normalizer (openai's grade-school-math ANS_RE): the first "#### <number>" match,
           r"#### (\\-?[0-9\\.\\,]+)", commas removed, else "[invalid]"; a hit is equality of the two strings.
So a reply scores only if it writes "#### N" as the exemplars do: "The answer is 42." is "[invalid]", and
"#### 42.0" is "42.0", not "42". This is lighteval's rule, kept as is, not a fairer one.
(lighteval also drops exemplars when prompt + 256 exceeds 2048 tokens; 5 GSM8K exemplars never come close.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .generative import GenItem, lighteval_order
from .tasks import _count_lines, _field, _read_jsonl, _where

NUM_SHOTS = 5
GENERATION_SIZE = 256
STOP = ("Question:", "Question")
NUM_ITEMS = 1319
_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
INVALID = "[invalid]"


def extract_answer(text: str) -> str:
    """lighteval's gsm8k_normalizer: the number after the first "#### ", commas removed, else "[invalid]"."""
    match = _ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else INVALID


def is_correct(gold: str, prediction: str) -> bool:
    """lighteval ExactMatches(strip_strings=True, normalize both with gsm8k_normalizer).compute_one_item."""
    if not prediction:
        return False
    return extract_answer(gold.strip()) == extract_answer(prediction.strip())


def prompt_of(row: dict[str, str]) -> tuple[str, str]:
    """(query, target) of one GSM8K row (lighteval default_prompts.gsm8k)."""
    return f"Question: {row['question']}\nAnswer:", f" {row['answer']}"


def _read(path: Path, limit: int | None) -> list[tuple[str, str]]:
    rows = []
    for line_no, row in _read_jsonl(path, limit):
        where = _where(path, line_no)
        question, answer = _field(row, "question", where), _field(row, "answer", where)
        if extract_answer(answer) == INVALID:
            raise ValueError(f"{where}: the answer has no final '#### <number>' line")
        rows.append(prompt_of({"question": question, "answer": answer}))
    return rows


def lighteval_exemplars(n_test: int, n_train: int, k: int = NUM_SHOTS) -> list[list[int]]:
    """Per test item (file order), the train indices lighteval's random_sampling_from_train gave it."""
    order, rng = lighteval_order(n_test)
    exemplars: list[list[int]] = [[] for _ in range(n_test)]
    for test_index in order:
        exemplars[test_index] = rng.sample(range(n_train), k)
    return exemplars


def load_gsm8k(data_dir: Path, limit: int | None = None, exemplars: str = "lighteval") -> list[GenItem]:
    """The first `limit` test items, each with its 5 exemplars ("lighteval" draw or the "first" 5)."""
    folder = Path(data_dir) / "gsm8k"
    test = _read(folder / "test.jsonl", limit)
    train = _read(folder / "train.jsonl", None)
    if len(train) < NUM_SHOTS:
        raise ValueError(f"{folder / 'train.jsonl'}: {len(train)} items, fewer than {NUM_SHOTS} exemplars")
    if exemplars == "lighteval":
        # The draw depends on the whole test set's size, not on how many items are evaluated.
        shots = lighteval_exemplars(_count_lines(folder / "test.jsonl"), len(train))
    elif exemplars == "first":
        shots = [list(range(NUM_SHOTS))] * len(test)
    else:
        raise ValueError(f"exemplars must be 'lighteval' or 'first', got {exemplars!r}")
    return [GenItem(id=f"gsm8k/{i}", query=query, reference=gold, fewshot=tuple(train[j] for j in shots[i]),
                    stop=STOP, max_new_tokens=GENERATION_SIZE)
            for i, (query, gold) in enumerate(test)]


def score_gsm8k(item: GenItem, response: str) -> dict[str, Any]:
    return {"correct": is_correct(item.reference, response), "answer": extract_answer(response.strip())}
