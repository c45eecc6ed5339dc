"""The generative tasks' shared half: few-shot prompts as lighteval builds them, and greedy generation.

IFEval (ifeval.py), GSM8K (gsm8k.py) and BBH (bbh.py) each turn their data into `GenItem`s: a query, the
few-shot exemplars put before it, the stop strings and the generation length. This file renders an item's
prompt and generates every item's reply through the continuous-batching engine (inference/engine.py), greedy,
one request per item, so rows that stop early free their slot for the next item.

Prompts follow lighteval ea46419a (the commit SmolLM2's evaluation pins), src/lighteval/tasks/prompt_manager.py
`PromptManager.get_examples`: without a chat template the exemplars are "query + target" blocks joined by
"\\n\\n" before the query; with one, each exemplar is a user turn (its query) and an assistant turn (its
target), then the query as the last user turn, rendered with add_generation_prompt. The length rule is
lighteval's models/base_model.py `greedy_until`: at most the task's generation size, and never past
MAX_LENGTH tokens of context + reply (the card's runs set max_model_length=2048); a task without a
generation size (BBH) may run to MAX_LENGTH. Generation stops at a stop string (the text is cut before it,
as lighteval's `decoded.split(term)[0]` does) or at the tokenizer's end-of-sequence token, which lighteval
adds to every task's stop sequences.
"""

from __future__ import annotations

import queue
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import SmolLM2
    from ..tokenizer import Tokenizer

# The card's lighteval runs: --model_args "...,max_model_length=2048" (shared/data/eval/README.txt).
MAX_LENGTH = 2048


@dataclass(frozen=True)
class GenItem:
    """One generation request of a task: the query after `fewshot` (query, target) exemplars.

    `reference` is what the task's scorer needs (the gold answer, or IFEval's instructions).
    `max_new_tokens` None means lighteval's "no generation size": up to MAX_LENGTH in all.
    """

    id: str
    query: str
    reference: Any
    fewshot: tuple[tuple[str, str], ...] = ()
    stop: tuple[str, ...] = ()
    max_new_tokens: int | None = None


@dataclass
class Generation:
    item: GenItem
    prompt_tokens: int
    text: str = ""
    finish_reason: str | None = None
    score: dict[str, Any] = field(default_factory=dict)


def render_prompt(item: GenItem, tokenizer: Tokenizer, chat_template: bool) -> str:
    """The text generation starts after (lighteval get_examples, with an empty task instruction)."""
    if not chat_template:
        return "\n\n".join([*(query + target for query, target in item.fewshot), item.query])
    if not tokenizer.chat_template:
        raise ValueError("this tokenizer has no chat template: generate without one (--no-chat-template)")
    messages = []
    for query, target in item.fewshot:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": target}]
    messages.append({"role": "user", "content": item.query})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert isinstance(rendered, str)
    return rendered


def generation_length(item: GenItem, prompt_tokens: int, max_length: int = MAX_LENGTH) -> int:
    """lighteval's max_new_tokens: the task's size capped by what fits in max_length, and at least 1."""
    room = max_length - prompt_tokens
    wanted = room if item.max_new_tokens is None else min(item.max_new_tokens, room)
    return max(wanted, 1)


def balanced_fewshot(pool: Sequence[tuple[str, str]], k: int, seed: int = 0) -> list[int]:
    """Indices into pool of lighteval's "balanced" few-shot selection (its default, used by SmolLM2's BBH).

    prompt_manager.py `_init_fewshot_sampling_balanced`: group the pool by target, order the groups by size
    (largest first; groups of equal size sorted by target, then shuffled), then cycle through the groups
    taking a random member of each until k + 1 are chosen (one spare, for when the item evaluated is among
    them). lighteval seeds Python's global `random` with the seed (0) just before; random.Random(seed) draws
    the same numbers.
    """
    rng = random.Random(seed)
    by_target: dict[str, list[int]] = {}
    for index, (_, target) in enumerate(pool):
        by_target.setdefault(target, []).append(index)
    by_count: dict[int, list[str]] = {}
    for target, members in sorted(by_target.items()):
        by_count.setdefault(len(members), []).append(target)
    order: list[str] = []
    for count in sorted(by_count, reverse=True):
        targets = by_count[count]
        rng.shuffle(targets)
        order.extend(targets)
    chosen: list[int] = []
    want = min(len(pool), k + 1)
    turn = 0
    while want > 0 and order:
        target = order[turn % len(order)]
        turn += 1
        if not target:  # lighteval stops at an empty target (`if not next_label: break`)
            break
        members = by_target[target]
        if members:
            chosen.append(members.pop(rng.randrange(len(members))))
            want -= 1
    return chosen


def lighteval_order(n_items: int, seed: int = 42) -> tuple[list[int], random.Random]:
    """The order lighteval visits a task's items in, and its few-shot sampler right after.

    lighteval_task.py `create_requests_from_tasks` shuffles the items with random.Random(42) and then passes
    that same generator to the few-shot sampler, item after item in the shuffled order.
    """
    rng = random.Random(seed)
    order = list(range(n_items))
    rng.shuffle(order)
    return order, rng


def generate_all(
    model: SmolLM2,
    tokenizer: Tokenizer,
    items: Sequence[GenItem],
    *,
    chat_template: bool,
    score: Callable[[GenItem, str], dict[str, Any]],
    max_batch: int = 32,
    max_length: int = MAX_LENGTH,
) -> Iterator[Generation]:
    """Greedy replies to every item through the batching engine; yields each (scored) as it finishes.

    Items finish out of order: all are submitted at once and the engine runs up to max_batch together.
    """
    from ..inference.config import GenerationConfig
    from ..inference.engine import Engine

    pending: dict[int, Generation] = {}
    done: queue.Queue[tuple[int, str, object]] = queue.Queue()
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max(len(items), 1),
                    context_length=min(max_length, model.config.max_position_embeddings))
    engine.start()
    try:
        for index, item in enumerate(items):
            ids = tokenizer.encode(render_prompt(item, tokenizer, chat_template))
            if len(ids) >= engine.context_length:
                raise ValueError(f"item {item.id!r}: its prompt has {len(ids)} tokens, no room to generate within "
                                 f"{engine.context_length}")
            config = GenerationConfig(max_new_tokens=generation_length(item, len(ids), engine.context_length),
                                      temperature=0.0, stop=item.stop)
            pending[index] = Generation(item, len(ids))
            pieces: list[str] = []

            def on_event(kind: str, value: object, index: int = index, pieces: list[str] = pieces) -> None:
                if kind == "text":
                    pieces.append(str(value))
                else:  # "done" (value: the finish reason) or "error" (value: the message)
                    pending[index].text = "".join(pieces)
                    done.put((index, kind, value))

            engine.submit(ids, config, on_event)
        for _ in range(len(items)):
            index, kind, value = done.get()
            if kind == "error":
                raise RuntimeError(f"generation failed for item {items[index].id!r}: {value}")
            result = pending.pop(index)
            result.finish_reason = str(value)
            result.score = score(result.item, result.text)
            yield result
    finally:
        engine.shutdown()
