"""Measuring the model: against the original, on text, and on the model card's tasks.

  parity.py           `smollm2 compare`: our model beside transformers' on the same weights, block by block
  perplexity.py       perplexity over a token file, in rolling windows
  tasks.py            the model card's zero-shot tasks: reading them, prompts, and the card's own scores
  scoring.py          log-likelihood scoring of a task's choices (contexts shared across choices)
  lm_eval_adapter.py  our model as an lm-evaluation-harness model (the eval extra)
"""
