"""Checksums of a directory of files written by several processes: a training state.

Each writer lists its share of the directory's files — every ``world_size``-th by name — with
their size and CRC-32C (Castagnoli, as the replay log's record batches) in
``checksums-rank-NNN.json``, once every file is written and before the directory is published.
Before a state is loaded, ``verify`` reads every file once against those lists: a flipped bit, a
truncated or missing file, or a lost list is named, so the loader can take its fallback instead of
meeting a torn tensor (safetensors and DeepSpeed's files check their headers, not their data).

Shares keep the reading spread: on a cluster each worker reads its own part of a state that may
be many gigabytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from storage import files

FORMAT = "forgetless-checksums-1"
PREFIX = "checksums-rank-"
_CHUNK = 8 << 20


def file_crc32c(path: str | os.PathLike) -> tuple[int, int]:
    """A file's size in bytes and CRC-32C, read in 8 MiB chunks."""
    import google_crc32c  # imported here: the native module is only needed once a checksum is taken

    checksum, size = google_crc32c.Checksum(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            checksum.update(chunk)
            size += len(chunk)
    return size, int.from_bytes(checksum.digest(), "big")


def _is_list(path: Path) -> bool:
    return path.name.startswith(PREFIX) and path.suffix == ".json"


def _names(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and not p.is_symlink() and not _is_list(p))


def write_share(directory: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Take the checksums of writer ``rank``'s share of ``directory``'s files and list them in
    ``checksums-rank-NNN.json`` (not fsynced: the caller fsyncs the directory's files before it
    publishes them). Call it once every writer has finished its files."""
    directory = Path(directory)
    share = {}
    for name in _names(directory)[rank::world_size]:
        size, crc = file_crc32c(directory / name)
        share[name] = {"bytes": size, "crc32c": crc}
    path = directory / f"{PREFIX}{rank:03d}.json"
    files.observe("write", path)
    path.write_text(json.dumps({"format": FORMAT, "rank": rank, "world_size": world_size, "files": share}),
                    encoding="utf-8")
    return path


def verify(directory: str | os.PathLike) -> list[str]:
    """Every problem of a directory against its checksum lists, each naming its file: a list
    unreadable or missing, a listed file missing, of another size or another CRC-32C. Empty: every
    file is as written. A directory with no list at all (a state saved before checksums were
    taken) has nothing to check against, and passes.
    """
    directory = Path(directory)
    lists = sorted(p for p in directory.glob(f"{PREFIX}*.json"))
    if not lists:
        return []
    problems, listed, world_sizes = [], {}, set()
    for path in lists:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, {FORMAT} expected")
            world_sizes.add(int(data["world_size"]))
            for name, entry in data["files"].items():
                listed[name] = (int(entry["bytes"]), int(entry["crc32c"]))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{path}: unreadable checksum list ({type(exc).__name__}: {exc})")
    for world_size in sorted(world_sizes):
        missing = [f"{PREFIX}{rank:03d}.json" for rank in range(world_size)
                   if not (directory / f"{PREFIX}{rank:03d}.json").is_file()]
        if missing:
            problems.append(f"{directory}: checksum list(s) {', '.join(missing)} missing, so some of its files "
                            "cannot be checked")
    for name, (size, crc) in sorted(listed.items()):
        path = directory / name
        if not path.is_file() or path.is_symlink():
            problems.append(f"{path}: missing (its checksum list names it)")
            continue
        found_size, found_crc = file_crc32c(path)
        if found_size != size:
            problems.append(f"{path}: {found_size} bytes, {size} when it was saved (truncated or overwritten)")
        elif found_crc != crc:
            problems.append(f"{path}: fails its checksum (CRC-32C {found_crc:08x}, {crc:08x} when it was saved)")
    return problems
