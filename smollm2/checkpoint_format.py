"""The on-disk layout of a training run's checkpoints, and finding the newest complete one (no torch).

    RUN_DIR/checkpoints/step_000500/    one checkpoint (smollm2/train/checkpoint.py writes and reads its files)
    RUN_DIR/checkpoints/step_000500/COMPLETE
                                        written last: {"step": N, "files": {name: size in bytes}}; a directory
                                        without it is a half-written checkpoint, which readers ignore

Both `smollm2.load(RUN_DIR)` (loading.py) and the trainer (train/) open runs through this module, so the library
never imports the training package.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINTS = "checkpoints"  # subdirectory of the run directory
COMPLETE = "COMPLETE"
FORMAT = "smollm2-checkpoint-v1"  # trainer.json's "format"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (by step)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None. Half-written ones are never returned."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory meaning its newest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    if (path / COMPLETE).is_file():
        return path
    if _NAME.match(path.name) or path.name.startswith(".tmp-"):
        raise ValueError(f"{path}: incomplete checkpoint (no {COMPLETE} marker: its write was interrupted)")
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path}: no complete checkpoint in {path / CHECKPOINTS}")
    return latest


def check_complete(path: Path) -> int:
    """The step of a complete checkpoint whose files all have the sizes its COMPLETE marker lists."""
    try:
        marker = json.loads((path / COMPLETE).read_text(encoding="utf-8"))
        step, files = int(marker["step"]), dict(marker["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable {COMPLETE} marker ({e})") from None
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            found = file.stat().st_size if file.is_file() else "missing"
            raise ValueError(f"{file}: {found} bytes, but the checkpoint was written with {size}")
    return step
