"""Preference pairs for DPO: JSONL (or .jsonl.gz) prompts with a chosen and a rejected reply, in the chat template.

One pair a line, in any of these forms (TRL's preference formats, and Anthropic's HH-RLHF):
    {"prompt": "...", "chosen": "...", "rejected": "..."}          (a user turn and two replies)
    {"prompt" or "messages": [messages...], "chosen": [assistant messages...], "rejected": [...]}
    {"chosen": [messages...], "rejected": [messages...]}            (whole conversations: the shared start is
                                                                     the prompt, as in UltraFeedback)
    {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}   (HH: whole transcripts)
An HH transcript is split into turns at "\n\nHuman:" and "\n\nAssistant:" (user and assistant); the turns the
two transcripts share are the prompt and each one's last Assistant turn is its reply.

Each side is rendered as chat_data.render renders a conversation (prompt + reply, as the model sees it when it
chats) and only the reply's tokens are trained: its content and the <|im_end|> closing each of its turns, never
the prompt (not even the prompt's own assistant turns), the template's markers or padding. A line that is not
JSON, lacks a key, has an empty reply or the same reply twice is an error naming the file and line. Skipped,
counted and reported instead: pairs longer than --max-len, and two flaws of whole transcripts that HH's own files
have (harmless-base test: 4 of 2312 pairs differ before their last reply, one transcript running on for more
turns; 4 end with an empty Assistant turn), so that the published data trains as it is.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .chat_data import ROLES, Example, collate, render

log = logging.getLogger(__name__)

HH_TURN = re.compile(r"\n\n(Human|Assistant):")  # Anthropic HH's turn markers
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class UnusablePairError(ValueError):
    """Whole conversations that make no comparison of two replies: a pair to skip (and count), not a bad line."""


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with two rendered replies; each Example's trained marks are the reply's tokens alone."""

    chosen: Example
    rejected: Example
    line: int  # 1-based line of the JSONL file


@dataclass
class PreferenceData:
    """The pairs of one file, split into training and validation, and the lines skipped (with why)."""

    path: Path
    train: list[PreferencePair]
    val: list[PreferencePair]
    skipped: dict[str, list[int]]  # why -> the lines skipped for it (too long, conversations that differ, ...)


# ---- one record -> (prompt messages, chosen reply messages, rejected reply messages) --------------------------


def parse_hh(text: Any, side: str) -> list[dict[str, str]]:
    """An Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""
    if not isinstance(text, str):
        raise ValueError(f"'{side}' must be a string transcript, got {type(text).__name__}")
    parts = HH_TURN.split(text)  # [before the first marker, role, content, role, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"'{side}' is not an HH transcript: it should begin with '\\n\\nHuman:'")
    return [{"role": HH_ROLES[role], "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2], strict=True)]


def _message_list(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise ValueError(f"'{name}' must be a string or a list of messages, got {type(value).__name__}")
    checked = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"'{name}' message {i + 1} needs a 'role' ({', '.join(ROLES)})")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"'{name}' message {i + 1} ({message['role']}) has no string 'content'")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def _split_conversations(chosen: list[dict[str, str]], rejected: list[dict[str, str]],
                         ) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """Two whole conversations -> (the turns they share, chosen's last turn, rejected's last turn)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise ValueError("chosen and rejected are the same conversation")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1]["role"] != "assistant":
            raise ValueError(f"'{name}' does not end with an assistant turn (its reply)")
    if not (len(chosen) == len(rejected) == shared + 1):
        raise UnusablePairError("conversations that differ before their last reply")
    if not (chosen[-1]["content"].strip() and rejected[-1]["content"].strip()):
        raise UnusablePairError("conversations that end with an empty reply")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def pair_messages(record: Any) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, chosen reply, rejected reply) of one JSON record, checked; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"missing {' and '.join(repr(k) for k in missing)} (a pair has 'prompt' or 'messages', "
                         f"'chosen' and 'rejected'; got keys {sorted(record)})")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record or "messages" in record:
        key = "prompt" if "prompt" in record else "messages"
        prompt = record[key]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _message_list(prompt, key)
        replies = []
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            reply = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else _message_list(reply, name)
            if prompt and reply[: len(prompt)] == prompt:  # a whole conversation that repeats the prompt
                reply = reply[len(prompt) :]
            wrong = [m["role"] for m in reply if m["role"] != "assistant"]
            if wrong:
                raise ValueError(f"'{name}' has a {wrong[0]} message: a reply is assistant messages only")
            replies.append(reply)
        chosen, rejected = replies
        if chosen == rejected:
            raise ValueError("chosen and rejected are the same reply")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen, rejected = _split_conversations(parse_hh(chosen, "chosen"), parse_hh(rejected, "rejected"))
    else:
        prompt, chosen, rejected = _split_conversations(_message_list(chosen, "chosen"),
                                                        _message_list(rejected, "rejected"))
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or not any(m["content"].strip() for m in reply):
            raise ValueError(f"empty '{name}' reply")
    return prompt, chosen, rejected


def render_reply(tokenizer: Tokenizer, prompt: list[dict[str, str]], reply: list[dict[str, str]],
                 line: int) -> Example:
    """prompt + reply in the chat template, trained on the reply's tokens only."""
    ids, trained = render(tokenizer, prompt + reply)
    prompt_ids, _ = render(tokenizer, prompt) if prompt else ([], [])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not render the prompt as the start of the conversation")
    trained = [False] * len(prompt_ids) + trained[len(prompt_ids) :]
    return Example(tuple(ids), tuple(trained), line)


class _RememberedTemplate:
    """The tokenizer, with its chat template's output remembered per input. render() fills the template with
    numbered placeholders, so pairs of the same shape (roles and turn count) ask for the same text again, and
    the template costs ~10 ms a call (jinja compiles it each time): 2 x 2312 HH pairs read in seconds, not minutes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[tuple, str] = {}

    def apply_chat_template(self, messages: list[dict[str, str]], **options: Any) -> Any:
        key = (tuple((m["role"], m["content"]) for m in messages), tuple(sorted(options.items())))
        if key not in self.texts:
            self.texts[key] = self.tokenizer.apply_chat_template(messages, **options)
        return self.texts[key]

    def __getattr__(self, name: str) -> Any:  # everything else is the tokenizer's own
        return getattr(self.tokenizer, name)


# ---- files ---------------------------------------------------------------------------------------------------


def _open_lines(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_pairs(path: str | Path, tokenizer: Tokenizer, max_len: int,
               ) -> tuple[list[PreferencePair], dict[str, list[int]]]:
    """(pairs, {why: lines skipped}) of a JSONL or .jsonl.gz file.

    Blank lines are ignored; any other bad line is a ValueError naming the file and the line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file (expected JSONL, one preference pair a line)")
    if not tokenizer.chat_template:
        raise ValueError("the model's tokenizer has no chat template to render conversations with")
    tokenizer = _RememberedTemplate(tokenizer)  # type: ignore[assignment]
    pairs: list[PreferencePair] = []
    too_long = f"longer than --max-len {max_len} tokens"
    skipped: dict[str, list[int]] = {}
    with _open_lines(path) as f:
        try:
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
                    prompt, chosen, rejected = pair_messages(record)
                    pair = PreferencePair(render_reply(tokenizer, prompt, chosen, number),
                                          render_reply(tokenizer, prompt, rejected, number), number)
                except UnusablePairError as e:
                    skipped.setdefault(str(e), []).append(number)
                    continue
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                if max(len(pair.chosen.ids), len(pair.rejected.ids)) > max_len + 1:  # the model reads all but one
                    skipped.setdefault(too_long, []).append(number)
                    continue
                pairs.append(pair)
        except (OSError, EOFError) as e:  # a truncated or corrupt .gz
            raise ValueError(f"--data {path}: cannot read it ({e})") from None
    if not pairs:
        detail = "".join(f"; {len(lines)} {why}" for why, lines in skipped.items())
        raise ValueError(f"--data {path}: no preference pairs{detail}")
    return pairs, skipped


def _lines(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")


def load_pairs(path: str | Path, tokenizer: Tokenizer, max_len: int, val_fraction: float,
               seed: int) -> PreferenceData:
    """Read a pairs file and split off a seeded val_fraction of its pairs (at least one when > 0), as
    chat_data.load_chats splits conversations."""
    pairs, skipped = read_pairs(path, tokenizer, max_len)
    for why, lines in skipped.items():
        log.warning("%s: skipped %d pair(s): %s (lines %s)", path, len(lines), why, _lines(lines))
    n_val = 0 if val_fraction <= 0 else max(1, round(val_fraction * len(pairs)))
    if n_val >= len(pairs):
        raise ValueError(f"--val-fraction {val_fraction} leaves no training pairs of the {len(pairs)} in {path}")
    order = np.random.default_rng([seed, 1]).permutation(len(pairs))
    val_set = set(order[:n_val].tolist())
    return PreferenceData(Path(path), [p for i, p in enumerate(pairs) if i not in val_set],
                          [p for i, p in enumerate(pairs) if i in val_set], skipped)


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of 2 x len(pairs) rows, right-padded: the chosen replies first, then the rejected."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
