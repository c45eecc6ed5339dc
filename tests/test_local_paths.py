"""`resolve` (smollm2.load's first step): a local path that looks like a hub id ("org/name") but exists on disk in
some broken form is an error saying what is wrong with it, never a hub query carrying a local path; a hub id
that fails says both possibilities."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smollm2.loading import resolve


@pytest.fixture
def no_hub(monkeypatch):
    import huggingface_hub

    calls = []

    def offline(repo_id, **kwargs):
        calls.append(repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    return calls


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad").mkdir()
    return tmp_path


def test_broken_link_is_named(in_tmp: Path, no_hub: list) -> None:
    os.symlink("/nonexistent/model", "bad/link")
    with pytest.raises(ValueError, match=r"^bad/link: a broken symbolic link \(to /nonexistent/model, which does "
                                         r"not exist\)"):
        resolve("bad/link")
    assert no_hub == []


def test_link_loop_is_named(in_tmp: Path, no_hub: list) -> None:
    os.symlink("loopB", "bad/loopA")
    os.symlink("loopA", "bad/loopB")
    with pytest.raises(ValueError, match=r"^bad/loopA: a symbolic link loop"):
        resolve("bad/loopA")
    assert no_hub == []


def test_broken_parent_and_file_parent(in_tmp: Path, no_hub: list) -> None:
    os.symlink("/nonexistent", "gone")
    with pytest.raises(ValueError, match=r"gone/model: gone is a broken symbolic link \(to /nonexistent\)"):
        resolve("gone/model")
    Path("notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"notes.txt/model: a parent of this path is a file"):
        resolve("notes.txt/model")
    assert no_hub == []


def test_a_fifo_is_neither_file_nor_directory(in_tmp: Path, no_hub: list) -> None:
    os.mkfifo("bad/pipe")
    with pytest.raises(ValueError, match=r"bad/pipe: exists but is neither a regular file nor a directory"):
        resolve("bad/pipe")
    assert no_hub == []


def test_hub_id_failing_says_both_possibilities(in_tmp: Path, no_hub: list, monkeypatch) -> None:
    with pytest.raises(ConnectionError, match=r"^someone/model: there is no local file or directory someone/model, "
                                              r"and cannot download someone/model: the Hugging Face hub is "
                                              r"unreachable"):
        resolve("someone/model")
    assert no_hub == ["someone/model"]  # only a path that does not exist locally goes to the hub

    from smollm2 import loading

    def missing(repo_id: str) -> Path:  # what download() raises for a repository the hub does not have
        raise ValueError(f"{repo_id}: not found on the Hugging Face hub (RepositoryNotFoundError)")

    monkeypatch.setattr(loading, "download", missing)
    with pytest.raises(ValueError, match=r"^bad/model: there is no local file or directory bad/model, and not found "
                                         r"on the Hugging Face hub"):
        resolve("bad/model")  # bad/ exists, bad/model does not: a hub id as far as the disk can tell
