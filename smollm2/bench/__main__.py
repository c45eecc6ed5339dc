"""`python -m smollm2.bench ...`: `smollm2 bench ...`; with `--worker SPEC`, one configuration's process."""

import sys

if sys.argv[1:2] == ["--worker"] and len(sys.argv) == 3:
    from .inference import worker_main

    raise SystemExit(worker_main(sys.argv[2]))
# Anything else is `smollm2 bench` (its options are parsed in smollm2/commands/bench.py).
from ..cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))
