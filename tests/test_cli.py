"""The command line starts without torch: `smollm2 --help` and `smollm2 COMMAND --help` for every command build
their parsers from torch-free modules (the defaults they show are smollm2/defaults.py's), and `import smollm2`
exports its names lazily.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smollm2.cli import COMMANDS

REPO = Path(__file__).resolve().parent.parent

# Runs `python -m smollm2 ARGS...`, noting which smollm2 lines led to the first `import torch` (changing nothing).
_PROBE = r"""
import json, runpy, sys, traceback

first = []


class WhoImportsTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not first:
            first.extend(f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "smollm2" in f.filename)
        return None


sys.meta_path.insert(0, WhoImportsTorch())
sys.argv = ["smollm2", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("smollm2", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code or 0
sys.stdout.flush()
print("\nPROBE " + json.dumps({"code": code, "torch": "torch" in sys.modules, "via": first}), file=sys.stderr)
"""


def _probe(*args: str) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("PROBE ")]
    assert lines, proc.stderr
    return proc.stdout, json.loads(lines[-1].removeprefix("PROBE "))


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_no_torch(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    out, result = _probe(*args)
    assert result["code"] == 0, out
    assert out.startswith("usage: smollm2"), out
    assert not result["torch"], f"`smollm2 {' '.join(args)}` imported torch, through:\n  " + "\n  ".join(result["via"])


def test_help_lists_every_command() -> None:
    out, _ = _probe("--help")
    listed = out.split("COMMAND", 1)[1]
    for name, (_, help_text) in COMMANDS.items():
        assert f"    {name} " in listed and help_text in " ".join(listed.split()), name


def test_the_installed_script_imports_no_torch() -> None:
    script = Path(sys.executable).parent / "smollm2"
    if not script.is_file():
        pytest.skip(f"no {script}: the package is not installed in this environment")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0 and "usage: smollm2" in proc.stdout, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "smollm2.cli" in imported  # (the profile is there)
    assert "torch" not in imported


def test_import_smollm2_is_lazy_and_exports_its_names() -> None:
    code = """
import sys
import smollm2
assert "torch" not in sys.modules, "import smollm2 imported torch"
assert set(smollm2.__all__) <= set(dir(smollm2))
import smollm2.inference.engine  # imports smollm2.inference.generate first: `smollm2.generate` is the function
from smollm2 import (Config, GenerationConfig, SmolLM2, Tokenizer, chat, generate, generate_batch, load,
                     save_pretrained, stream_text)
assert generate is smollm2.generate and callable(generate), generate
assert generate.__module__ == "smollm2.inference.generate", generate.__module__
assert sys.modules["smollm2.inference.generate"].generate is generate
assert GenerationConfig.__module__ == "smollm2.inference.config"
assert load.__module__ == "smollm2.loading" and SmolLM2.__module__ == "smollm2.model"
try:
    smollm2.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("smollm2.no_such_name")
from smollm2 import quant, loading  # submodules and subpackages import as names of the package
assert (quant.__name__, loading.__name__) == ("smollm2.quant", "smollm2.loading")
from smollm2.quant import quantize
assert quantize.__name__ == "smollm2.quant.quantize"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_the_defaults_are_the_librarys() -> None:
    """The values --help shows (smollm2/defaults.py) are the ones the library uses."""
    import dataclasses
    import inspect

    from smollm2 import defaults
    from smollm2.bench import inference as bench
    from smollm2.eval import parity as compare
    from smollm2.inference import engine
    from smollm2.inference.config import GenerationConfig
    from smollm2.quant import quantize
    from smollm2.train import prepare as data

    fields = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}
    assert {k: fields[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                                   "repetition_penalty", "seed")} == {
        "max_new_tokens": defaults.MAX_NEW_TOKENS, "temperature": defaults.TEMPERATURE, "top_k": defaults.TOP_K,
        "top_p": defaults.TOP_P, "min_p": defaults.MIN_P, "repetition_penalty": defaults.REPETITION_PENALTY,
        "seed": None}
    assert (quantize.MODES, quantize.DEFAULT_MODE) == (defaults.QUANTIZE_MODES, defaults.DEFAULT_QUANTIZE)
    assert (engine.DEFAULT_MAX_BATCH, engine.DEFAULT_MAX_QUEUE) == (defaults.DEFAULT_MAX_BATCH,
                                                                    defaults.DEFAULT_MAX_QUEUE)
    assert (bench.OUR_MODES, bench.PEERS) == (defaults.QUANTIZE_MODES, defaults.BENCH_PEERS)
    assert (compare.DEFAULT_PROMPTS, compare.DEFAULT_MAX_NEW_TOKENS, compare.DEFAULT_TOLERANCE) == (
        defaults.COMPARE_PROMPTS, defaults.COMPARE_MAX_NEW_TOKENS, defaults.COMPARE_TOLERANCE)
    assert data.MIN_VAL_DOCUMENTS == defaults.MIN_VAL_DOCUMENTS
    assert inspect.signature(data.prepare).parameters["val_fraction"].default == defaults.VAL_FRACTION


def test_the_parsers_defaults() -> None:
    """Each command's defaults as parsed: the library's (above), whatever module they are read from."""
    from smollm2 import defaults
    from smollm2.cli import build_parser

    parser = build_parser()
    generate = parser.parse_args(["generate", "hi"])
    assert (generate.source, generate.quantize, generate.compile) == (None, defaults.DEFAULT_QUANTIZE, False)
    assert (generate.max_new_tokens, generate.temperature, generate.top_k, generate.top_p, generate.min_p,
            generate.repetition_penalty, generate.seed, generate.stop) == (
        defaults.MAX_NEW_TOKENS, defaults.TEMPERATURE, defaults.TOP_K, defaults.TOP_P, defaults.MIN_P,
        defaults.REPETITION_PENALTY, None, None)
    assert parser.parse_args(["chat"]).quantize == defaults.DEFAULT_QUANTIZE
    serve = parser.parse_args(["serve"])
    assert (serve.max_concurrency, serve.max_queue, serve.quantize) == (
        defaults.DEFAULT_MAX_BATCH, defaults.DEFAULT_MAX_QUEUE, defaults.DEFAULT_QUANTIZE)
    for command in (["eval", "--data", "x"], ["evaluate"]):
        assert parser.parse_args(command).quantize == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--data", "x", "--quantize", "int3"])
    bench = parser.parse_args(["bench"])
    assert (bench.modes, bench.against) == (defaults.QUANTIZE_MODES, defaults.BENCH_PEERS)
    compare = parser.parse_args(["compare"])
    assert (compare.prompts, compare.max_new_tokens, compare.tolerance) == (
        list(defaults.COMPARE_PROMPTS), defaults.COMPARE_MAX_NEW_TOKENS, defaults.COMPARE_TOLERANCE)
    assert parser.parse_args(["prepare", "--input", "a", "--out", "b"]).val_fraction == defaults.VAL_FRACTION


def test_python_m_smollm2_bench_is_smollm2_bench() -> None:
    proc = subprocess.run([sys.executable, "-m", "smollm2.bench", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "usage: smollm2 bench" in proc.stdout and "--modes" in proc.stdout
