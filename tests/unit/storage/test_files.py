"""Files and directories that are whole or absent, and on disk before a name points at them."""

import os

from storage.files import atomic_directory, fsync_tree


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
