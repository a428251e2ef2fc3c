"""Atomic artifacts: contents and directory entries are flushed to disk before and after the rename."""

import os

import pytest

from esft.io import atomic_dir, write_json_atomic


@pytest.fixture
def disk_events(monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name file descriptors")
def test_atomic_dir_fsyncs_files_and_directories_around_the_rename(tmp_path, disk_events):
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "adapter.safetensors").write_bytes(b"weights")
        (tmp / "sub" / "meta.json").write_text("{}")
    publish = next(i for i, e in enumerate(disk_events) if e[0] == "replace" and e[2] == str(tmp_path / "adapter"))
    before = [e[1] for e in disk_events[:publish] if e[0] == "fsync"]
    assert str(tmp / "adapter.safetensors") in before and str(tmp / "sub" / "meta.json") in before
    assert str(tmp) in before and str(tmp / "sub") in before  # directory entries of the new tree
    after = [e[1] for e in disk_events[publish:] if e[0] == "fsync"]
    assert str(tmp_path) in after  # the rename itself
    assert (tmp_path / "adapter" / "adapter.safetensors").read_bytes() == b"weights"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name file descriptors")
def test_write_json_atomic_fsyncs_the_file_then_its_directory(tmp_path, disk_events):
    write_json_atomic(tmp_path / "state.json", {"step": 3})
    kinds = [(e[0], e[-1]) for e in disk_events]
    i = next(i for i, k in enumerate(kinds) if k == ("replace", str(tmp_path / "state.json")))
    assert any(k[0] == "fsync" and ".state.json." in k[1] for k in kinds[:i])
    assert ("fsync", str(tmp_path)) in kinds[i:]
