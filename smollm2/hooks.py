"""Named hook points on the model's one forward: capture activations and edit them, by TransformerLens's names.

    with smollm2.capture(model, ["blocks.11.attn.hook_pattern", "blocks.*.hook_resid_post"]) as acts:
        model(input_ids)
    acts["blocks.11.attn.hook_pattern"]                 # (batch, head, query_pos, key_pos)

    with smollm2.hooks.edit(model, {"blocks.3.attn.hook_z": zero(heads=[4]),          # knock out a head
                                    "blocks.5.hook_resid_pre": patch(clean, positions=[2]),  # from another run
                                    "blocks.7.hook_mlp_out": add(direction)}):
        logits = model(input_ids)

Every module of smollm2/model.py calls `self.hook(point, x)` where an activation is worth looking at; the
hook is `model.no_hook` (returns x) until a context here sets one on that module, for the points asked for
only, and puts `no_hook` back on exit. A forward with no hook set is the plain model (the same bits, and the
compiled decode step keeps its one graph); while any hook is set, `model.compiled_step` is put aside, so that
`generate` and friends run the eager forward that calls them.

Names and shapes are TransformerLens's (docs/hooks.md lists them for 135M): `hook_embed`,
`blocks.{i}.hook_resid_pre`, `blocks.{i}.ln1.hook_normalized`, `blocks.{i}.attn.hook_q` ... `hook_z`,
`blocks.{i}.hook_attn_out`, `blocks.{i}.mlp.hook_pre`, `blocks.{i}.hook_resid_post`, `ln_final.hook_normalized`,
and `hook_logits` (ours). Heads sit on axis 2 of q/k/v/z, (batch, pos, head, d_head), as there; keys and
values have the model's 3 key/value heads, not 9 copies. A name may drop the `hook_` of its last part
("blocks.11.attn.pattern") and may be a glob ("blocks.*.hook_resid_post"). `hook_attn_scores` and
`hook_pattern` exist only when asked for: a layer hooked there attends by an explicit softmax(q k^T / sqrt(d))
(transformers' eager attention) instead of SDPA, which agrees to float rounding.

With a KV cache each forward sees only its new positions (q, k, v, z, the residual stream) and the keys
attended so far (the pattern's key axis). `capture` keeps every forward's tensors (`Activations.calls`);
`acts[name]` joins them along the position axis, padding patterns to the widest key axis, so a prefill plus
decode steps read like one forward over the whole sequence.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import Attention, AttentionFn, SmolLM2, no_hook

# edit(activation, name) -> the activation to carry on with, or None to keep it (after editing it in place)
EditFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]
Index = int | slice | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class Point:
    """One kind of hook point: where it sits and the axes of its activation (TransformerLens's layout)."""

    name: str  # e.g. "blocks.{i}.attn.hook_q"
    axes: tuple[str, ...]
    meaning: str
    head_major: bool = False  # the model holds it as (batch, head, pos, d_head): shown transposed


# In forward order. The module of a point is its name's prefix: "" the model, blocks.{i} a Block, blocks.{i}.ln1/ln2
# its two RMSNorms, .attn its Attention, .mlp its MLP, ln_final the final norm.
POINTS = (
    Point("hook_embed", ("batch", "pos", "d_model"), "token embeddings: the residual stream entering block 0"),
    Point("blocks.{i}.hook_resid_pre", ("batch", "pos", "d_model"), "residual stream entering the block"),
    Point("blocks.{i}.ln1.hook_normalized", ("batch", "pos", "d_model"),
          "x / rms(x) before the attention, before the norm's weight"),
    Point("blocks.{i}.attn.hook_q", ("batch", "pos", "head", "d_head"), "queries, before RoPE"),
    Point("blocks.{i}.attn.hook_k", ("batch", "pos", "kv_head", "d_head"), "keys, before RoPE"),
    Point("blocks.{i}.attn.hook_v", ("batch", "pos", "kv_head", "d_head"), "values"),
    Point("blocks.{i}.attn.hook_rot_q", ("batch", "pos", "head", "d_head"), "queries after RoPE", True),
    Point("blocks.{i}.attn.hook_rot_k", ("batch", "pos", "kv_head", "d_head"),
          "keys after RoPE (what the KV cache stores)", True),
    Point("blocks.{i}.attn.hook_attn_scores", ("batch", "head", "query_pos", "key_pos"),
          "q k^T / sqrt(d_head), -inf where masked (explicit attention)"),
    Point("blocks.{i}.attn.hook_pattern", ("batch", "head", "query_pos", "key_pos"),
          "softmax of the scores: the attention pattern (explicit attention)"),
    Point("blocks.{i}.attn.hook_z", ("batch", "pos", "head", "d_head"),
          "each head's weighted sum of values, before o_proj", True),
    Point("blocks.{i}.hook_attn_out", ("batch", "pos", "d_model"), "the attention's output (after o_proj)"),
    Point("blocks.{i}.hook_resid_mid", ("batch", "pos", "d_model"), "residual stream after the attention"),
    Point("blocks.{i}.ln2.hook_normalized", ("batch", "pos", "d_model"), "x / rms(x) before the MLP"),
    Point("blocks.{i}.mlp.hook_pre", ("batch", "pos", "d_mlp"), "gate_proj(x), before silu"),
    Point("blocks.{i}.mlp.hook_pre_linear", ("batch", "pos", "d_mlp"), "up_proj(x)"),
    Point("blocks.{i}.mlp.hook_post", ("batch", "pos", "d_mlp"), "silu(gate) * up, the input of down_proj"),
    Point("blocks.{i}.hook_mlp_out", ("batch", "pos", "d_model"), "the MLP's output"),
    Point("blocks.{i}.hook_resid_post", ("batch", "pos", "d_model"),
          "residual stream leaving the block (= the next block's resid_pre)"),
    Point("ln_final.hook_normalized", ("batch", "pos", "d_model"), "x / rms(x) of the final norm"),
    Point("hook_logits", ("batch", "pos", "d_vocab"), "the output logits (ours; TransformerLens has none)"),
)
_BY_TEMPLATE = {p.name: p for p in POINTS}
_EXPLICIT = ("hook_attn_scores", "hook_pattern")  # points that exist only in the explicit attention


# ---- names -------------------------------------------------------------------------------------------------


def hook_names(model: SmolLM2) -> list[str]:
    """Every hook point of the model, in forward order: 18 per block and 3 more (543 for 135M)."""
    per_block = [p.name for p in POINTS if "{i}" in p.name]
    return (["hook_embed"] + [t.format(i=i) for i in range(model.config.num_hidden_layers) for t in per_block]
            + ["ln_final.hook_normalized", "hook_logits"])


def point(name: str) -> Point:
    """The kind of point a full name is: its axes and meaning (`point("blocks.3.attn.hook_z").axes`)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        parts[1] = "{i}"
    found = _BY_TEMPLATE.get(".".join(parts))
    if found is None:
        raise ValueError(f"unknown hook point {name!r}")
    return found


def resolve(model: SmolLM2, names: str | Iterable[str]) -> list[str]:
    """Full hook-point names for exact names, short ones ("blocks.3.attn.pattern") and globs ("blocks.*.hook_z").

    An unknown name raises ValueError listing the valid ones."""
    if not isinstance(model, SmolLM2):
        raise TypeError(f"hook points need a smollm2 SmolLM2 model, got {type(model).__name__}")
    if isinstance(names, str):
        names = [names]
    valid = hook_names(model)
    known = set(valid)
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"hook point names are strings, got {name!r}")
        full = _canonical(name)
        if any(c in full for c in "*?["):
            matched = [v for v in valid if fnmatch.fnmatchcase(v, full)]
            if not matched:
                raise ValueError(f"{name!r} matches no hook point. {_valid_help(model)}")
            out += matched
        elif full in known:
            out.append(full)
        else:
            raise ValueError(_unknown(model, name, full, valid))
    return list(dict.fromkeys(out))  # in the order asked, once each


def _canonical(name: str) -> str:
    head, _, last = name.strip().rpartition(".")
    if not last.startswith("hook_") and last != "*":
        last = "hook_" + last
    return f"{head}.{last}" if head else last


def _unknown(model: SmolLM2, name: str, full: str, valid: list[str]) -> str:
    n = model.config.num_hidden_layers
    parts = full.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].lstrip("-").isdigit():
        layer = int(parts[1])
        if not 0 <= layer < n:
            return f"unknown hook point {name!r}: the model has {n} blocks, blocks.0 to blocks.{n - 1}"
    close = difflib.get_close_matches(full, valid, n=3, cutoff=0.75)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown hook point {name!r}{hint}. {_valid_help(model)}"


def _valid_help(model: SmolLM2) -> str:
    last = model.config.num_hidden_layers - 1
    listed = ", ".join(p.name.replace("{i}", f"{{0..{last}}}") for p in POINTS)
    return f"The hook points are: {listed} (smollm2.hooks.hook_names(model) lists each one)"


# ---- the hooks set on the model's modules --------------------------------------------------------------------


class _ModuleHook:
    """A module's `hook` while some of its points are hooked: runs their edit functions, in the order added."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # "blocks.3.attn." for an Attention, "" for the model
        self.fns: dict[str, list[EditFn]] = {}
        self.saved_attention: AttentionFn | None = None  # an Attention's own function, while explicit

    def __call__(self, local: str, x: torch.Tensor) -> torch.Tensor:
        fns = self.fns.get(local)
        if not fns:
            return x
        name = self.prefix + local
        transposed = _BY_TEMPLATE[_template(name)].head_major
        shown = x.transpose(1, 2) if transposed else x  # (B, heads, T, hd) -> (B, T, heads, hd)
        for fn in fns:
            new = fn(shown, name)
            if new is not None:
                if not isinstance(new, torch.Tensor) or new.shape != shown.shape:
                    got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise ValueError(f"the hook on {name} returned {got}, expected a tensor of shape "
                                     f"{tuple(shown.shape)} (or None to keep the activation)")
                shown = new.to(dtype=shown.dtype, device=shown.device)
        return shown.transpose(1, 2) if transposed else shown


class _ModelHook(_ModuleHook):
    """The model's own hook (hook_embed, hook_logits), which also holds what is put aside while hooked."""

    def __init__(self) -> None:
        super().__init__("")
        self.users = 0  # contexts open on this model
        self.compiled_step: Callable[..., torch.Tensor] | None = None


def _template(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks":
        parts[1] = "{i}"
    return ".".join(parts)


def _module_of(model: SmolLM2, name: str) -> tuple[torch.nn.Module, str, str]:
    """(module, prefix, local point name) for a full hook-point name."""
    head, _, local = name.rpartition(".")
    if head == "":
        return model, "", local
    if head == "ln_final":
        return model.model.norm, "ln_final.", local
    parts = head.split(".")
    block = model.model.layers[int(parts[1])]
    sub = {None: block, "ln1": block.input_layernorm, "ln2": block.post_attention_layernorm,
           "attn": block.self_attn, "mlp": block.mlp}[parts[2] if len(parts) > 2 else None]
    return sub, head + ".", local


@contextlib.contextmanager
def edit(model: SmolLM2, edits: Mapping[str, EditFn]) -> Iterator[None]:
    """Run `fn(activation, name)` at each named point while the context is open (names may be short or globs).

    fn returns the activation to carry on with (same shape), or None to keep it. Contexts nest; at a point
    hooked by several, the one opened first runs first."""
    resolved: list[tuple[str, EditFn]] = []
    for pattern, fn in edits.items():
        if not callable(fn):
            raise TypeError(f"the hook for {pattern!r} must be callable (activation, name) -> tensor or None, "
                            f"got {type(fn).__name__}")
        resolved += [(name, fn) for name in resolve(model, pattern)]
    top = model.hook if isinstance(model.hook, _ModelHook) else _ModelHook()
    if top.users == 0:
        model.hook = top
        top.compiled_step, model.compiled_step = model.compiled_step, None
    top.users += 1
    installed: list[tuple[torch.nn.Module, _ModuleHook, str, EditFn]] = []
    try:
        for name, fn in resolved:
            module, prefix, local = _module_of(model, name)
            hook = module.hook if isinstance(module.hook, _ModuleHook) else _ModuleHook(prefix)
            module.hook = hook
            hook.fns.setdefault(local, []).append(fn)
            installed.append((module, hook, local, fn))
            if local in _EXPLICIT and isinstance(module, Attention) and hook.saved_attention is None:
                hook.saved_attention = module.attention
                module.attention = _explicit_attention(hook)
        yield
    finally:
        for module, hook, local, fn in reversed(installed):
            fns = hook.fns[local]
            del fns[len(fns) - 1 - fns[::-1].index(fn)]  # this context's, the last added
            if not fns:
                del hook.fns[local]
            if hook.saved_attention is not None and not any(p in hook.fns for p in _EXPLICIT):
                module.attention, hook.saved_attention = hook.saved_attention, None
            if not hook.fns and hook is not top:
                module.hook = no_hook
        top.users -= 1
        if top.users == 0:
            model.compiled_step, top.compiled_step = top.compiled_step, None
            model.hook = no_hook


def _explicit_attention(hook: _ModuleHook) -> AttentionFn:
    """softmax(q k^T / sqrt(d) + mask) v written out, as transformers' eager attention, with the scores and the
    pattern passed through the layer's hook."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, n_head, S, hd)
        scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5  # (B, n_head, T, S)
        T, S = scores.shape[-2:]
        if mask is None:  # causal, the T queries being the last T of the S keys
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = hook("hook_attn_scores", scores.masked_fill(~mask, float("-inf")))
        pattern = hook("hook_pattern", F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        return torch.matmul(pattern, v)

    return attend


# ---- capturing ---------------------------------------------------------------------------------------------


class Activations(Mapping[str, torch.Tensor]):
    """What `capture` recorded: `acts[name]` (short names work too), `acts.calls(name)` per forward."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self._calls: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def _record(self, detach: bool) -> EditFn:
        def record(x: torch.Tensor, name: str) -> None:
            self._calls[name].append(x.detach().clone() if detach else x)
            return None

        return record

    def _key(self, name: str) -> str:
        full = _canonical(name)
        if full not in self._calls:
            raise KeyError(f"{name!r} was not captured; captured: {', '.join(self.names) or 'nothing'}")
        return full

    def calls(self, name: str) -> list[torch.Tensor]:
        """The activation at `name` from each forward that ran in the context, in order."""
        return list(self._calls[self._key(name)])

    def __getitem__(self, name: str) -> torch.Tensor:
        full = self._key(name)
        calls = self._calls[full]
        if not calls:
            raise KeyError(f"{full}: no forward ran through it while capturing")
        if len(calls) == 1:
            return calls[0]
        return _join(full, calls)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}: {[tuple(t.shape) for t in self._calls[n]]}" for n in self.names[:4])
        more = f", ... ({len(self.names)} points)" if len(self.names) > 4 else ""
        return f"Activations({shown}{more})"


def _join(name: str, calls: list[torch.Tensor]) -> torch.Tensor:
    """One tensor for several forwards (a prefill, then decode steps): joined along the position axis."""
    axes = point(name).axes
    pos = axes.index("query_pos") if "query_pos" in axes else axes.index("pos")
    # a forward with output="last_logits" computes the final norm and logits at one position: (B, D)
    calls = [t.unsqueeze(pos) if t.ndim == len(axes) - 1 else t for t in calls]
    if len({t.shape[0] for t in calls}) > 1:
        raise ValueError(f"{name}: the forwards captured had different batch sizes; use acts.calls({name!r})")
    if "key_pos" in axes:  # pad every key axis to the widest: 0 attention (-inf score) on keys not yet there
        width = max(t.shape[-1] for t in calls)
        fill = float("-inf") if name.endswith("hook_attn_scores") else 0.0
        calls = [F.pad(t, (0, width - t.shape[-1]), value=fill) for t in calls]
    return torch.cat(calls, dim=pos)


@contextlib.contextmanager
def capture(model: SmolLM2, names: str | Iterable[str], *, detach: bool = True) -> Iterator[Activations]:
    """Record the activations at `names` (full, short or globs) of every forward run inside the context.

    detach: keep copies cut from the autograd graph (the default); False keeps the tensors themselves, for
    gradients with respect to them. Captures made inside an `edit` context see the edited activations."""
    acts = Activations(resolve(model, names))
    record = acts._record(detach)
    with edit(model, {name: record for name in acts.names}):
        yield acts


# ---- edits ---------------------------------------------------------------------------------------------------


def _where(name: str, x: torch.Tensor, positions: Index, heads: Index) -> torch.Tensor | None:
    """A boolean mask broadcastable to x, True at `positions` (position axis) and `heads` (head axis); None
    when neither is given (all of x)."""
    if positions is None and heads is None:
        return None
    axes = point(name).axes
    if x.ndim == len(axes) - 1:  # output="last_logits": the final norm and logits have no position axis
        if positions is not None:
            raise ValueError(f"{name}: this forward computed the last position only; positions= does not apply")
        axes = tuple(a for a in axes if a != "pos")
    mask = torch.ones([1] * x.ndim, dtype=torch.bool, device=x.device)
    for axis_names, chosen, what in ((("pos", "query_pos"), positions, "positions"),
                                     (("head", "kv_head"), heads, "heads")):
        if chosen is None:
            continue
        axis = next((i for i, a in enumerate(axes) if a in axis_names), None)
        if axis is None:
            raise ValueError(f"{name} has no {what[:-1]} axis (its axes: {', '.join(axes)}); {what}= does not apply")
        size = x.shape[axis]
        picked = torch.zeros(size, dtype=torch.bool)
        if isinstance(chosen, slice):
            picked[chosen] = True
        else:
            index = torch.as_tensor([chosen] if isinstance(chosen, int) else chosen, dtype=torch.long).reshape(-1)
            if not bool(((index >= -size) & (index < size)).all()):
                raise ValueError(f"{name}: {what} {index.tolist()} out of range for its {axes[axis]} axis of "
                                 f"size {size}")
            picked[index] = True
        shape = [1] * x.ndim
        shape[axis] = size
        mask = mask & picked.to(x.device).view(shape)
    return mask


def zero(*, positions: Index = None, heads: Index = None) -> EditFn:
    """Set the activation to zero (ablate), at some positions and/or heads only if given."""

    def fn(x: torch.Tensor, name: str) -> torch.Tensor:
        mask = _where(name, x, positions, heads)
        return torch.zeros_like(x) if mask is None else x.masked_fill(mask, 0)

    return fn


def add(delta: torch.Tensor | float, *, positions: Index = None, heads: Index = None) -> EditFn:
    """Add delta (broadcast against the activation: e.g. a (d_model,) direction) to it, at some positions
    and/or heads only if given."""

    def fn(x: torch.Tensor, name: str) -> torch.Tensor:
        d = torch.as_tensor(delta, dtype=x.dtype, device=x.device)
        try:
            added = x + d
        except RuntimeError:
            added = None
        if added is None or added.shape != x.shape:
            raise ValueError(f"{name}: cannot add a tensor of shape {tuple(d.shape)} to its activation, of shape "
                             f"{tuple(x.shape)}")
        mask = _where(name, x, positions, heads)
        return added if mask is None else torch.where(mask, added, x)

    return fn


def replace(value: torch.Tensor, *, positions: Index = None, heads: Index = None) -> EditFn:
    """Replace the activation (or the selected part of it) by `value`, of the activation's full shape (a batch
    of 1 serves every row)."""
    return patch(value, positions=positions, heads=heads)


def patch(source: Mapping[str, torch.Tensor] | torch.Tensor, *, positions: Index = None,
          heads: Index = None) -> EditFn:
    """Take the activation from another run: `source` is that run's `Activations` (or a tensor), captured at
    the same point; only `positions` / `heads` of it if given. A source with a batch of 1 serves every row."""

    def fn(x: torch.Tensor, name: str) -> torch.Tensor:
        if isinstance(source, torch.Tensor):
            src = source
        else:
            try:
                src = source[name]
            except KeyError:
                raise ValueError(f"patch: the source run has no activation at {name}: capture it there") from None
        if src.shape[1:] != x.shape[1:] or src.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"patch at {name}: the source is {tuple(src.shape)}, this run's activation "
                             f"{tuple(x.shape)} (the two runs need the same number of tokens)")
        src = src.to(dtype=x.dtype, device=x.device).expand_as(x)
        mask = _where(name, x, positions, heads)
        return src.clone() if mask is None else torch.where(mask, src, x)

    return fn
