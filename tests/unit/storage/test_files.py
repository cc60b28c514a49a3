"""Files and directories that are whole or absent, and on disk before a name points at them."""

import errno
import os

import pytest

from storage import files
from storage.files import DiskFullError, atomic_directory, fsync_tree, write_atomic


def _recording_fsyncs(monkeypatch):
    """Every fsync's target, in order (by the path its descriptor was opened on)."""
    opened, synced = {}, []
    real_open, real_fsync = os.open, os.fsync

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = os.fspath(path)
        return fd

    def fsync(fd):
        synced.append(opened.get(fd, fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_a_directory_is_fsynced_file_by_file_before_its_rename_publishes_it(tmp_path, monkeypatch):
    synced = _recording_fsyncs(monkeypatch)
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((len(synced), os.fspath(b))), real_replace(a, b)))
    target = tmp_path / "checkpoint"
    with atomic_directory(target) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"w" * 10)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    [(synced_before_rename, name)] = renamed
    assert name == str(target)
    before = synced[:synced_before_rename]
    assert {os.path.basename(p) for p in before} >= {"weights.safetensors", "config.json", "sub"}
    assert synced[-1] == str(tmp_path)  # then the parent, so the rename itself survives
    assert (target / "sub" / "config.json").read_text() == "{}"


def test_fsync_tree_leaves_links_alone(tmp_path, monkeypatch):
    (tmp_path / "a").write_text("x")
    (tmp_path / "link").symlink_to("/etc/hostname")
    synced = _recording_fsyncs(monkeypatch)
    fsync_tree(tmp_path)
    assert str(tmp_path / "a") in synced and str(tmp_path / "link") not in synced and synced[-1] == str(tmp_path)


def test_a_full_disk_is_named_with_the_space_free_and_the_old_file_or_directory_stands(tmp_path):
    target = tmp_path / "report.json"
    write_atomic(target, "old")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "weights").write_bytes(b"w" * 5000)

    def full(operation, *paths):
        if operation in ("write", "fsync"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    files.set_observer(full)
    try:
        with pytest.raises(DiskFullError, match=r"no space left on the device holding .*report.json: .* free of .*, "
                                                r"about 3 B is needed .*the last one stands"):
            write_atomic(target, "new")
        with pytest.raises(DiskFullError, match=r"holding .*state: .* free of .*, about 4\.9 KiB is needed"):
            with atomic_directory(tmp_path / "state") as tmp:
                (tmp / "weights").write_bytes(b"x" * 10)
    finally:
        files.set_observer(None)
    assert target.read_text() == "old" and (tmp_path / "state" / "weights").read_bytes() == b"w" * 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "state"]  # nothing half-written left
