"""`smollm2 train --autoresume`: a job scheduler relaunches the same command after every crash. SIGKILLed at random
moments (before the first checkpoint, while a checkpoint is written, between steps) and relaunched unchanged, the run
ends with the same weights, bit for bit, and the same per-step losses as one that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from train_utils import assert_bitwise_equal, byte_corpus, checkpoint_tensors, metrics, tiny_model_json

from smollm2.cli import main

STEPS = 20


def command(data: Path, run: Path, model: Path, **changes: str) -> list[str]:
    settings = {"--data": str(data), "--out": str(run), "--model": str(model), "--steps": str(STEPS),
                "--batch-size": "4", "--seq-len": "32", "--warmup": "5", "--eval-every": "0", "--sample-every": "0",
                "--save-every": "2", "--keep-last": "2", "--log-every": "1", "--device": "cpu", **changes}
    return ["train", "--autoresume", *(part for item in settings.items() for part in item)]


def launch(argv: list[str], log: Path) -> int:
    """The command in a forked child (SIGKILL needs a process; fork skips the seconds of importing torch again)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: run the command, never return into pytest
        rc = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # New streams on fds 1 and 2: under pytest's capture sys.stdout is its own file, which the fork
            # inherits, so the step lines would never reach the log the parent watches. Line-buffered: the parent
            # watches them as they come.
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            torch.set_num_threads(1)
            _instrument()
            rc = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    return pid


def _instrument() -> None:
    """In the child: a few ms more per file fsynced, so a kill can land while a checkpoint is half written (a tiny
    model's checkpoint is otherwise written in a millisecond or two, between two polls of the parent); and no
    loss.png, which this test does not check and which costs more than the tiny model's steps."""
    from smollm2.train import checkpoint, loop

    loop.plot_losses = lambda path, history: True

    fsync = checkpoint._fsync_file

    def slow_fsync(path: Path) -> None:
        time.sleep(0.003)
        fsync(path)

    checkpoint._fsync_file = slow_fsync


def wait(pid: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the training command did not finish in {timeout} s")


def kill_when(pid: int, run: Path, log: Path, trigger: str, count: int, delay: float) -> bool:
    """SIGKILL the child when its trigger fires (True), or return False if it exits first."""
    checkpoints, seen_writes = run / "checkpoints", set()
    offset = log.stat().st_size if log.exists() else 0
    start = time.monotonic()
    while time.monotonic() - start < 120:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, log.read_text()
            return False
        if trigger == "start":
            fired = time.monotonic() - start >= delay
        elif trigger == "write":  # a checkpoint being written: its temp directory exists
            if checkpoints.is_dir():
                seen_writes |= {p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-step_")}
            fired = len(seen_writes) >= count
        else:  # "step": this launch has logged `count` steps, and the next one is under way
            text = log.read_bytes()[offset:].decode(errors="replace")
            fired = len(re.findall(r"step \d+/\d+ \| loss", text)) >= count
        if fired:
            if trigger != "start":
                time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"trigger {trigger} x {count} never fired:\n{log.read_text()}")


def losses(run: Path) -> dict[int, float]:
    rows = [row for row in metrics(run) if "loss" in row]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    return {row["step"]: row["loss"] for row in rows}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    # imported once here, so each forked launch does not spend seconds importing it again (the optimizer does)
    import torch._dynamo  # noqa: F401

    return byte_corpus(tmp_path / "data", n_train=2000, n_val=300), tiny_model_json(tmp_path)


def test_sigkill_and_relaunch_ten_times_is_bitwise_an_uninterrupted_run(tmp_path: Path, setup) -> None:
    data, model = setup
    reference = tmp_path / "reference"
    started = time.monotonic()
    assert wait(launch(command(data, reference, model), tmp_path / "reference.log")) == 0
    print(f"## reference {time.monotonic() - started:.2f} s")

    run, log = tmp_path / "run", tmp_path / "run.log"
    rng = random.Random(19)
    plan = ["start", "write", "step", "write", "start", "step", "write", "step", "write", "step"]
    kills: list[str] = []
    for trigger in plan:
        count = rng.randint(1, 2) if trigger == "write" else rng.randint(1, 4)
        delay = rng.uniform(0.0, 0.4) if trigger == "start" else rng.uniform(0.0, 0.003)
        started = time.monotonic()
        killed = kill_when(launch(command(data, run, model), log), run, log, trigger, count, delay)
        kills += [trigger] if killed else []
        print(f"## {trigger} x {count} (+{delay:.3f} s): {'killed' if killed else 'finished'} after "
              f"{time.monotonic() - started:.2f} s")
    assert len(kills) == 10, f"the run finished after {len(kills)} kills: {kills}"
    assert wait(launch(command(data, run, model), log)) == 0  # the last relaunch runs to the end

    assert_bitwise_equal(checkpoint_tensors(run), checkpoint_tensors(reference))
    assert_bitwise_equal(checkpoint_tensors(run, "optimizer.safetensors"),
                         checkpoint_tensors(reference, "optimizer.safetensors"))
    assert losses(run) == losses(reference) and sorted(losses(run)) == list(range(1, STEPS + 1))
    text = log.read_text()
    assert "resuming" in text, "no relaunch resumed from a checkpoint"
    assert "Traceback" not in text

    # once more, after the end: nothing to do, and success (a scheduler may relaunch a finished job)
    again = tmp_path / "again.log"
    assert wait(launch(command(data, run, model), again)) == 0
    assert f"is already at step {STEPS}: nothing to do" in again.read_text()


def test_autoresume_refuses_other_settings_and_starts_fresh_runs(tmp_path: Path, setup,
                                                                capsys: pytest.CaptureFixture) -> None:
    data, model = setup
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step_000002-99").mkdir(parents=True)  # a write killed before the first checkpoint
    assert main(command(data, run, model, **{"--steps": "4"})) == 0
    assert "training" in capsys.readouterr().out
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert main(command(data, run, model, **{"--steps": "4", "--lr": "0.001"})) == 2
    err = capsys.readouterr().err
    assert "--autoresume: --lr is 0.001, but the run in" in err and "was started with 0.003" in err
    assert main([*command(data, run, model), "--resume", str(run)]) == 2
    assert "--autoresume and --resume" in capsys.readouterr().err
    # a run whose checkpoints are all corrupt is an error, never a silent fresh start over it
    for checkpoint in (run / "checkpoints").glob("step_*"):
        weights = checkpoint / "model.safetensors"
        data_bytes = bytearray(weights.read_bytes())
        data_bytes[-5] ^= 0xFF
        weights.write_bytes(bytes(data_bytes))
    assert main(command(data, run, model, **{"--steps": "4"})) == 2
    assert "no checkpoint verifies" in capsys.readouterr().err
    assert json.loads((run / "checkpoints" / "step_000004" / "COMPLETE").read_text())["step"] == 4
