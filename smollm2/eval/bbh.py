"""BIG-Bench Hard 3-shot as SmolLM2's card ran it: 27 tasks, lighteval's prompt and few-shot choice, exact match.

Data: shared/data/eval/bbh/bbh/<task>.json (suzgunmirac/BIG-Bench-Hard, see its PROVENANCE.txt). The task is
huggingface/smollm text/evaluation/smollm2/tasks.py BBH_TASKS ("custom|bbh|3|1") on lighteval ea46419a:
  prompt   bbh_prompt: query "Question: {input}\\nAnswer: " (note the trailing space), target "{target}"
  shots    3 from the task's own examples (its only split is both the evaluation set and the few-shot pool),
           chosen by lighteval's default "balanced" selection (generative.balanced_fewshot, seed 0): the same
           4 picked once per task, minus the item evaluated when it is one of them, first 3 kept.
           Not the paper's chain-of-thought prompts in cot-prompts/ (PROVENANCE.txt).
  generate greedy, no generation size (so up to 2048 tokens in all), stop sequences "Question:", "Question"
  metric   exact_match: prediction and target stripped, then equal. The card's number is taken as the mean
           of the 27 tasks' accuracies (each task is its own lighteval task).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .generative import GenItem, balanced_fewshot

NUM_SHOTS = 3
STOP = ("Question:", "Question")
# The 27 tasks (BBH_TASKS in SmolLM2's tasks.py; the file names in bbh/), with their example counts.
SUBTASKS = {
    "boolean_expressions": 250, "causal_judgement": 187, "date_understanding": 250, "disambiguation_qa": 250,
    "dyck_languages": 250, "formal_fallacies": 250, "geometric_shapes": 250, "hyperbaton": 250,
    "logical_deduction_five_objects": 250, "logical_deduction_seven_objects": 250,
    "logical_deduction_three_objects": 250, "movie_recommendation": 250, "multistep_arithmetic_two": 250,
    "navigate": 250, "object_counting": 250, "penguins_in_a_table": 146, "reasoning_about_colored_objects": 250,
    "ruin_names": 250, "salient_translation_error_detection": 250, "snarks": 178, "sports_understanding": 250,
    "temporal_sequences": 250, "tracking_shuffled_objects_five_objects": 250,
    "tracking_shuffled_objects_seven_objects": 250, "tracking_shuffled_objects_three_objects": 250,
    "web_of_lies": 250, "word_sorting": 250,
}
NUM_ITEMS = sum(SUBTASKS.values())  # 6511


def prompt_of(example: dict[str, str]) -> tuple[str, str]:
    """(query, target) of one BBH example (smollm2 tasks.py bbh_prompt)."""
    return "Question: " + example["input"] + "\nAnswer: ", example["target"]


def _read_subtask(path: Path) -> list[tuple[str, str]]:
    """A task file's examples as (query, target); errors name the file and the line the bad example is on."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{path}, line 1: expected an object with a non-empty 'examples' list")
    out = []
    for index, example in enumerate(examples):
        ok = isinstance(example, dict) and all(isinstance(example.get(k), str) and example[k] for k in
                                                ("input", "target"))
        if not ok:
            # The files are pretty-printed, one field a line: find the line of the index-th example's start.
            line = _line_of_example(text, index)
            raise ValueError(f"{path}, line {line}: example {index} needs non-empty string fields "
                             f"'input' and 'target', got {example!r}")
        out.append(prompt_of(example))
    return out


def _line_of_example(text: str, index: int) -> int:
    """The 1-based line where the index-th element of the "examples" list starts (a best effort)."""
    decoder = json.JSONDecoder()
    start = text.index("[", text.index('"examples"')) + 1
    position = start
    for _ in range(index + 1):
        while text[position] in " \t\r\n,":
            position += 1
        element_start = position
        _, position = decoder.raw_decode(text, position)
    return text.count("\n", 0, element_start) + 1


def per_subtask(limit: int | None) -> int | None:
    """Items of each task under --limit N: the first ceil(N / 27), so that every task is represented."""
    return None if limit is None else math.ceil(limit / len(SUBTASKS))


def load_bbh(data_dir: Path, limit: int | None = None) -> list[GenItem]:
    """Every task's first per_subtask(limit) examples, each with its 3 exemplars; ids "bbh/<task>/<index>"."""
    items = []
    take = per_subtask(limit)
    for name in SUBTASKS:
        pool = _read_subtask(Path(data_dir) / "bbh" / "bbh" / f"{name}.json")
        chosen = balanced_fewshot(pool, NUM_SHOTS)
        for index, (query, target) in enumerate(pool[:take]):
            # lighteval drops the evaluated doc from the 4 picked (a Doc compares by value), then keeps 3.
            shots = tuple(pool[j] for j in chosen if pool[j] != (query, target))[:NUM_SHOTS]
            items.append(GenItem(id=f"bbh/{name}/{index}", query=query, reference=target, fewshot=shots,
                                 stop=STOP, max_new_tokens=None))
    return items


def is_correct(target: str, prediction: str) -> bool:
    """lighteval ExactMatches(strip_strings=True): an empty prediction is wrong, else stripped equality."""
    return bool(prediction) and prediction.strip() == target.strip()


def score_bbh(item: GenItem, response: str) -> dict[str, Any]:
    return {"correct": is_correct(item.reference, response), "subtask": item.id.split("/")[1]}


def subtask_accuracies(scores: list[dict[str, Any]]) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for s in scores:
        hits.setdefault(s["subtask"], []).append(bool(s["correct"]))
    return {name: sum(v) / len(v) for name, v in hits.items()}
