"""The package's import structure: every module imports without the optional extras, and no import circles.

  - every module of smollm2 imports in a process where the optional extras (transformers, fastapi, lm-eval, ...)
    cannot be imported; only a module whose whole purpose is an extra, and says so, may need it at import time
  - no circle among smollm2's modules in what they import at module level (what runs on `import`)
  - no circle even counting the imports inside functions, and the layers point one way (LAYERS, lowest first):
    the model < quant/ < inference/ < loading < eval/, serve/, bench/ < train/ < the command line (cli.py,
    commands/); every module is in a layer, so a new one must be placed
  - argparse only in the command line (cli.py and commands/)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import smollm2

PACKAGE = Path(smollm2.__file__).parent
EXTRAS = ("transformers", "accelerate", "fastapi", "starlette", "uvicorn", "matplotlib", "lm_eval", "llama_cpp",
          "playwright", "openai", "httpx")
# Modules whose whole purpose is an extra, importing it at module level (their docstrings say so): the extra.
NEEDS_EXTRA = {
    "smollm2.eval.lm_eval_adapter": "lm_eval",  # defines a subclass of lm-eval's TemplateLM; nothing else imports it
    "smollm2.lm_eval_adapter": "lm_eval",  # `python -m smollm2.lm_eval_adapter`: imports the one above
    "smollm2.serve.app": "fastapi",  # the FastAPI app; smollm2.serve imports it when create_app is asked for
}
NOT_IMPORTED = {"smollm2.__main__"}  # `python -m smollm2`: importing it runs the command line

_IMPORT_ALL = r"""
import importlib, json, pkgutil, sys, traceback

EXTRAS = set(sys.argv[1].split(","))
SKIP = set(sys.argv[2].split(","))


class BlockExtras:  # as if none of the optional extras were installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in EXTRAS:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: an optional extra)", name=name)
        return None


sys.meta_path.insert(0, BlockExtras())
import smollm2

failed, names = {}, ["smollm2"]
def walk_error(name):
    failed[name] = {"missing": None, "error": "walk_packages could not import it: " + traceback.format_exc()[-3000:]}


for info in pkgutil.walk_packages(smollm2.__path__, "smollm2.", onerror=walk_error):
    if info.name not in SKIP:
        names.append(info.name)
for name in names:
    try:
        importlib.import_module(name)
    except BaseException as e:
        failed[name] = {"missing": getattr(e, "name", None) if isinstance(e, ImportError) else None,
                        "error": "".join(traceback.format_exception(e))[-3000:]}
print(json.dumps({"imported": names, "failed": failed}))
"""


def test_every_module_imports_without_the_optional_extras() -> None:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, ",".join(EXTRAS), ",".join(NOT_IMPORTED)],
                          capture_output=True, text=True, timeout=600, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["imported"]) | NOT_IMPORTED == set(_modules()), "pkgutil and the files disagree"
    failed = result["failed"]
    unexpected = {name: f["error"] for name, f in failed.items() if f["missing"] != NEEDS_EXTRA.get(name)}
    assert not unexpected, "\n\n".join(f"{name}:\n{error}" for name, error in unexpected.items())
    for name in NEEDS_EXTRA:  # ... and those say so in their docstrings
        assert " extra" in (ast.get_docstring(_parse(name)) or ""), f"{name}: say that it needs an extra"


def test_no_import_circles_at_module_level() -> None:
    """What `import smollm2.X` runs: imports outside functions, not under `if TYPE_CHECKING:`."""
    graph = _graph(functions=False)
    cycles = _cycles(graph)
    assert not cycles, "import circles at module level:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_circles_and_layers_point_one_way() -> None:
    """The same counting the imports inside functions too (they run on first use): still no circle, and the
    layers (LAYERS) point one way: the model needs no application, no application the trainer, nothing the
    command line."""
    graph = _graph(functions=True)
    cycles = _cycles(graph)
    assert not cycles, "import circles, counting imports inside functions:\n" + "\n".join(" -> ".join(c)
                                                                                      for c in cycles)
    wrong = [f"{a} ({LAYERS[_layer(a)][0]}) -> {b} ({LAYERS[_layer(b)][0]})"
             for a, deps in sorted(graph.items()) for b in sorted(deps) if _layer(b) > _layer(a)]
    assert not wrong, ("imports against the layers (" + " < ".join(n for n, _ in LAYERS) + "):\n"
                       + "\n".join(wrong))


def test_argparse_only_in_the_command_line() -> None:
    users = []
    for name in _modules():
        if _layer(name) == LAYER_CLI:
            continue
        for node, _ in _imports(_parse(name), functions=True, main_block=True):
            if any(target.partition(".")[0] == "argparse" for target in _targets(node, name)):
                users.append(f"{name}:{node.lineno}")
    assert not users, f"argparse outside cli.py and commands/: {users}"


# ---- reading the modules ------------------------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _parse(name: str) -> ast.Module:
    path = _modules()[name]
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_guard(test: ast.expr) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def _imports(tree: ast.AST, functions: bool, main_block: bool = False,
             in_function: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import statement, inside a function) for the imports that run on import, or also on a call (functions),
    skipping `if TYPE_CHECKING:` blocks and, unless main_block, `if __name__ == "__main__":` ones (a script's)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if functions:
                yield from _imports(node, functions, main_block, True)
        elif isinstance(node, ast.If) and (_is_type_checking(node.test) or
                                           (_is_main_guard(node.test) and not main_block)):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), functions, main_block, in_function)
        else:
            yield from _imports(node, functions, main_block, in_function)


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The modules an import statement imports, absolute ("smollm2.data", "argparse")."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = importer if _modules()[importer].name == "__init__.py" else importer.rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    modules = _modules()
    return [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]


def _graph(functions: bool) -> dict[str, set[str]]:
    """smollm2 module -> the smollm2 modules it imports. Importing a.b.c runs a and a.b too: those count, except
    the importer's own packages (already running when it is)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name in modules:
        for node, _ in _imports(_parse(name), functions):
            for target in _targets(node, name):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in modules and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) for each group of modules that import each other (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # a shortest way from the group's first module back to itself, inside the group
        start, members = group[0], set(group)
        paths = {w: [start, w] for w in sorted(graph[start]) if w in members}
        queue = list(paths)
        while start not in paths:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w in members and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
        cycles.append(paths[start])
    return cycles


# The layers, lowest first: a module may import its own layer and those below, never one above. The top level
# loads and runs the model; the subpackages are the applications built on it.
LAYERS = (
    ("the model", ("smollm2", "smollm2.config", "smollm2.defaults", "smollm2.model", "smollm2.kv_cache",
                   "smollm2.tokenizer", "smollm2.weights", "smollm2.gguf", "smollm2.checkpoint_format",
                   "smollm2.lora", "smollm2.hooks")),
    ("quantisation", ("smollm2.quant", "smollm2.kernels")),  # smollm2.kernels: `python -m smollm2.kernels`
    ("inference", ("smollm2.inference",)),
    # load(source, quantize=, compile=) assembles a model from the layers below: weights, quant/, the compiled step
    ("loading", ("smollm2.loading",)),
    ("applications", ("smollm2.eval", "smollm2.serve", "smollm2.bench", "smollm2.lm_eval_adapter",
                      "smollm2.interp")),
    ("training", ("smollm2.train",)),
    ("the command line", ("smollm2.cli", "smollm2.commands", "smollm2.__main__", "smollm2.bench.__main__")),
)
LAYER_CLI = len(LAYERS) - 1


def _layer(name: str) -> int:
    """The layer of a module: the last (most specific) entry of LAYERS that it is or lies under."""
    found = [i for i, (_, names) in enumerate(LAYERS) for n in names
             if name == n or (n != "smollm2" and name.startswith(n + "."))]
    assert found, f"{name} is in no layer: add it to LAYERS"
    return found[-1]


def test_every_module_is_in_a_layer() -> None:
    assert {_layer(name) for name in _modules()} == set(range(len(LAYERS)))


def test_the_circle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
