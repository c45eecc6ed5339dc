"""Zero-shot multiple-choice benchmarks as SmolLM2's model card scored them: the data half of the evaluator.

The model card says "all evaluations are zero-shot ... and we use lighteval to run them". The recipe is
huggingface/smollm text/evaluation/smollm2/tasks.py on lighteval ea46419a: every task here is a list of
(query, choices, gold) documents, each choice is scored by the summed log-probability of its tokens after
the query, and the metric is `loglikelihood_acc_norm_nospace` (argmax of sum / characters of the choice).

This file turns the raw files in shared/data/eval (see its README.txt and each PROVENANCE.txt) into `Item`s
whose `context` and `choices` are lighteval's `Doc.query` and `Doc.choices` (exactly, except HellaSwag,
whose preprocessed file hides where ctx_b starts: see `_hellaswag_capitalize_ctx_b`), and holds the pure
pieces of scoring that need no model: lighteval's context/continuation tokenisation split
(`tok_encode_pair`), the acc / acc_norm arithmetic and a confidence interval. Running the model is the
evaluator's job. Standard library only, so it imports anywhere.

Prompt formats (the lighteval prompt function used by SmolLM2's tasks.py in brackets):
  piqa            "Question: {goal}\\nAnswer:"      -> " {sol1}", " {sol2}"          (prompt.piqa_harness)
  arc_easy/_chal. "Question: {question}\\nAnswer:"  -> " {text}" per choice          (prompt.arc)
  hellaswag       "{label}: {ctx_a} {Ctx_b} "      -> " {ending}" per ending        (smollm2 tasks.py)
  winogrande      sentence up to "_" (ends in " ") -> "{option} {rest of sentence}" (prompt.winogrande)
  openbookqa      "{question_stem}"                -> " {text}" per choice          (prompt.openbookqa)
  commonsense_qa  "{question stem}"                -> " {text}" per choice          (commonsense_qa_prompt)
"""

from __future__ import annotations

import bz2
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

log = logging.getLogger(__name__)

# z for a two-sided 95% interval, norm.ppf(0.975).
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: score `context + choices[i]` for each i; `gold` is the right index.

    `context` is the query before any chat template. Every task here shares one context across its
    choices; Winogrande too, because lighteval's prompt.winogrande scores "option + rest of sentence"
    after the common prefix (not lm-eval's per-choice-context partial scoring).
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    id: str

    def __post_init__(self) -> None:
        # Accept a list for convenience but store a tuple so the item stays hashable and immutable.
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 2:
            raise ValueError(f"item {self.id!r} needs at least 2 choices, got {len(self.choices)}")
        if not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError(f"item {self.id!r} has an empty or non-string choice: {self.choices!r}")
        if isinstance(self.gold, bool) or not isinstance(self.gold, int):
            raise ValueError(f"item {self.id!r}: gold must be an int, got {self.gold!r}")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(
                f"item {self.id!r}: gold={self.gold} is out of range for {len(self.choices)} choices"
            )


@dataclass(frozen=True)
class TaskSpec:
    name: str
    split: str  # the split lighteval scored for the model card
    files: tuple[str, ...]  # relative to the eval data dir; the first holds the items
    num_items: int  # item count of that split (README.txt), checked with a warning only
    load: Callable[[Path, int | None], list[Item]]


# --- low-level readers: every error names the file and the 1-based line -------------------------------


def _where(path: Path, line_no: int) -> str:
    return f"{path}, line {line_no}"


def _read_jsonl(path: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for the first `limit` lines; one JSON object per line, no blank lines."""
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and line_no > limit:
                return
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                where = _where(path, line_no)
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{_where(path, line_no)}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for _ in f)


def _field(obj: Any, dotted: str, where: str, kind: type = str) -> Any:
    """obj["a"]["b"] for dotted="a.b", checked to be `kind` (and non-empty when it is a str or list)."""
    value = obj
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"{where}: missing field {dotted!r}")
        value = value[key]
    if not isinstance(value, kind) or (kind in (str, list) and not value):
        raise ValueError(f"{where}: field {dotted!r} must be a non-empty {kind.__name__}, got {value!r}")
    return value


def _read_labels(labels_path: Path, data_path: Path, allowed: Sequence[str]) -> list[str]:
    """The gold-label file beside a .jsonl: one label per line, as many lines as the data file."""
    labels = labels_path.read_text(encoding="utf-8").splitlines()
    for line_no, label in enumerate(labels, start=1):
        if label not in allowed:
            raise ValueError(f"{_where(labels_path, line_no)}: label {label!r} is not one of {list(allowed)}")
    n_data = _count_lines(data_path)
    if len(labels) != n_data:
        # Name the first line that has no partner so the truncated file is easy to find.
        raise ValueError(
            f"{labels_path} has {len(labels)} lines but {data_path} has {n_data}: "
            f"line {min(len(labels), n_data) + 1} of the longer file has no partner"
        )
    return labels


def _item(where: str, context: str, choices: list[str], gold: int, item_id: str) -> Item:
    try:
        return Item(context=context, choices=tuple(choices), gold=gold, id=item_id)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _gold_from_key(labels: list[Any], key: Any, where: str) -> int:
    # lighteval: gold = choices.label.index(answerKey); ARC mixes "A".."E" and "1".."4" label sets.
    if key not in labels:
        raise ValueError(f"{where}: answerKey {key!r} is not one of the choice labels {labels!r}")
    return labels.index(key)


# --- per-task loaders ---------------------------------------------------------------------------------


def _load_piqa(data_dir: Path, limit: int | None) -> list[Item]:
    path = data_dir / "piqa" / "valid.jsonl"
    labels = _read_labels(data_dir / "piqa" / "valid-labels.lst", path, ("0", "1"))
    items = []
    for line_no, row in _read_jsonl(path, limit):
        where = _where(path, line_no)
        goal, sol1, sol2 = (_field(row, k, where) for k in ("goal", "sol1", "sol2"))
        # PIQA has no ids in this file; the 0-based row index identifies the item.
        items.append(_item(where, f"Question: {goal}\nAnswer:", [f" {sol1}", f" {sol2}"],
                           int(labels[line_no - 1]), f"piqa/{line_no - 1}"))
    return items


def _arc_loader(folder: str, filename: str) -> Callable[[Path, int | None], list[Item]]:
    def load(data_dir: Path, limit: int | None) -> list[Item]:
        # The Hugging Face layout (choices as parallel lists) is what lighteval reads.
        path = data_dir / folder / filename
        items = []
        for line_no, row in _read_jsonl(path, limit):
            where = _where(path, line_no)
            texts = _field(row, "choices.text", where, list)
            labels = _field(row, "choices.label", where, list)
            if len(texts) != len(labels):
                raise ValueError(f"{where}: {len(texts)} choice texts but {len(labels)} choice labels")
            gold = _gold_from_key(labels, _field(row, "answerKey", where), where)
            question = _field(row, "question", where)
            items.append(_item(where, f"Question: {question}\nAnswer:", [f" {t}" for t in texts], gold,
                               _field(row, "id", where)))
        return items

    return load


def _hellaswag_preprocess(text: str) -> str:
    # lighteval/tasks.py preprocess ("comes from AiHarness"). The file was already run through a similar
    # cleanup that removed only the four WikiHow tag names; this also drops any other "[...]", as lighteval
    # does (2 contexts and 16 endings in the val file still hold brackets).
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_capitalize_ctx_b(context: str) -> str:
    """Approximate lighteval's `ctx_b.capitalize()`; this file no longer marks where ctx_b starts.

    ActivityNet items end with ctx_b, a sentence fragment such as "... on a roof. he". A lower-case
    fragment after the last ". " can only be ctx_b (ctx_a's sentences are capitalised), so capitalise it.
    An upper-case fragment is left alone: capitalize() would lower-case the rest of it, but no lower-case
    fragment in the val file has an upper-case letter later, so the two rules agree on every item here.
    """
    cut = context.rfind(". ") + 2
    if cut >= 2 and context[cut:cut + 1].islower():
        return context[:cut] + context[cut:].capitalize()
    return context


def _load_hellaswag(data_dir: Path, limit: int | None) -> list[Item]:
    # Layout (klosax/hellaswag_text_data): 6 lines per item: "label: ctx", gold 0..3, then 4 endings.
    path = data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2"
    items: list[Item] = []
    if limit == 0:
        return items
    block: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            block.append(line.rstrip("\n"))
            if len(block) < 6:
                continue
            start = line_no - 5
            context, label, endings = block[0], block[1], block[2:]
            if label not in ("0", "1", "2", "3"):
                raise ValueError(f"{_where(path, start + 1)}: gold label {label!r} is not 0..3")
            for offset, text in enumerate([context, *endings]):
                if not text:
                    line_of_text = start + (0 if offset == 0 else offset + 1)
                    what = "context" if offset == 0 else "ending"
                    raise ValueError(f"{_where(path, line_of_text)}: empty {what}")
            # lighteval's query is preprocess(f"{activity_label}: {ctx_a} {ctx_b.capitalize()} "): it ends
            # in a space, which tok_encode_pair later moves onto every continuation ("  ending", two spaces).
            query = _hellaswag_preprocess(_hellaswag_capitalize_ctx_b(context) + " ")
            choices = [" " + _hellaswag_preprocess(e) for e in endings]
            items.append(_item(_where(path, start), query, choices, int(label), f"hellaswag/{len(items)}"))
            block = []
            if limit is not None and len(items) >= limit:
                return items
    if block:
        first = line_no - len(block) + 1
        raise ValueError(f"{path}: ends inside an item: lines {first}..{line_no} are not 6 lines")
    return items


def _load_winogrande(data_dir: Path, limit: int | None) -> list[Item]:
    path = data_dir / "winogrande" / "dev.jsonl"
    labels = _read_labels(data_dir / "winogrande" / "dev-labels.lst", path, ("1", "2"))
    items = []
    for line_no, row in _read_jsonl(path, limit):
        where = _where(path, line_no)
        sentence = _field(row, "sentence", where)
        options = [_field(row, "option1", where), _field(row, "option2", where)]
        answer = _field(row, "answer", where)
        if answer not in ("1", "2"):
            raise ValueError(f"{where}: answer {answer!r} is not '1' or '2'")
        if answer != labels[line_no - 1]:
            raise ValueError(
                f"{where}: answer {answer!r} disagrees with dev-labels.lst ({labels[line_no - 1]!r})"
            )
        if sentence.count("_") != 1:
            # lighteval's `query, rest = sentence.split("_")` would crash; say which item instead.
            raise ValueError(f"{where}: sentence must contain exactly one '_', got {sentence!r}")
        # The query keeps its trailing space; the choice has none, so acc_norm divides by all of len(choice).
        query, rest = sentence.split("_")
        choices = [f"{option} {rest.strip()}" for option in options]
        items.append(_item(where, query, choices, int(answer) - 1, _field(row, "qID", where)))
    return items


def _stem_loader(folder: str, filename: str) -> Callable[[Path, int | None], list[Item]]:
    """OpenBookQA and CommonsenseQA (AI2 layout): the bare stem as query, " {text}" choices."""

    def load(data_dir: Path, limit: int | None) -> list[Item]:
        path = data_dir / folder / filename
        items = []
        for line_no, row in _read_jsonl(path, limit):
            where = _where(path, line_no)
            raw_choices = _field(row, "question.choices", where, list)
            texts = [_field(c, "text", where) for c in raw_choices]
            labels = [_field(c, "label", where) for c in raw_choices]
            gold = _gold_from_key(labels, _field(row, "answerKey", where).strip(), where)
            items.append(_item(where, _field(row, "question.stem", where), [f" {t}" for t in texts], gold,
                               _field(row, "id", where)))
        return items

    return load


TASKS: Mapping[str, TaskSpec] = MappingProxyType({
    spec.name: spec
    for spec in (
        TaskSpec("piqa", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), 1838, _load_piqa),
        TaskSpec("arc_easy", "test", ("arc_easy/ARC-Easy-test.hf.jsonl",), 2376,
                 _arc_loader("arc_easy", "ARC-Easy-test.hf.jsonl")),
        TaskSpec("arc_challenge", "test", ("arc_challenge/ARC-Challenge-test.hf.jsonl",), 1172,
                 _arc_loader("arc_challenge", "ARC-Challenge-test.hf.jsonl")),
        TaskSpec("hellaswag", "validation", ("hellaswag/hellaswag_val_full.txt.bz2",), 10042,
                 _load_hellaswag),
        TaskSpec("winogrande", "validation", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), 1267,
                 _load_winogrande),
        # lighteval's default split at the pinned commit is validation; SmolLM2's task sets none (PROVENANCE).
        TaskSpec("openbookqa", "validation", ("openbookqa/dev.jsonl",), 500,
                 _stem_loader("openbookqa", "dev.jsonl")),
        TaskSpec("commonsense_qa", "validation", ("commonsense_qa/dev_rand_split.jsonl",), 1221,
                 _stem_loader("commonsense_qa", "dev_rand_split.jsonl")),
    )
})


def load_task(name: str, data_dir: Path, limit: int | None = None) -> list[Item]:
    """The first `limit` items (all when None) of task `name`, read from the eval data dir."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    spec = TASKS[name]
    items = spec.load(Path(data_dir), limit)
    if limit is None and len(items) != spec.num_items:
        log.warning("%s: loaded %d items from %s, the README lists %d",
                    name, len(items), data_dir, spec.num_items)
    return items


def default_data_dir() -> Path | None:
    """../shared/data/eval beside the working directory, else beside this package's checkout, else None."""
    repo_root = Path(__file__).resolve().parents[1]
    for base in (Path.cwd(), repo_root):
        candidate = base.parent / "shared" / "data" / "eval"
        if candidate.is_dir():
            return candidate
    return None


def model_card_scores() -> dict[str, dict[str, float]]:
    """Published SmolLM2-135M numbers (x100, lighteval, zero-shot) for the tasks this file loads.

    Keys are card rows: "arc" is the mean of arc_easy and arc_challenge (see `card_scores`).
    """
    return {
        "base": {"hellaswag": 42.1, "arc": 43.9, "piqa": 68.4, "commonsense_qa": 33.9, "winogrande": 51.3,
                 "openbookqa": 34.6},
        # Instruct runs put the query through the chat template (README.txt); only these rows are ours.
        "instruct": {"hellaswag": 40.9, "arc": 37.3, "piqa": 66.3},
    }


# Card row -> the task(s) whose acc_norm it averages.
CARD_ROWS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "hellaswag": ("hellaswag",), "arc": ("arc_easy", "arc_challenge"), "piqa": ("piqa",),
    "commonsense_qa": ("commonsense_qa",), "winogrande": ("winogrande",), "openbookqa": ("openbookqa",),
})


def card_scores(acc_norm: Mapping[str, float]) -> dict[str, float]:
    """Per-task acc_norm (fractions in [0, 1]) -> card rows (x100), for the rows whose tasks are all given."""
    return {row: 100.0 * sum(acc_norm[t] for t in tasks) / len(tasks)
            for row, tasks in CARD_ROWS.items() if all(t in acc_norm for t in tasks)}


# --- tokenisation split and scoring -------------------------------------------------------------------


def continuation_length(choice: str) -> int:
    """lighteval acc_norm_nospace's normaliser: characters of the choice, minus a leading space."""
    return len(choice) - 1 if choice.startswith(" ") else len(choice)


def split_context_continuation(
    context: str, continuation: str, encode: Callable[[str], list[int]]
) -> tuple[list[int], list[int]]:
    """lighteval's tok_encode_pair: the token ids of the context and of the scored continuation.

    Trailing whitespace of the context (str.rstrip: spaces and newlines alike, so a chat template's final
    "\\n" moves too) is moved to the front of the continuation, because BPE vocabularies glue a space to
    the word after it. The continuation tokens are what encoding the whole string adds beyond the
    context's own encoding. When that is nothing (the continuation merged into the context's last token),
    the last token of the whole encoding is scored and the context loses it, as lighteval does.
    `encode` must not add BOS/EOS (SmolLM2's base tokenizer adds none).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = list(encode(context + continuation))
    ctx = list(encode(context))
    if not whole:
        raise ValueError(
            f"nothing to score: context {context!r} + continuation {continuation!r} encodes to no tokens"
        )
    if len(whole) <= len(ctx):
        # lighteval handles len(ctx) == len(whole); a shorter whole is treated alike so something is scored.
        return whole[:-1], whole[-1:]
    return ctx, whole[len(ctx):]


def _argmax(values: Sequence[float]) -> int:
    # First index on ties, like numpy.argmax in lighteval.
    return max(range(len(values)), key=lambda i: values[i])


def predict(logprob_sums: Sequence[float], choices: Sequence[str], normalize: bool) -> int:
    """The chosen index: argmax of the summed log-probs, each divided by continuation_length if normalize."""
    if len(logprob_sums) != len(choices) or not choices:
        raise ValueError(f"got {len(logprob_sums)} log-prob sums for {len(choices)} choices")
    if not normalize:
        return _argmax(logprob_sums)
    lengths = [continuation_length(c) for c in choices]
    if 0 in lengths:
        raise ValueError(f"acc_norm cannot normalise a choice of length 0: {list(choices)!r}")
    return _argmax([s / n for s, n in zip(logprob_sums, lengths, strict=False)])


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion, 95% by default. Unlike the normal approximation (lighteval's
    stderr) it stays inside [0, 1] and is not degenerate at 0 or n successes."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The bounds are exactly 0 and 1 at p = 0 and p = 1; say so rather than return 0.9999999999999999.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Accuracy:
    n: int
    acc: float  # argmax of the raw log-prob sum
    acc_norm: float  # argmax of sum / continuation_length: the number the model card reports
    acc_ci: tuple[float, float]  # 95% Wilson interval
    acc_norm_ci: tuple[float, float]


def accuracy(items: Sequence[Item], logprob_sums: Sequence[Sequence[float]]) -> Accuracy:
    """acc and acc_norm over items, given each item's per-choice summed continuation log-probs."""
    if len(items) != len(logprob_sums):
        raise ValueError(f"got log-prob sums for {len(logprob_sums)} items but {len(items)} items")
    if not items:
        raise ValueError("cannot score an empty list of items")
    hits = hits_norm = 0
    for item, sums in zip(items, logprob_sums, strict=False):
        if len(sums) != len(item.choices):
            raise ValueError(f"item {item.id!r}: {len(sums)} log-prob sums for {len(item.choices)} choices")
        hits += predict(sums, item.choices, normalize=False) == item.gold
        hits_norm += predict(sums, item.choices, normalize=True) == item.gold
    n = len(items)
    return Accuracy(n, hits / n, hits_norm / n, wilson_interval(hits, n), wilson_interval(hits_norm, n))
