"""Chat data for fine-tuning: JSONL conversations rendered with the model's own chat template, and their batches.

One example a line, in either of the formats TRL and the OpenAI fine-tuning API use:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}               (a user turn and the assistant's reply)
    {"prompt": [messages...], "completion": [messages...]}   (the conversational form of the same)

Each conversation is rendered exactly as `Tokenizer.apply_chat_template(..., tokenize=True)` renders it for
generation (the template's markers as special tokens, the content as plain text), and each token is marked
trained or not: the loss counts only assistant content and the `<|im_end|>` that closes each assistant turn, so
the model learns what to say and when to stop, never the system or user text, the template's markers or padding.

Batches are padded, not packed: a micro-batch's conversations are right-padded to the longest of them. With
causal attention a real token never sees the padding after it, so no mask is needed and no conversation can
attend to another; padding positions carry the label IGNORE and never reach the loss. The order is a seeded
permutation of the examples per epoch, and the position in it is two integers saved in every checkpoint, so a
resumed run reads exactly the batches an uninterrupted one would have (as data.BatchSampler does for tokens).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a position the loss skips (torch's and transformers' ignore_index)
ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class Example:
    """One rendered conversation: its token ids, which of them are trained on, and where it came from."""

    ids: tuple[int, ...]
    trained: tuple[bool, ...]  # per id: an assistant token (content or the turn's <|im_end|>)
    line: int  # 1-based line of the JSONL file

    def inputs_and_labels(self) -> tuple[list[int], list[int]]:
        """The model reads ids[:-1] and predicts ids[1:]; a label counts only where that next id is trained."""
        labels = [t if keep else IGNORE for t, keep in zip(self.ids[1:], self.trained[1:], strict=True)]
        return list(self.ids[:-1]), labels


@dataclass
class ChatData:
    """The examples of one JSONL file, split into training and validation, and what was skipped."""

    path: Path
    train: list[Example]
    val: list[Example]
    skipped_long: list[int]  # lines longer than max_len tokens

    @property
    def examples(self) -> int:
        return len(self.train) + len(self.val)


# ---- rendering -----------------------------------------------------------------------------------------------


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    """The token that closes a turn: <|im_end|> in SmolLM2's template, else the tokenizer's end-of-sequence."""
    token_id = tokenizer.backend.token_to_id(END_OF_TURN)
    if token_id is None:
        token_id = tokenizer.eos_id
    if token_id is None:
        raise ValueError(f"the tokenizer has neither {END_OF_TURN} nor an end-of-sequence token")
    return token_id


def render(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """(ids, trained) of a conversation rendered with the tokenizer's chat template (no generation prompt).

    Rendered as apply_chat_template(tokenize=True) does it (the same ids: tests/train/test_chat_data.py): each
    content replaced by a placeholder, the template's text between them encoded with its special tokens, each
    content encoded as plain text. Those are the ids the model sees when it chats.
    """
    end = end_of_turn_id(tokenizer)
    marks = [f"\x00{i}\x00" for i in range(len(messages))]
    text = tokenizer.apply_chat_template([dict(m, content=mark) for m, mark in zip(messages, marks, strict=True)],
                                         add_generation_prompt=False)
    out: list[int] = []
    trained: list[bool] = []
    after_assistant = False
    for i, mark in enumerate([*marks, None]):
        if mark is None:
            before = text
        else:
            before, found, text = text.partition(mark)
            if not found:
                raise ValueError("the chat template does not render each message's content exactly once")
        piece = tokenizer.encode(before)
        if after_assistant:
            if not piece or piece[0] != end:
                raise ValueError(f"the chat template does not close an assistant turn with "
                                 f"{tokenizer.decode([end])!r} right after its content")
            out.append(piece[0])
            trained.append(True)  # the turn's end: the model learns to stop
            piece = piece[1:]
        out += piece
        trained += [False] * len(piece)
        if mark is not None:
            content = tokenizer.encode(messages[i]["content"], allow_special=False)
            out += content
            after_assistant = messages[i]["role"] == "assistant"
            trained += [after_assistant] * len(content)
    return out, trained


# ---- reading JSONL -------------------------------------------------------------------------------------------


def _messages(record: Any) -> list[dict[str, str]]:
    """The conversation of one JSON record (any accepted format), checked; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record or "completion" in record:
        if "prompt" not in record or "completion" not in record:
            raise ValueError("a prompt/completion example needs both 'prompt' and 'completion'")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        elif isinstance(prompt, list) and isinstance(completion, list):
            messages = prompt + completion
        else:
            raise ValueError("'prompt' and 'completion' must both be strings or both be lists of messages")
    else:
        raise ValueError(f"expected 'messages' or 'prompt'/'completion', got keys {sorted(record)}")
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("empty conversation")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i + 1} is not an object")
        if "role" not in message:
            raise ValueError(f"message {i + 1} has no 'role'")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i + 1} has role {message['role']!r} (use {', '.join(ROLES)})")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i + 1} ({message['role']}) has no string 'content'")
        checked.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in checked):
        raise ValueError("no assistant turn (nothing to train on)")
    return checked


def read_chats(path: str | Path, tokenizer: Tokenizer, max_len: int) -> tuple[list[Example], list[int]]:
    """(examples, lines skipped for being longer than max_len tokens) of a JSONL file; blank lines are ignored.

    Any other bad line is a ValueError naming the file and the line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file (expected JSONL, one conversation a line)")
    if not tokenizer.chat_template:
        raise ValueError("the model's tokenizer has no chat template to render conversations with")
    examples: list[Example] = []
    too_long: list[int] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            try:
                ids, trained = render(tokenizer, _messages(record))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if len(ids) > max_len + 1:  # the model reads all but the last id
                too_long.append(number)
                continue
            examples.append(Example(tuple(ids), tuple(trained), number))
    if not examples:
        detail = f" (all {len(too_long)} are longer than --max-len {max_len} tokens)" if too_long else ""
        raise ValueError(f"--data {path}: no conversations{detail}")
    return examples, too_long


def load_chats(path: str | Path, tokenizer: Tokenizer, max_len: int, val_fraction: float, seed: int) -> ChatData:
    """Read a JSONL file and split off a seeded val_fraction of its examples (at least one when > 0)."""
    examples, too_long = read_chats(path, tokenizer, max_len)
    if too_long:
        shown = ", ".join(map(str, too_long[:10])) + (", ..." if len(too_long) > 10 else "")
        log.warning("%s: skipped %d conversation(s) longer than --max-len %d tokens (lines %s)", path,
                    len(too_long), max_len, shown)
    n_val = 0 if val_fraction <= 0 else max(1, round(val_fraction * len(examples)))
    if n_val >= len(examples):
        raise ValueError(f"--val-fraction {val_fraction} leaves no training examples of the {len(examples)} in "
                         f"{path}")
    order = np.random.default_rng([seed, 1]).permutation(len(examples))
    val = sorted(order[:n_val].tolist())
    val_set = set(val)
    return ChatData(Path(path), [e for i, e in enumerate(examples) if i not in val_set], [examples[i] for i in val],
                    too_long)


# ---- batches -------------------------------------------------------------------------------------------------


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), each (len(examples), longest - 1), right-padded: pad_id in the inputs, IGNORE in the labels."""
    pairs = [e.inputs_and_labels() for e in examples]
    width = max(len(x) for x, _ in pairs)
    inputs = torch.full((len(pairs), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.int64)
    for row, (x, y) in enumerate(pairs):
        inputs[row, : len(x)] = torch.tensor(x, dtype=torch.int64)
        labels[row, : len(y)] = torch.tensor(y, dtype=torch.int64)
    return inputs, labels


class ExampleSampler:
    """The examples of every step, for one process: a seeded permutation per epoch, resumable from two ints."""

    def __init__(self, n_examples: int, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int) -> None:
        if batch_size % (grad_accum * world_size):
            raise ValueError(f"--batch-size {batch_size} must be divisible by --grad-accum {grad_accum} x "
                             f"{world_size} process(es)")
        self.n_examples, self.batch_size, self.grad_accum = n_examples, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.micro_batch = batch_size // (grad_accum * world_size)
        self.epoch, self.position = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 2, epoch]).permutation(self.n_examples)

    def next_global_batch(self) -> np.ndarray:
        """Indices of the next batch_size examples, all processes together; crosses into the next epoch."""
        taken: list[np.ndarray] = []
        needed = self.batch_size
        while needed:
            order = self.order(self.epoch)
            take = order[self.position : self.position + needed]
            taken.append(take)
            needed -= len(take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(taken)

    def next_batches(self, examples: list[Example], pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's grad_accum micro-batches of the next step."""
        indices = self.next_global_batch().reshape(self.grad_accum, self.world_size, self.micro_batch)
        return [collate([examples[j] for j in indices[i, self.rank]], pad_id) for i in range(self.grad_accum)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or not isinstance(position, int) or epoch < 0 \
                or not 0 <= position < self.n_examples:
            raise ValueError(f"bad data-loader state {state!r} for {self.n_examples} training examples")
        self.epoch, self.position = epoch, position
