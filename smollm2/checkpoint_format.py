"""The on-disk layout of a training run's checkpoints, and finding the newest complete one (no torch).

    RUN_DIR/checkpoints/step_000500/    one checkpoint (smollm2/train/checkpoint.py writes and reads its files)
    RUN_DIR/checkpoints/step_000500/COMPLETE
                                        written last: {"step": N, "files": {name: size in bytes},
                                        "sha256": {name: hex digest}}; a directory without it is a half-written
                                        checkpoint, which readers ignore

Every reader verifies the sizes and checksums before using a checkpoint: a run directory resolves to its newest
checkpoint that verifies (a warning names each corrupt one passed over), and a corrupt checkpoint named directly,
or a run with no good one, is an error naming the file. Weights are never trained on or served unverified.

Both `smollm2.load(RUN_DIR)` (loading.py) and the trainer (train/) open runs through this module, so the library
never imports the training package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # subdirectory of the run directory
COMPLETE = "COMPLETE"
FORMAT = "smollm2-checkpoint-v1"  # trainer.json's "format"
DIGEST = "sha256"  # the marker's checksums: the fastest of hashlib's strong hashes here (SHA-NI), ~0.9 GB/s
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
    """A checkpoint directory, or a run directory meaning its newest complete checkpoint; verified either way."""
    return verified_checkpoint(path)[0]


def verified_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(checkpoint, step): the checkpoint named, or a run directory's newest one that verifies (check_complete).

    Corrupt checkpoints of a run are passed over with a warning naming the bad file; if none verifies, or the
    checkpoint named directly does not, the ValueError names the files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    if (path / COMPLETE).is_file():
        return path, check_complete(path)
    if _NAME.match(path.name) or path.name.startswith(".tmp-"):
        raise ValueError(f"{path}: incomplete checkpoint (no {COMPLETE} marker: its write was interrupted)")
    found = list_checkpoints(path)
    if not found:
        raise ValueError(f"{path}: no complete checkpoint in {path / CHECKPOINTS}")
    problems = []
    for checkpoint in reversed(found):
        try:
            step = check_complete(checkpoint)
        except ValueError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("%s; falling back to %s, the newest checkpoint that verifies", "; ".join(problems),
                        checkpoint)
        return checkpoint, step
    raise ValueError(f"{path}: no checkpoint verifies:\n  " + "\n  ".join(problems))


def file_digest(path: Path) -> str:
    """The hex checksum of a file, read in 8 MiB pieces (a 135M checkpoint's 1.6 GB in ~2 s)."""
    digest = hashlib.new(DIGEST)
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def completion_marker(directory: Path, step: int) -> dict:
    """The COMPLETE marker for a checkpoint directory's files: their sizes and checksums."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != COMPLETE)
    return {"step": step, "files": {p.name: p.stat().st_size for p in files},
            DIGEST: {p.name: file_digest(p) for p in files}}


def check_complete(path: Path) -> int:
    """The step of a complete checkpoint whose files all have the sizes and checksums its COMPLETE marker lists."""
    try:
        marker = json.loads((path / COMPLETE).read_text(encoding="utf-8"))
        step, files = int(marker["step"]), dict(marker["files"])
        digests = dict(marker.get(DIGEST, {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable {COMPLETE} marker ({e})") from None
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            found = file.stat().st_size if file.is_file() else "missing"
            raise ValueError(f"{file}: {found} bytes, but the checkpoint was written with {size}")
    if not digests:  # written before checksums were recorded: the sizes are all there is to check
        log.warning("%s: its %s marker records no checksums; only file sizes were verified", path, COMPLETE)
    for name, expected in digests.items():
        file = path / name
        if not file.is_file() or file_digest(file) != expected:
            raise ValueError(f"{file}: corrupt ({DIGEST} checksum differs from the one recorded when the checkpoint "
                             "was written)")
    return step
