"""`smollm2 evaluate`: zero-shot multiple-choice benchmarks, printed next to the SmolLM2 model card's numbers.

    smollm2 evaluate --tasks piqa,arc_easy,arc_challenge --limit 200 --json results.json

Data: shared/data/eval (see its README.txt), read by smollm2/eval/tasks.py; scoring: smollm2/eval/scoring.py.
Every task's data is read before the model loads, so a malformed file fails in a second, naming file and line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..eval.tasks import CARD_ROWS, TASKS, Item, accuracy, default_data_dir, load_task, model_card_scores
from .options import add_quantize_argument, add_source_argument

if TYPE_CHECKING:
    from ..eval.scoring import ItemResult

_DTYPES = ("bfloat16", "float32")  # --dtype: torch's names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated task names (default: all of {', '.join(TASKS)})")
    add_source_argument(parser)
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="score only the first N items of each task")
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help="benchmark data folder (default: ../shared/data/eval when present)")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="render each query as a chat turn, as the card's Instruct column did "
                             "(default: on for an Instruct model whose tokenizer has a template)")
    parser.add_argument("--json", type=Path, default=None, dest="json_path", metavar="FILE",
                        help="write results and per-item predictions to this file")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="items per forward pass (default: 8)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32",
                        help="compute dtype (default: float32, what the numbers in notes/eval_results.md used)")
    add_quantize_argument(parser, "none", help="weights: none (default: the exact model), bf16, int8 or int4 "
                                              "(weight-only, CPU)")


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, name): the one place where the model is built (and quantised, with --quantize)."""
    import torch

    from ..loading import BUNDLED_FILE, load

    model, tokenizer = load(args.source, dtype=getattr(torch, args.dtype), quantize=args.quantize)
    return model.eval(), tokenizer, str(args.source) if args.source is not None else BUNDLED_FILE


def _parse_tasks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--tasks {text!r} names no task; known tasks: {', '.join(TASKS)}")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def _data_dir(given: Path | None) -> Path:
    if given is not None:
        if not given.is_dir():
            raise FileNotFoundError(f"--data-dir {given}: no such directory")
        return given
    found = default_data_dir()
    if found is None:
        raise FileNotFoundError("no benchmark data found at ../shared/data/eval; pass --data-dir DIR")
    return found


def _score_task(name: str, items: list[Item], model: Any, tokenizer: Any, chat_template: bool,
                batch_size: int) -> list[ItemResult]:
    from tqdm import tqdm

    from ..eval.scoring import score_items

    results: list[ItemResult] = []
    hits = hits_norm = 0
    with tqdm(total=len(items), desc=name, unit="item", file=sys.stderr, dynamic_ncols=True) as bar:
        for result in score_items(model, tokenizer, items, chat_template=chat_template, batch_size=batch_size):
            results.append(result)
            hits += result.pred == result.item.gold
            hits_norm += result.pred_norm == result.item.gold
            bar.update(1)
            bar.set_postfix(acc=f"{hits / len(results):.3f}", acc_norm=f"{hits_norm / len(results):.3f}",
                            refresh=False)
    return results


def _summary(task_results: dict[str, list[ItemResult]], seconds: dict[str, float]) -> dict[str, dict[str, Any]]:
    summary = {}
    for name, results in task_results.items():
        acc = accuracy([r.item for r in results], [r.logprobs for r in results])
        summary[name] = {"n": acc.n, "acc": acc.acc, "acc_norm": acc.acc_norm, "acc_ci": list(acc.acc_ci),
                         "acc_norm_ci": list(acc.acc_norm_ci), "seconds": round(seconds[name], 1)}
    return summary


def _card_rows(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Card rows (x100) whose tasks were all run: measured acc_norm next to the card's Instruct and base."""
    card = model_card_scores()
    rows = {}
    for row, tasks in CARD_ROWS.items():
        if all(t in summary for t in tasks):
            measured = 100 * sum(summary[t]["acc_norm"] for t in tasks) / len(tasks)
            rows[row] = {"measured": measured, "instruct": card["instruct"].get(row), "base": card["base"].get(row)}
    return rows


def _print_table(summary: dict[str, dict[str, Any]], card_rows: dict[str, dict[str, float | None]],
                 caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f}"

    table = Table(title="Zero-shot accuracy (x100); acc_norm is the model card's metric", caption=caption)
    for header in ("task", "n", "acc", "acc_norm", "95% CI (acc_norm)", "card Instruct", "card base"):
        table.add_column(header, justify="left" if header == "task" else "right", no_wrap=True)
    for name, s in summary.items():
        row = card_rows.get(name, {})  # ARC's tasks have no row of their own on the card
        low, high = s["acc_norm_ci"]
        table.add_row(name, str(s["n"]), pct(100 * s["acc"]), pct(100 * s["acc_norm"]),
                      f"{100 * low:.1f}–{100 * high:.1f}", pct(row.get("instruct")), pct(row.get("base")))
    if "arc" in card_rows:
        arc = card_rows["arc"]
        n = summary["arc_easy"]["n"] + summary["arc_challenge"]["n"]
        acc = (summary["arc_easy"]["acc"] + summary["arc_challenge"]["acc"]) / 2
        table.add_row("ARC (Average)", str(n), pct(100 * acc), pct(arc["measured"]), "—", pct(arc["instruct"]),
                      pct(arc["base"]), style="bold")
    # Rich assumes 80 columns when stdout is not a terminal; the table is ~90 wide, so don't wrap it in logs.
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.scoring import default_chat_template

    names = _parse_tasks(args.tasks)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    data_dir = _data_dir(args.data_dir)
    # All data first: a bad file should fail before the ~8 s model load, not after an hour of scoring.
    items = {name: load_task(name, data_dir, args.limit) for name in names}
    empty = [name for name, task_items in items.items() if not task_items]
    if empty:
        raise ValueError(f"no items to score in {', '.join(empty)} (--limit {args.limit})")

    model, tokenizer, model_name = _load_model(args)
    chat_template = args.chat_template
    if chat_template is None:
        chat_template = default_chat_template(tokenizer, model_name)
    elif chat_template and not tokenizer.chat_template:
        raise ValueError(f"{model_name}: its tokenizer has no chat template; use --no-chat-template")

    task_results: dict[str, list[ItemResult]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        task_results[name] = _score_task(name, items[name], model, tokenizer, chat_template, args.batch_size)
        seconds[name] = time.perf_counter() - start

    summary = _summary(task_results, seconds)
    card_rows = _card_rows(summary)
    config = {"source": model_name, "dtype": args.dtype, "quantize": args.quantize, "chat_template": chat_template,
              "limit": args.limit, "data_dir": str(data_dir), "batch_size": args.batch_size,
              "torch": torch.__version__, "seconds": round(sum(seconds.values()), 1)}
    quantized = "" if args.quantize == "none" else f", quantize {args.quantize}"
    caption = (f"{model_name}, {args.dtype}{quantized}, chat template {'on' if chat_template else 'off'}, "
               f"{config['seconds']:.0f} s")
    _print_table(summary, card_rows, caption)
    if args.json_path is not None:
        report = {"config": config, "results": summary, "card": card_rows,
                  "predictions": {name: [r.to_json() for r in results] for name, results in task_results.items()}}
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json_path}")
    return 0
