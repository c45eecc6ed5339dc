"""Our SmolLM2 as a model of EleutherAI's lm-evaluation-harness (`lm-eval`), registered as `smollm2`.

lm-eval finds a model only after the module that registers it has been imported, and its own `lm_eval`
command never imports ours. So run it through this module, which imports the adapter and then hands every
argument to lm-eval's command line:

    python -m smollm2.lm_eval_adapter --model smollm2 --tasks hellaswag --limit 100
    python -m smollm2.lm_eval_adapter --model smollm2 --model_args source=path/to/model,dtype=bfloat16 \\
        --tasks my_task --include_path my_tasks/ --apply_chat_template

From Python: `import smollm2.eval.lm_eval_adapter`, then `lm_eval.simple_evaluate(model="smollm2", ...)`, or pass
`SmolLM2LM(model=..., tokenizer=...)` as the model. --model_args: source (or pretrained; default: the bundled
SmolLM2-135M-Instruct GGUF), dtype (float32 | bfloat16), max_length, max_gen_toks. --batch_size is the number
of contexts per forward pass. lm-eval is an optional extra (`pip install lm-eval`): nothing else in smollm2
imports this file (`python -m smollm2.lm_eval_adapter` is a shim that runs it).

Scoring is `smollm2.eval.scoring.score_groups`: requests with the same context share one pass over it, as the
choices of a multiple-choice question do. `generate_until` decodes greedily with smollm2.generate_batch.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..model import SmolLM2
from ..tokenizer import Tokenizer
from .scoring import score_groups

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@register_model("smollm2")
class SmolLM2LM(TemplateLM):
    """lm-eval's three request types (loglikelihood, loglikelihood_rolling, generate_until) on our model."""

    def __init__(
        self,
        source: str | None = None,
        pretrained: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        device: str | None = None,
        model: SmolLM2 | None = None,
        tokenizer: Tokenizer | None = None,
        **unused: Any,  # lm-eval passes harness-wide options (max_batch_size, ...) to every model
    ) -> None:
        super().__init__()
        if model is None:
            from ..loading import load

            if dtype not in _DTYPES:
                raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
            if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
                device = "cpu"  # lm-eval's --device defaults to cuda; its own hf model falls back too
            model, tokenizer = load(source or pretrained, dtype=_DTYPES[dtype], device=device)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        if unused:
            log.debug("ignoring lm-eval options %s", sorted(unused))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = getattr(model, "source", None) or source or pretrained or "smollm2"
        # "auto" (lm-eval's batch-size search) has nothing to search for on a CPU: use the default.
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.max_length = int(max_length) if max_length is not None else model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self._device = model.lm_head.weight.device

    # ---- tokens ----------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        assert eos is not None, "the tokenizer has no end-of-sequence token"
        return eos

    @property
    def prefix_token_id(self) -> int:
        # What an empty context becomes: "<|endoftext|>" separated SmolLM2's pretraining documents.
        try:
            return self.tokenizer.token_id("<|endoftext|>")
        except ValueError:
            return self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)  # SmolLM2's tokenizer adds no BOS/EOS either way

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return f"smollm2:{self.name}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        rendered = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        assert isinstance(rendered, str)
        return rendered

    # ---- log-likelihoods -------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request, contexts shared within a batch."""
        # Group requests by context: a multiple-choice question's choices then share one pass over it.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens is longer than "
                                 f"max_length={self.max_length}")
            # Keep the end of an over-long context, as lm-eval's own models do; the last token of a
            # request is only predicted, so max_length + 1 tokens fit.
            keep = self.max_length + 1 - len(continuation)
            groups.setdefault(tuple(context[-keep:]), []).append(i)
        # Longest first, so a batch holds groups of similar length and little padding.
        order = sorted(groups, key=lambda c: -(len(c) + max(len(requests[i][2]) for i in groups[c])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pad_id = self.tokenizer.pad_id or 0
        with tqdm(total=len(requests), disable=disable_tqdm, desc="smollm2 loglikelihood") as bar:
            for start in range(0, len(order), self.batch_size):
                contexts = order[start : start + self.batch_size]
                batch = [[(context, requests[i][2]) for i in groups[context]] for context in contexts]
                for context, scores in zip(contexts, score_groups(self.model, batch, pad_id), strict=True):
                    for i, score in zip(groups[context], scores, strict=True):
                        results[i] = (score.logprob, score.greedy)
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                        bar.update(1)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts (perplexity), in windows of max_length tokens that each predict new tokens."""
        windows: list[tuple[int, list[int], list[int]]] = []  # (request, context, continuation)
        for r, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((r, context, continuation))
        totals = [0.0] * len(requests)
        scored = self._loglikelihood_tokens([(None, c, k) for _, c, k in windows],  # type: ignore[misc]
                                            disable_tqdm=disable_tqdm)
        for (r, _, _), (logprob, _) in zip(windows, scored, strict=True):
            totals[r] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop string; requests with equal options share a batch."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from ..inference.generate import generate_batch

        eos = self.tok_decode([self.eot_token_id])
        jobs: dict[tuple[int, tuple[str, ...]], list[int]] = {}  # (max new tokens, stops) -> request indices
        prompts: list[list[int]] = []
        warned = False
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample") and not warned:
                log.warning("smollm2 decodes greedily; ignoring the sampling options in %s", gen_kwargs)
                warned = True
            stops = tuple(s for s in handle_stop_sequences(kwargs.get("until"), eos=eos) if s)
            max_new = int(kwargs["max_gen_toks"])
            if not 0 < max_new < self.max_length:
                raise ValueError(f"max_gen_toks={max_new} must be in 1..{self.max_length - 1} (max_length)")
            # Keep the end of an over-long context, leaving room for the new tokens.
            prompts.append(self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id])
            jobs.setdefault((max_new, stops), []).append(i)
        outputs: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="smollm2 generate_until") as bar:
            for (max_new, stops), indices in jobs.items():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    new_ids = generate_batch(self.model, [prompts[i] for i in batch], tokenizer=self.tokenizer,
                                             max_new_tokens=max_new, temperature=0.0, stop=stops,
                                             eos_ids=(self.eot_token_id,))
                    for i, ids in zip(batch, new_ids, strict=True):
                        text = self.tok_decode(ids)
                        # The token that completes a stop string is generated too: cut at the first stop.
                        outputs[i] = text[: min((text.find(s) for s in stops if s in text), default=len(text))]
                        self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
                        bar.update(1)
        return outputs


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with `--model smollm2` registered (this module is imported by then)."""
    import lm_eval.models  # noqa: F401  (register lm-eval's own models too: it skips that once one is registered)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
