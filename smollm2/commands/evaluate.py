"""`smollm2 evaluate`: the model card's benchmarks, printed next to the SmolLM2 model card's numbers.

    smollm2 evaluate --tasks piqa,arc_easy,arc_challenge --limit 200 --json results.json
    smollm2 evaluate --tasks ifeval,gsm8k,mmlu,bbh --limit 100

Data: shared/data/eval (see its README.txt). Multiple choice (the zero-shot tasks of eval/tasks.py and MMLU
cloze, eval/mmlu.py) is scored by eval/scoring.py; the generative tasks (eval/ifeval.py, gsm8k.py, bbh.py)
generate through the batching engine (eval/generative.py). Every task's data is read before the model loads,
so a malformed file fails in a second, naming file and line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..eval.tasks import (
    CARD_ROWS,
    TASKS,
    Item,
    accuracy,
    default_data_dir,
    load_task,
    model_card_scores,
    wilson_interval,
)
from .options import add_quantize_argument, add_source_argument

if TYPE_CHECKING:
    from ..eval.generative import Generation, GenItem
    from ..eval.scoring import ItemResult

GENERATIVE = ("ifeval", "gsm8k", "bbh")
MULTIPLE_CHOICE = (*TASKS, "mmlu")
ALL_TASKS = (*MULTIPLE_CHOICE, *GENERATIVE)
# The card's numbers (x100) for the tasks beyond tasks.py's (shared/data/eval/README.txt); None = no such row.
CARD_EXTRA = {"mmlu": (29.3, 31.5), "ifeval": (29.9, None), "bbh": (28.2, None), "gsm8k": (1.4, 1.4)}

_DTYPES = ("bfloat16", "float32")  # --dtype: torch's names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated task names: the zero-shot {', '.join(TASKS)} (the default: all "
                             f"of them), mmlu (cloze) and the generative {', '.join(GENERATIVE)}")
    add_source_argument(parser)
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="score only the first N items of each task (mmlu and bbh: the first N/57 of each "
                             "subject, N/27 of each BBH task, rounded up)")
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help="benchmark data folder (default: ../shared/data/eval when present)")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="render each query as a chat turn, as the card's Instruct column did "
                             "(default: on for an Instruct model whose tokenizer has a template)")
    parser.add_argument("--json", type=Path, default=None, dest="json_path", metavar="FILE",
                        help="write results and per-item predictions to this file")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="multiple choice: items per forward pass (default: 8)")
    parser.add_argument("--max-batch", type=int, default=32, metavar="N",
                        help="generative tasks: replies decoded together by the batching engine (default: 32)")
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
        raise ValueError(f"--tasks {text!r} names no task; known tasks: {', '.join(ALL_TASKS)}")
    unknown = [name for name in names if name not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(ALL_TASKS)}")
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


def _load_items(name: str, data_dir: Path, limit: int | None) -> list[Item] | list[GenItem]:
    from ..eval import bbh, gsm8k, ifeval, mmlu

    loaders = {"mmlu": mmlu.load_mmlu, "ifeval": ifeval.load_ifeval, "gsm8k": gsm8k.load_gsm8k,
               "bbh": bbh.load_bbh}
    return loaders[name](data_dir, limit) if name in loaders else load_task(name, data_dir, limit)


def _scorer(name: str) -> Any:
    from ..eval import bbh, gsm8k, ifeval

    return {"ifeval": ifeval.score_ifeval, "gsm8k": gsm8k.score_gsm8k, "bbh": bbh.score_bbh}[name]


def _running(name: str, scores: list[dict[str, Any]]) -> str:
    """The progress bar's running accuracy: prompt-level strict for IFEval, exact match otherwise."""
    key = "prompt_level_strict_acc" if name == "ifeval" else "correct"
    return f"{sum(bool(s[key]) for s in scores) / len(scores):.3f}"


def _generate_task(name: str, items: list[GenItem], model: Any, tokenizer: Any, chat_template: bool,
                   max_batch: int) -> list[Generation]:
    from tqdm import tqdm

    from ..eval.generative import generate_all

    results: list[Generation] = []
    with tqdm(total=len(items), desc=name, unit="item", file=sys.stderr, dynamic_ncols=True) as bar:
        for result in generate_all(model, tokenizer, items, chat_template=chat_template, score=_scorer(name),
                                   max_batch=max_batch):
            results.append(result)
            bar.update(1)
            bar.set_postfix(acc=_running(name, [r.score for r in results]), refresh=False)
    order = {item.id: i for i, item in enumerate(items)}
    return sorted(results, key=lambda r: order[r.item.id])  # they finish out of order


def _generative_summary(name: str, results: list[Generation], seconds: float) -> dict[str, Any]:
    """n, the card's metric (score, x1) with its 95% interval, and the task's other metrics."""
    from ..eval.bbh import subtask_accuracies
    from ..eval.ifeval import summarize_ifeval

    scores = [r.score for r in results]
    out: dict[str, Any] = {"n": len(results), "seconds": round(seconds, 1)}
    if name == "ifeval":
        metrics = summarize_ifeval(scores)
        n_inst = sum(len(s["inst_level_strict_acc"]) for s in scores)
        prompt_hits = sum(bool(s["prompt_level_strict_acc"]) for s in scores)
        inst_hits = sum(sum(s["inst_level_strict_acc"]) for s in scores)
        out.update(metric="mean of prompt- and instruction-level strict accuracy", score=metrics["card_average"],
                   metrics=metrics, n_instructions=n_inst,
                   # The average of two proportions has no exact interval; the two own intervals are given.
                   ci=None, prompt_strict_ci=list(wilson_interval(prompt_hits, len(scores))),
                   inst_strict_ci=list(wilson_interval(inst_hits, n_inst)))
    else:
        hits = sum(bool(s["correct"]) for s in scores)
        out.update(metric="exact match", score=hits / len(scores), ci=list(wilson_interval(hits, len(scores))))
        if name == "bbh":
            per_task = subtask_accuracies(scores)
            # The card's BBH is one number over 27 lighteval tasks: the mean of their accuracies.
            out.update(metric="mean of the 27 tasks' exact match", micro=hits / len(scores),
                       score=sum(per_task.values()) / len(per_task), subtasks=per_task)
    out["finish_reasons"] = {reason: sum(r.finish_reason == reason for r in results)
                             for reason in sorted({str(r.finish_reason) for r in results})}
    return out


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
    if "mmlu" in summary:
        instruct, base = CARD_EXTRA["mmlu"]
        rows["mmlu"] = {"measured": 100 * summary["mmlu"]["acc_norm"], "instruct": instruct, "base": base}
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


def _print_generative_table(summary: dict[str, dict[str, Any]], caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.1f}"

    def card(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f}"

    table = Table(title="Generative tasks (x100), greedy; the card's metric in bold", caption=caption)
    for header in ("task", "n", "metric", "score", "95% CI", "card Instruct", "card base"):
        table.add_column(header, justify="left" if header in ("task", "metric") else "right", no_wrap=True)
    for name, s in summary.items():
        instruct, base = CARD_EXTRA[name]
        if name == "ifeval":
            m = s["metrics"]
            for key, ci in (("prompt_level_strict_acc", s["prompt_strict_ci"]),
                            ("inst_level_strict_acc", s["inst_strict_ci"]),
                            ("prompt_level_loose_acc", None), ("inst_level_loose_acc", None)):
                n = s["n_instructions"] if key.startswith("inst") else s["n"]
                interval = "—" if ci is None else f"{pct(ci[0])}–{pct(ci[1])}"
                table.add_row(name, str(n), key, pct(m[key]), interval, "", "")
            table.add_row("IFEval (Average prompt/inst)", str(s["n"]), "mean of the two strict", pct(s["score"]),
                          "—", card(instruct), card(base), style="bold")
            continue
        if name == "bbh":
            table.add_row(name, str(s["n"]), "exact match, all items", pct(s["micro"]),
                          f"{pct(s['ci'][0])}–{pct(s['ci'][1])}", "", "")
            table.add_row("BBH (3-shot)", str(s["n"]), f"mean of {len(s['subtasks'])} tasks", pct(s["score"]), "—",
                          card(instruct), card(base), style="bold")
            continue
        table.add_row("GSM8K (5-shot)", str(s["n"]), s["metric"], pct(s["score"]),
                      f"{pct(s['ci'][0])}–{pct(s['ci'][1])}", card(instruct), card(base), style="bold")
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.scoring import default_chat_template

    names = _parse_tasks(args.tasks)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"limit must be None or an int >= 0, got {args.limit}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    data_dir = _data_dir(args.data_dir)
    # All data first: a bad file should fail before the ~8 s model load, not after an hour of scoring.
    items = {name: _load_items(name, data_dir, args.limit) for name in names}
    if "ifeval" in names:
        from ..eval.ifeval import checkers

        checkers()  # lm-eval and its punkt model present, before the model loads
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
    generations: dict[str, list[Generation]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        if name in GENERATIVE:
            generations[name] = _generate_task(name, items[name], model, tokenizer, chat_template, args.max_batch)
        else:
            task_results[name] = _score_task(name, items[name], model, tokenizer, chat_template, args.batch_size)
        seconds[name] = time.perf_counter() - start

    summary = _summary(task_results, seconds)
    generative = {name: _generative_summary(name, results, seconds[name]) for name, results in generations.items()}
    card_rows = _card_rows(summary)
    config = {"source": model_name, "dtype": args.dtype, "quantize": args.quantize, "chat_template": chat_template,
              "limit": args.limit, "data_dir": str(data_dir), "batch_size": args.batch_size,
              "max_batch": args.max_batch,
              "torch": torch.__version__, "seconds": round(sum(seconds.values()), 1)}
    quantized = "" if args.quantize == "none" else f", quantize {args.quantize}"
    caption = (f"{model_name}, {args.dtype}{quantized}, chat template {'on' if chat_template else 'off'}, "
               f"{config['seconds']:.0f} s")
    if summary:
        _print_table(summary, card_rows, caption)
    if generative:
        _print_generative_table(generative, caption)
    if args.json_path is not None:
        predictions = {name: [r.to_json() for r in results] for name, results in task_results.items()}
        predictions.update({name: [{"id": r.item.id, "prompt_tokens": r.prompt_tokens, "response": r.text,
                                    "finish_reason": r.finish_reason, **r.score} for r in results]
                            for name, results in generations.items()})
        report = {"config": config, "results": {**summary, **generative}, "card": card_rows,
                  "predictions": predictions}
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json_path}")
    return 0
