"""`python -m smollm2.lm_eval_adapter ...`: lm-eval's command line with our model registered (needs the eval extra).

The adapter lives in smollm2/eval/lm_eval_adapter.py; this name is kept so the documented command keeps working.
"""

from .eval.lm_eval_adapter import SmolLM2LM, main

__all__ = ["SmolLM2LM", "main"]

if __name__ == "__main__":
    main()
