"""Defaults that the command line shows in --help, in a module that imports nothing (no torch, no numpy).

`smollm2 COMMAND --help` builds every parser without loading torch, so the values the options print as their
defaults cannot come from the torch-using modules that use them. They live here, once, and those modules take
them from here:

    quant/quantize.py     MODES, DEFAULT_MODE                = QUANTIZE_MODES, DEFAULT_QUANTIZE
    inference/config.py   GenerationConfig's field defaults  = MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P, MIN_P,
                                                               REPETITION_PENALTY, DRAFT_TOKENS, DRAFT_NGRAM
    inference/speculative.py MODES                           = SPECULATIVE_MODES
    inference/engine.py   DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFIX_CACHE_MB = the same names
    train/prepare.py      MIN_VAL_DOCUMENTS, prepare's val_fraction = MIN_VAL_DOCUMENTS, VAL_FRACTION
    bench/inference.py    OUR_MODES, PEERS                   = QUANTIZE_MODES, BENCH_PEERS
    eval/parity.py        DEFAULT_PROMPTS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_TOLERANCE
                          = COMPARE_PROMPTS, COMPARE_MAX_NEW_TOKENS, COMPARE_TOLERANCE

(tests/test_cli.py checks that each of those names equals its value here.)
"""

# ---- weights (quant/quantize.py: what each mode costs)-----------------------------------------------------------
QUANTIZE_MODES = ("none", "bf16", "int8", "int4")
DEFAULT_QUANTIZE = "int4"  # the fastest decode that keeps quality (+0.1-0.3% perplexity on held-out text)

# ---- generation (inference/config.py: GenerationConfig)--------------------------------------------------------------
MAX_NEW_TOKENS = 256
TEMPERATURE = 0.0  # 0 = greedy
TOP_K = 0  # 0 = off
TOP_P = 1.0  # 1 = off
MIN_P = 0.0  # 0 = off
REPETITION_PENALTY = 1.0  # 1 = off
SPECULATIVE_MODES = ("prompt-lookup",)  # speculative decoding's drafters (inference/speculative.py)
DRAFT_TOKENS = 8  # tokens drafted at most per verify forward (k)
DRAFT_NGRAM = 3  # the longest suffix matched when drafting (n, tried down to 1)

# ---- training data (train/prepare.py: `smollm2 prepare`) -------------------------------------------------------
VAL_FRACTION = 0.1  # share of the tokens held out for validation
MIN_VAL_DOCUMENTS = 10  # hold out whole documents once this many would be held out

# ---- serving (inference/engine.py: Engine) ---------------------------------------------------------------------
DEFAULT_MAX_BATCH = 32  # requests generated together, as one batch
DEFAULT_MAX_QUEUE = 64  # requests that may wait for a row before new ones get 429
DEFAULT_PREFIX_CACHE_MB = 256  # keys/values of prompt prefixes kept for reuse (46 KB a token in fp32: ~5.7k tokens)

# ---- `smollm2 bench` (bench/inference.py) -------------------------------------------------------------------------
BENCH_PEERS = ("transformers", "llama.cpp")

# ---- `smollm2 compare` (eval/parity.py) ------------------------------------------------------------------------
COMPARE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Gravity is the force that",
    "Once upon a time, in a small village,",
)
COMPARE_MAX_NEW_TOKENS = 20
COMPARE_TOLERANCE = 1e-4
