"""MMLU in cloze form as SmolLM2's card scored it: each answer's text after the question, never the letters.

Data: shared/data/eval/mmlu/test.jsonl (57 subjects, 14042 items; see its PROVENANCE.txt). The task is
huggingface/smollm text/evaluation/smollm2/tasks.py "mmlu" (cais/mmlu "all", split test, 0-shot) with its
`mmlu_cloze_prompt`: query "The following are questions about {subject, _ -> space}.\\nQuestion: {question}
\\nAnswer:", choices " {choice}", metric loglikelihood_acc_norm_nospace. So the items are ordinary
multiple-choice `Item`s, scored by scoring.py exactly as the zero-shot tasks are. The card's number is
acc_norm over all items (one lighteval task, not a mean of subjects).
"""

from __future__ import annotations

import math
from pathlib import Path

from .tasks import Item, _field, _item, _read_jsonl, _where

NUM_ITEMS = 14042
NUM_SUBJECTS = 57


def prompt_of(subject: str, question: str) -> str:
    return f"The following are questions about {subject.replace('_', ' ')}.\nQuestion: {question}\nAnswer:"


def per_subject(limit: int | None) -> int | None:
    """Items of each subject under --limit N: the first ceil(N / 57), so that every subject is represented."""
    return None if limit is None else math.ceil(limit / NUM_SUBJECTS)


def load_mmlu(data_dir: Path, limit: int | None = None) -> list[Item]:
    """All test items, or the first per_subject(limit) of each subject; errors name the file and line."""
    path = Path(data_dir) / "mmlu" / "test.jsonl"
    take = per_subject(limit)
    items: list[Item] = []
    seen: dict[str, int] = {}
    for line_no, row in _read_jsonl(path, None):
        where = _where(path, line_no)
        subject = _field(row, "subject", where)
        if take is not None and seen.get(subject, 0) >= take:
            continue
        choices = _field(row, "choices", where, list)
        if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: 'choices' must be 4 strings, got {choices!r}")
        answer = row.get("answer")
        if isinstance(answer, bool) or answer not in (0, 1, 2, 3):
            raise ValueError(f"{where}: 'answer' must be 0..3, got {answer!r}")
        index = seen.get(subject, 0)
        seen[subject] = index + 1
        items.append(_item(where, prompt_of(subject, _field(row, "question", where)),
                           [f" {c}" for c in choices], answer, f"mmlu/{subject}/{index}"))
    return items
