"""The reverse-engineering report: our SmolLM2 next to the original, transformers' `LlamaForCausalLM`, on the
same weights. `build_report()` returns plain data; `smollm2 compare` renders it as tables, JSON and a plot.

Both models read the same file through separate code (our loader vs transformers' GGUF/safetensors loader),
get the same token ids (from our tokenizer), and are compared at every level where a bug could hide:

  config       our Config fields vs transformers' LlamaConfig attributes
  modules      the two module trees, one row per module path with the blocks folded (`layers.*`, x30)
  parameters   counts per parameter (a tied matrix counts once) and the max |diff| of the loaded weights:
               a wrong Q/K un-permutation or dequantisation shows here before any forward pass
  layers       max |diff| of the hidden state after every decoder block, over all prompts and positions,
               so the first wrong block is pinpointed
  prompts      logits at every position, the top-5 next tokens at the last one, and a greedy continuation

The report disagrees (`Report.ok` is False) when a weight, a hidden state or a logit differs by more than
`tolerance`, when a greedy continuation differs by a single token, or when the parameter totals differ.
Config values are shown but never fail the report: the GGUF carries no initializer_range, for instance.

`Report.to_dict()` (the `--json` file) has the keys: source, versions, tolerance, max_new_tokens, timings_s,
config, modules, parameters, parameters_total, embeddings, layers, final_norm, prompts, failures,
first_divergent_layer, ok. Every difference is a max |ours - transformers| in float32.

transformers is an optional extra (`pip install 'smollm2[compare]'`), imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..defaults import COMPARE_MAX_NEW_TOKENS as DEFAULT_MAX_NEW_TOKENS
from ..defaults import COMPARE_PROMPTS as DEFAULT_PROMPTS
from ..defaults import COMPARE_TOLERANCE as DEFAULT_TOLERANCE
from ..inference.generate import decode_step, generate
from ..model import SmolLM2
from ..tokenizer import Tokenizer

TOP_K = 5

# Config fields that describe the computation: a difference here would change the outputs. The others
# (initializer_range, token ids) are metadata for training and generation.
ARCHITECTURE_FIELDS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
    "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "attention_dropout", "pretraining_tp",
}


class MissingExtra(ImportError):
    """An optional dependency (transformers, accelerate) is not installed."""


# ---- the report, as plain data ---------------------------------------------------------------------------


@dataclass
class ConfigRow:
    field: str
    ours: Any
    transformers: Any
    match: bool  # equal, or equal once rounded to float32 (the GGUF stores floats as f32)
    architectural: bool  # False for metadata such as initializer_range and token ids


@dataclass
class ModuleRow:
    path: str  # "model.layers.*.self_attn.q_proj": block indices folded into "*"
    count: int  # instances of the path (30 for a per-block module)
    ours: str | None  # "Linear(576->576)"; None when this side has no such module
    transformers: str | None


@dataclass
class ParameterRow:
    name: str  # "model.layers.*.mlp.down_proj.weight", or a name without "*" for a single tensor
    shape: list[int]
    count: int  # tensors of this name pattern
    ours: int  # parameters counted for our model (0 for the tied lm_head.weight)
    transformers: int
    max_abs_diff: float | None  # over the `count` tensors; None when one side lacks the tensor
    differing: list[str]  # full names of the tensors whose diff exceeds the tolerance
    tied_to: str | None = None  # "model.embed_tokens.weight" for a tied output projection


@dataclass
class LayerDiff:
    name: str  # "embeddings", "block 7", "final norm"
    max_abs_diff: float  # over all prompts and positions
    max_abs_value: float  # the largest |hidden state| of ours: the scale the difference is measured against


@dataclass
class TokenProb:
    id: int
    text: str
    prob: float


@dataclass
class PromptResult:
    prompt: str
    input_ids: list[int]
    logits_max_abs_diff: float  # over every position and the whole vocabulary
    last_logits_max_abs_diff: float  # at the last position, the one that picks the next token
    top_ours: list[TokenProb]
    top_transformers: list[TokenProb]
    greedy_ours: list[int]
    greedy_transformers: list[int]
    text_ours: str
    text_transformers: str
    greedy_identical: bool
    first_divergent_token: int | None  # index into the continuations, None when identical


@dataclass
class Report:
    source: str
    versions: dict[str, str]
    tolerance: float
    max_new_tokens: int
    timings_s: dict[str, float | None]  # load_ours / load_transformers are None for models passed in
    config: list[ConfigRow]
    modules: list[ModuleRow]
    parameters: list[ParameterRow]
    parameters_total: dict[str, int]  # {"ours": ..., "transformers": ...}
    embeddings: LayerDiff
    layers: list[LayerDiff]  # one per decoder block, in order
    final_norm: LayerDiff
    prompts: list[PromptResult]
    failures: list[str] = field(default_factory=list)  # one line per disagreement beyond tolerance
    first_divergent_layer: int | None = None  # the first block whose output differs beyond tolerance

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


# ---- loading -----------------------------------------------------------------------------------------------


def import_transformers(gguf: bool = False) -> Any:
    """The transformers module, or a MissingExtra saying how to install it (accelerate too for GGUF files)."""
    hint = "install it with: pip install 'smollm2[compare]'"
    try:
        import transformers
    except ImportError:
        raise MissingExtra(f"comparing with the original needs transformers, which is not installed; {hint}") from None
    if gguf:
        try:
            import accelerate  # noqa: F401  (transformers needs it to load GGUF files)
        except ImportError:
            raise MissingExtra(f"transformers needs accelerate to read GGUF files, which is not installed; {hint}") \
                from None
    return transformers


def load_transformers(source: str | Path | None = None) -> nn.Module:
    """The original model (transformers' AutoModelForCausalLM), fp32, eval mode, from the source `smollm2.load`
    would read: the bundled GGUF by default, a .gguf file, an original-layout directory or a hub id."""
    from ..loading import resolve

    kind, path = resolve(source)
    transformers = import_transformers(gguf=kind == "gguf")
    auto = transformers.AutoModelForCausalLM
    if kind == "gguf":
        model = auto.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = auto.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


# ---- config, modules, parameters ----------------------------------------------------------------------------


def compare_configs(ours: dict[str, Any], theirs: Any) -> list[ConfigRow]:
    """One row per field of our config.json, next to the same attribute of transformers' config."""
    rows = []
    for name, value in ours.items():
        if name == "architectures":
            continue  # the class name, shown in the module tree
        other = _config_value(theirs, name)
        rows.append(ConfigRow(name, value, other, _same(value, other), name in ARCHITECTURE_FIELDS))
    return rows


def _config_value(config: Any, name: str) -> Any:
    # transformers 5 moved rope_theta and rope_scaling into rope_parameters.
    rope = getattr(config, "rope_parameters", None) or {}
    if name == "rope_theta" and "rope_theta" in rope:
        return rope["rope_theta"]
    if name == "rope_scaling" and rope:
        return None if rope.get("rope_type", "default") == "default" else dict(rope)
    return getattr(config, name, "<absent>")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) \
                or not isinstance(b, (int, float)):
            return False
        return a == b or math.isclose(a, b, rel_tol=2**-23)  # one float32 ulp
    return a == b


_INDEX = re.compile(r"\.\d+(?=\.|$)")


def fold(name: str) -> str:
    """"model.layers.7.mlp" -> "model.layers.*.mlp": one row for the same module in every block."""
    return _INDEX.sub(".*", name)


def describe(module: nn.Module) -> str:
    """Class name plus the shape that identifies it: Linear(576->1536), Embedding(49152, 576), RMSNorm(576)."""
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"{name}({module.in_features}->{module.out_features})"
    if isinstance(module, nn.Embedding):
        return f"{name}({module.num_embeddings}, {module.embedding_dim})"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return f"{name}({weight.shape[0]})"
    return name


def compare_modules(ours: nn.Module, theirs: nn.Module) -> list[ModuleRow]:
    """The two module trees, folded over blocks, in our order with transformers-only modules slotted in."""

    def folded(model: nn.Module) -> dict[str, tuple[str, int]]:
        rows: dict[str, tuple[str, int]] = {}
        for name, module in model.named_modules():
            key = fold(name)
            rows[key] = (describe(module), rows.get(key, ("", 0))[1] + 1)
        return rows

    a, b = folded(ours), folded(theirs)
    order = list(a)
    previous = None
    for path in b:  # insert each module only transformers has right after its predecessor in their tree
        if path not in a:
            order.insert(order.index(previous) + 1 if previous in order else len(order), path)
        previous = path
    return [ModuleRow(path, max(a.get(path, ("", 0))[1], b.get(path, ("", 0))[1]),
                      a[path][0] if path in a else None, b[path][0] if path in b else None) for path in order]


def compare_parameters(ours: nn.Module, theirs: nn.Module, tolerance: float) -> list[ParameterRow]:
    """Counts per parameter name (folded over blocks) and the max |diff| of the loaded values.

    A tensor registered under two names (tied embeddings) is counted once, under its first name."""
    a, b = _parameters(ours), _parameters(theirs)
    rows: dict[str, ParameterRow] = {}
    for name in list(a) + [n for n in b if n not in a]:
        (pa, tied_a), (pb, tied_b) = a.get(name, (None, None)), b.get(name, (None, None))
        shape = list((pa if pa is not None else pb).shape)
        diff = None
        if pa is not None and pb is not None and pa.shape == pb.shape:
            diff = (pa.detach().float() - pb.detach().float()).abs().max().item()
        key = fold(name)
        row = rows.get(key)
        if row is None:
            row = rows[key] = ParameterRow(key, shape, 0, 0, 0, diff, [], tied_a or tied_b)
        else:
            row.max_abs_diff = None if diff is None or row.max_abs_diff is None else _worst(row.max_abs_diff, diff)
        row.count += 1
        row.ours += pa.numel() if pa is not None and tied_a is None else 0
        row.transformers += pb.numel() if pb is not None and tied_b is None else 0
        if diff is None or not diff <= tolerance:  # `not <=` so that NaN counts as a difference
            row.differing.append(name)
    return list(rows.values())


def _parameters(model: nn.Module) -> dict[str, tuple[torch.Tensor, str | None]]:
    """name -> (tensor, the name it is tied to or None), for every name a parameter is registered under."""
    first: dict[tuple, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        # Tied by sharing memory: transformers may hold two Parameter objects over one storage.
        tied = first.setdefault((p.data_ptr(), tuple(p.shape)), name)
        out[name] = (p, tied if tied != name else None)
    return out


# ---- hidden states and logits --------------------------------------------------------------------------------


@contextlib.contextmanager
def capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each module during the forward passes run inside the `with` block."""
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            outputs[name] = (output[0] if isinstance(output, tuple) else output).detach()
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def ours_forward(model: SmolLM2, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states [embeddings, block 0, ..., block N-1, final norm] and logits (1, T, vocab)."""
    decoder = model.model
    modules = {"embeddings": decoder.embed_tokens, "norm": decoder.norm}
    modules |= {str(i): block for i, block in enumerate(decoder.layers)}
    with capture(modules) as out:
        logits = model(ids)
    states = [out["embeddings"]] + [out[str(i)] for i in range(len(decoder.layers))] + [out["norm"]]
    return states, logits


@torch.no_grad()
def transformers_forward(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same list as `ours_forward` from transformers' model.

    `output_hidden_states=True` returns N+1 tensors: [0] is the embeddings and [i] the output of block i-1,
    except the last, which is the final norm's output (transformers overwrites it with last_hidden_state).
    So the raw output of the last block comes from a forward hook."""
    with capture({"last": model.model.layers[-1]}) as out:
        result = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                       use_cache=False)
    hidden = list(result.hidden_states)
    assert len(hidden) == len(model.model.layers) + 1, len(hidden)
    return hidden[:-1] + [out["last"], hidden[-1]], result.logits


@torch.no_grad()
def greedy_ours(model: SmolLM2, ids: Sequence[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """Greedy decoding with our static KV cache and the eager step (the exact maths), up to and including
    eos_id, as transformers' generate returns it."""
    if max_new_tokens <= 0:
        return []
    out = []
    for token in generate(model, list(ids), max_new_tokens=max_new_tokens, ignore_eos=True, step=decode_step):
        out.append(token)
        if token == eos_id:
            break
    return out


@torch.no_grad()
def greedy_transformers(model: nn.Module, ids: Sequence[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """Greedy decoding with transformers' own `generate` and cache."""
    if max_new_tokens <= 0:
        return []
    x = torch.tensor([list(ids)], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_id, pad_token_id=eos_id)
    return out[0, x.shape[1]:].tolist()


def _top(logits: torch.Tensor, tokenizer: Tokenizer, k: int) -> list[TokenProb]:
    probs = logits.float().softmax(-1)
    values, ids = probs.topk(k)
    return [TokenProb(int(i), tokenizer.decode([int(i)]), float(p)) for p, i in zip(values, ids, strict=True)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.to(a.device).float()).abs().max().item()


def _worst(a: float, b: float) -> float:
    """max() that keeps a NaN (plain max(0.0, nan) returns 0.0)."""
    return b if math.isnan(b) or b > a else a


# ---- the report ----------------------------------------------------------------------------------------------


def check_options(prompts: Sequence[str], max_new_tokens: int, tolerance: float) -> None:
    """Reject bad options before anything slow is loaded."""
    if not prompts:
        raise ValueError("no prompts to compare on")
    if not all(prompts):
        raise ValueError(f"prompts must not be empty strings, got {list(prompts)!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")


def build_report(
    source: str | Path | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    model: SmolLM2 | None = None,
    tokenizer: Tokenizer | None = None,
    reference: nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Load both models from `source` (unless passed in: model + tokenizer, reference) and compare them.

    progress, when given, is called with a short description of each slow step as it starts."""
    check_options(prompts, max_new_tokens, tolerance)
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    transformers = import_transformers()  # fail before the slow loading when the extra is missing
    say = progress or (lambda message: None)

    started = time.perf_counter()
    timings: dict[str, float | None] = {"load_ours": None, "load_transformers": None}
    if model is None:
        from ..loading import load

        say("Loading our model (smollm2.load) ...")
        model, tokenizer = load(source)
        timings["load_ours"] = time.perf_counter() - started
    if reference is None:
        say("Loading the original (transformers' AutoModelForCausalLM) ...")
        t0 = time.perf_counter()
        reference = load_transformers(source)
        timings["load_transformers"] = time.perf_counter() - t0
    model.eval()
    assert tokenizer is not None

    encoded = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        if len(ids) + max_new_tokens > model.config.max_position_embeddings:
            raise ValueError(f"prompt {prompt[:40]!r}... is {len(ids)} tokens: with {max_new_tokens} new tokens it "
                             f"exceeds the context length {model.config.max_position_embeddings}")
        encoded.append(ids)

    say("Comparing the weights ...")
    parameters = compare_parameters(model, reference, tolerance)
    n_states = model.config.num_hidden_layers + 2  # embeddings, every block, final norm
    diffs, scales = [0.0] * n_states, [0.0] * n_states
    results = []
    for n, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True), 1):
        say(f"Prompt {n}/{len(prompts)}: hidden states, logits and {max_new_tokens} greedy tokens ...")
        result, prompt_diffs, prompt_scales = compare_prompt(model, tokenizer, reference, prompt, ids,
                                                             max_new_tokens, timings)
        diffs = [_worst(a, b) for a, b in zip(diffs, prompt_diffs, strict=True)]
        scales = [max(a, b) for a, b in zip(scales, prompt_scales, strict=True)]
        results.append(result)
    timings["total"] = time.perf_counter() - started

    names = ["embeddings"] + [f"block {i}" for i in range(n_states - 2)] + ["final norm"]
    states = [LayerDiff(n, d, s) for n, d, s in zip(names, diffs, scales, strict=True)]
    report = Report(
        source=str(source) if source is not None else str(getattr(model, "source", "<in memory>")),
        versions={"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__},
        tolerance=tolerance, max_new_tokens=max_new_tokens, timings_s=timings,
        config=compare_configs(model.config.to_dict(), reference.config),
        modules=compare_modules(model, reference),
        parameters=parameters,
        parameters_total={"ours": sum(r.ours for r in parameters),
                          "transformers": sum(r.transformers for r in parameters)},
        embeddings=states[0], layers=states[1:-1], final_norm=states[-1],
        prompts=results,
    )
    judge(report)
    return report


def compare_prompt(
    model: SmolLM2,
    tokenizer: Tokenizer,
    reference: nn.Module,
    prompt: str,
    ids: list[int],
    max_new_tokens: int,
    timings: dict[str, float | None],
) -> tuple[PromptResult, list[float], list[float]]:
    """One prompt through both models: its PromptResult, and per hidden state the max |diff| and max |h|.

    Adds the seconds spent to timings["forward_ours"], ["forward_transformers"], ["greedy_ours"], ...."""

    def timed(key: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        timings[key] = (timings.get(key) or 0.0) + time.perf_counter() - t0
        return out

    x = torch.tensor([ids], device=model.lm_head.weight.device)
    states_a, logits_a = timed("forward_ours", ours_forward, model, x)
    states_b, logits_b = timed("forward_transformers", transformers_forward, reference, x.to(reference.device))
    diffs = [_max_diff(a, b) for a, b in zip(states_a, states_b, strict=True)]
    scales = [a.abs().max().item() for a in states_a]

    ours = timed("greedy_ours", greedy_ours, model, ids, max_new_tokens, tokenizer.eos_id)
    theirs = timed("greedy_transformers", greedy_transformers, reference, ids, max_new_tokens, tokenizer.eos_id)
    first = next((i for i, (p, q) in enumerate(zip(ours, theirs, strict=False)) if p != q), None)
    if first is None and len(ours) != len(theirs):  # one stopped at end-of-text earlier
        first = min(len(ours), len(theirs))
    last_a, last_b = logits_a[0, -1], logits_b[0, -1]
    result = PromptResult(
        prompt=prompt, input_ids=list(ids),
        logits_max_abs_diff=_max_diff(logits_a, logits_b), last_logits_max_abs_diff=_max_diff(last_a, last_b),
        top_ours=_top(last_a, tokenizer, TOP_K), top_transformers=_top(last_b, tokenizer, TOP_K),
        greedy_ours=ours, greedy_transformers=theirs,
        text_ours=tokenizer.decode(ours), text_transformers=tokenizer.decode(theirs),
        greedy_identical=first is None, first_divergent_token=first,
    )
    return result, diffs, scales


def judge(report: Report) -> None:
    """Fill in `failures` and `first_divergent_layer` from the measured differences."""
    tol, failures = report.tolerance, []
    totals = report.parameters_total
    if totals["ours"] != totals["transformers"]:
        failures.append(f"parameter totals differ: ours {totals['ours']:,} vs transformers {totals['transformers']:,}")
    for row in report.parameters:
        if row.differing:
            shown = ", ".join(row.differing[:3]) + (" ..." if len(row.differing) > 3 else "")
            failures.append(f"weights differ beyond {tol:g}: {shown}" if row.max_abs_diff is not None
                            else f"weights missing on one side or of different shapes: {shown}")
    states = [report.embeddings, *report.layers, report.final_norm]
    bad = [s for s in states if not s.max_abs_diff <= tol]  # NaN is a difference too
    report.first_divergent_layer = next(
        (i for i, layer in enumerate(report.layers) if not layer.max_abs_diff <= tol), None
    )
    if bad:
        failures.append(f"hidden states differ beyond {tol:g} from {bad[0].name} on "
                        f"({bad[0].max_abs_diff:.3g} there; {len(bad)} of {len(states)} states differ)")
    for p in report.prompts:
        if not p.logits_max_abs_diff <= tol:
            failures.append(f"logits differ by {p.logits_max_abs_diff:.3g} > {tol:g} on {p.prompt!r}")
        if not p.greedy_identical:
            failures.append(f"greedy continuations differ from token {p.first_divergent_token} on {p.prompt!r}")
    report.failures = failures
