"""A run's output directory: one run at a time, never silently mixed with another's files.

``OutputDir.claim`` takes an exclusive lock for the life of the run (a second run is told which
process holds it), refuses a directory that already holds a run unless the run is resumed or
``overwrite=true`` empties it first, and knows where each artifact lives. ``config_changes``
decides what a resumed or extended run may change: anything that would make the finished rows
mean something else is refused, with every difference listed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.config import experiment_dict, validate_config
from pipelines.errors import ConfigError, DataError, ForgetlessError
from pipelines.report import RunReport
from storage.files import write_atomic
from storage.journal import TAG

LOCK_NAME = ".forgetless.lock"
# What a run hands MLflow as artifacts when it ends.
REPORT_FILES = ("acc_matrix.json", "acc_heatmap.png", "config.yaml", "report.json")
# What a run writes into its output_dir (the replay store may live elsewhere: replay.directory).
RUN_ARTIFACTS = ("report.json", "acc_matrix.json", "acc_heatmap.png", "config.yaml", "tokenizer", "checkpoints",
                 "state", "replay", "ray", "mlflow-pending.jsonl", "example_scores")


class OutputDirBusyError(ForgetlessError, RuntimeError):
    """Another live process holds the output directory's lock."""


CREATED = ".forgetless-created.json"  # in output_dir: what this run made, the only things overwrite deletes
STAGED_TOKENIZER = ".tokenizer.new"  # a replacing run's tokenizer, until the old run is gone
# What a replay store writes into its directory (storage.replay, actors.replay), and its lock:
# overwrite deletes the first three and nothing else there.
REPLAY_STORE_FILES = ("store.json", "shard-*", "retired-*", LOCK_NAME)


class OutputDir:
    """The output directory of one run, locked while the run lives."""

    def __init__(self, path: str | Path, *, replay_dir: str | Path | None = None):
        self.path = Path(path)
        self.replay_dir = Path(replay_dir) if replay_dir else self.path / "replay"
        self.replacing = False  # claimed with overwrite: the old run goes once the new one is known to be valid
        self._lock_files: list[Any] = []

    # ------------------------------------------------------------------ where things are
    @property
    def report(self) -> Path:
        return self.path / "report.json"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        """The run's tokenizer; while a run replaces an older one, beside it until the old one goes."""
        return self.path / (STAGED_TOKENIZER if self.replacing else "tokenizer")

    @property
    def example_scores(self) -> Path:
        """Each eval example's score, per matrix row: ``baseline.json``, ``after-<k>.json`` (task -> scores)."""
        return self.path / "example_scores"

    @property
    def pending_mlflow(self) -> Path:
        return self.path / "mlflow-pending.jsonl"

    @property
    def _replay_outside(self) -> bool:
        return not self.replay_dir.resolve().is_relative_to(self.path.resolve())

    def holds_a_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_ARTIFACTS) or self._replay_has_files()

    def _replay_has_files(self) -> bool:
        return self.replay_dir.is_dir() and any(
            p.name != LOCK_NAME for pattern in REPLAY_STORE_FILES for p in self.replay_dir.glob(pattern))

    # ------------------------------------------------------------------ the lock
    def lock(self) -> None:
        """Take the exclusive lock (released when this process ends, however it ends), and the
        replay directory's when it lies outside the output directory: two runs never share either.

        Raises:
            OutputDirBusyError: naming the process that holds it.
            ConfigError: a lock file that is a symbolic link (it is never followed).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_files.append(_take_lock(self.path, "output_dir"))
        if self._replay_outside:
            try:
                self.replay_dir.mkdir(parents=True, exist_ok=True)
                self._lock_files.append(_take_lock(self.replay_dir, "replay.directory"))
            except BaseException:
                self.unlock()
                raise

    def is_locked_elsewhere(self) -> bool:
        """True while some live process holds this directory's lock (False if none, or it died)."""
        path = self.path / LOCK_NAME
        if not path.exists() or path.is_symlink():
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing releases a lock taken here
        return False

    def unlock(self) -> None:
        for handle in reversed(self._lock_files):
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._lock_files = []

    # ------------------------------------------------------------------ claiming it for a run
    def claim(self, *, resume: bool, overwrite: bool) -> bool:
        """Lock the directory for a run; returns True when there is a run to resume in it.

        With ``overwrite`` and an older run here, nothing is deleted yet: ``replacing`` is set, and
        ``replace_old_run`` deletes the old run once the new one has been validated.

        Raises:
            OutputDirBusyError: another live process runs in it.
            ConfigError: it holds a run, and neither ``resume`` nor ``overwrite`` was asked for;
                or ``overwrite`` of a directory that must never be emptied.
        """
        self.lock()
        try:
            if not self.holds_a_run():
                self._record_created()
                return False
            if resume:
                if not self.report.exists():
                    raise ConfigError(f"{self.path} holds files of a run but no report.json to resume from; "
                                      "start over with overwrite=true")
                return True
            if overwrite:
                self._check_replaceable()
                self.replacing = True
                return False
            raise ConfigError(
                f"output_dir {self.path} already holds a run (report, checkpoints or replay store). Resume it "
                f"with `forgetless resume {self.path}` (or resume=true), start over with overwrite=true (deletes "
                "its checkpoints and replay store), or choose another output_dir")
        except BaseException:
            self.unlock()
            raise

    def _check_replaceable(self) -> None:
        """Refuse to empty a directory that is plainly not a run's own: ``/``, the home directory,
        or the current directory with files of other kinds in it."""
        where = self.path.resolve()
        if where == Path(where.anchor) or where == Path.home().resolve():
            raise ConfigError(f"output_dir {self.path} is {where}: overwrite=true never empties it. Give each run a "
                              "directory of its own, e.g. output_dir=runs/<name>")
        if where == Path.cwd().resolve():
            others = sorted(p.name for p in where.iterdir()
                            if p.name not in (*RUN_ARTIFACTS, LOCK_NAME, CREATED, STAGED_TOKENIZER))
            if others:
                raise ConfigError(f"output_dir {self.path} is the current directory, which holds other files "
                                  f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): overwrite=true "
                                  "never empties it. Give the run a directory of its own, e.g. output_dir=runs/<name>")
        if not (self.path / CREATED).is_file() and not self.report.is_file():
            raise ConfigError(f"output_dir {self.path} holds files named like a run's but no record that Forgetless "
                              f"made them ({CREATED} or report.json): overwrite=true deletes only what a run made. "
                              "Choose another output_dir, or remove those files yourself")

    def replace_old_run(self) -> None:
        """The new run is valid: delete the old run's files (what it recorded making, nothing else),
        then put the new run's staged tokenizer in place. No-op unless claimed with ``overwrite``."""
        if not self.replacing:
            return
        staged = self.tokenizer
        self.empty()
        self.replacing = False
        if staged.is_dir():
            staged.rename(self.tokenizer)
        self._record_created()

    def discard_staged(self) -> None:
        """Remove what a replacing run prepared beside the old one (its tokenizer), if anything."""
        if self.replacing:
            _remove(self.tokenizer)

    def _record_created(self) -> None:
        """Note what this run makes here (``RUN_ARTIFACTS``): what ``overwrite`` may delete later."""
        write_atomic(self.path / CREATED, json.dumps({"names": list(RUN_ARTIFACTS)}))

    def _created_names(self) -> list[str]:
        try:
            record = json.loads((self.path / CREATED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        names = record.get("names") if isinstance(record, dict) and isinstance(record.get("names"), list) \
            else list(RUN_ARTIFACTS)  # a run from before the record: report.json vouches for it
        return [n for n in names if n in RUN_ARTIFACTS]  # a record edited to name more is cut back

    def empty(self) -> None:
        """Remove the run's own files: the names it recorded making (``RUN_ARTIFACTS`` at most) and
        the replay store's own files (``store.json``, ``shard-*``, ``retired-*``); anything else in
        either directory stays. A link is removed, never followed; lock files stay."""
        own_replay = self.path / "replay"
        for name in self._created_names():
            if self.path / name != own_replay:
                _remove(self.path / name)
        for store in dict.fromkeys((own_replay, self.replay_dir)):
            if store.is_symlink():  # the link goes, never what it points to
                if store == own_replay:
                    store.unlink()
            elif store.is_dir():
                for pattern in REPLAY_STORE_FILES[:-1]:
                    for target in store.glob(pattern):
                        _remove(target)
                if store == own_replay and not any(store.iterdir()):
                    store.rmdir()
        (self.path / CREATED).unlink(missing_ok=True)


def _remove(target: Path) -> None:
    """Delete a file or a directory tree; a symbolic link is unlinked, what it points to left alone."""
    if target.is_symlink() or target.is_file():
        target.unlink(missing_ok=True)
    elif target.is_dir():
        shutil.rmtree(target)  # does not follow links inside the tree


def open_lock_file(path: Path, key: str) -> Any:
    """Open (or create) a lock file for reading and writing, never through a symbolic link: a link
    planted there would have its target overwritten by the holder's line.

    Raises:
        ConfigError: the lock file is a link (or another non-file), naming it and ``key``.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise ConfigError(f"{path} is not a plain file (a symbolic link?); a lock file must be one ({key}). "
                              "Remove it and start again") from None
        raise
    return os.fdopen(fd, "r+", encoding="utf-8")


def _take_lock(directory: Path, key: str) -> Any:
    """Lock ``directory/.forgetless.lock`` (never through a link) and write who holds it."""
    handle = open_lock_file(directory / LOCK_NAME, key)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            handle.close()
            raise
        holder = handle.read(500).strip() or "another process"
        handle.close()
        raise OutputDirBusyError(
            f"{key} {directory} is in use by {holder}. One run per {key}: wait for it to end, stop it, or choose "
            f"another {key}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv[:4])[:200]})")
    handle.flush()
    return handle


# ---------------------------------------------------------------------------- paths a run's files name
def inside(root: str | Path, value: str | os.PathLike, *, file: str | Path, key: str,
           saved_root: str | Path | None = None) -> Path:
    """A path read from one of a run's own files, as a path inside the run's directory ``root``.

    A relative path is taken under ``root``; an absolute one only when it lies under ``root`` or
    under the directory the run was written in (``saved_root``: report.json's ``output_dir``), and
    it is then taken at the same place under ``root`` — a copied or moved run reads its own files, never the
    original's. After symlinks are followed the path must still lie under ``root``.

    Raises:
        DataError: anything else (an absolute path elsewhere, ``..`` out of the run, a link that
            leads out), naming ``file`` and ``key``.
    """
    named, root = Path(root), Path(root).resolve()
    given = Path(value)
    relative: Path | None = None
    if not given.is_absolute():
        relative = given
    else:
        for base in (root, named, saved_root):  # written here (through links or not), or where the run began
            try:
                relative = Path(os.path.normpath(given)).relative_to(Path(os.path.normpath(base)))
                break
            except (TypeError, ValueError):
                continue
    resolved = (root / relative).resolve() if relative is not None else None
    if resolved is None or not resolved.is_relative_to(root):
        raise DataError(f"{file}: {key} = {str(value)!r} points outside the run's directory {root}; a run reads only "
                        "its own files. The file may have been edited by someone else: restore it, or start over")
    return resolved


def contained_report(report: RunReport, root: str | Path) -> RunReport:
    """``report`` (read from ``root/report.json``) with every path it names checked by ``inside``
    and made absolute under ``root``; its replay checkpoint tag checked as a tag.

    Raises:
        DataError: a path that leads out of the run, or a tag that is not one, named.
    """
    file, saved = Path(root) / "report.json", report.output_dir
    report = report.model_copy(deep=True)
    if report.resume.training_state:
        report.resume.training_state = str(inside(root, report.resume.training_state, file=file,
                                                  key="resume.training_state", saved_root=saved))
    if report.resume.mid_task is not None:
        report.resume.mid_task.training_state = str(inside(root, report.resume.mid_task.training_state, file=file,
                                                           key="resume.mid_task.training_state", saved_root=saved))
    report.checkpoints = {name: str(inside(root, path, file=file, key=f"checkpoints.{name}", saved_root=saved))
                          for name, path in report.checkpoints.items()}
    tag = report.resume.replay_checkpoint
    if tag is not None and not TAG.fullmatch(tag):
        raise DataError(f"{file}: resume.replay_checkpoint = {tag!r} is not a checkpoint tag ({TAG.pattern})")
    return report


# ---------------------------------------------------------------------------- what a resume may change
# Dotted prefixes a resumed run may change: how fast or where it runs, and the tasks it has not
# finished. Everything else (seed, model, tokenizer, strategy, batch shape, precision, ZeRO stage,
# replay store layout, evaluation length, where MLflow writes) would change what the finished rows
# mean, or what the saved state can be loaded into.
MAY_CHANGE = (
    "stream.cache_dir", "training.lr", "training.weight_decay", "training.lr_schedule", "training.warmup_steps",
    "training.grad_clip", "training.epochs", "training.check_memory", "training.max_steps", "training.log_every_n_steps",
    "training.use_gpu", "training.cpus_per_worker", "evaluation.batch_size", "checkpoint.", "training.max_failures",
    "replay.snapshot_every_rows", "replay.fsync", "replay.num_cpus", "replay.memory_bytes", "replay.placement",
    "replay.max_samples_per_insert", "replay.min_rows_to_sample", "replay.max_shards", "ray.", "mlflow.run_name", "mlflow.flush_timeout_s",
    "output_dir", "recovery.", "table1.",  # table1: what `forgetless table1` runs, not what one run is
    "evaluation.cells",  # which cells are measured: every metric reads the same ones either way
)

# Keys added since runs were first saved whose default is not what a run saved without them did:
# such a run trained with these values, and a resume of it goes on with them.
EARLIER_BEHAVIOUR = {("training", "loss_mean"): "per_token"}


def earlier_behaviour(saved: dict[str, Any]) -> list[str]:
    """``key=value`` overrides that keep a run saved before a key existed doing what it did
    (``EARLIER_BEHAVIOUR``), for the keys its saved config lacks."""
    return [f"{section}.{key}={value}" for (section, key), value in EARLIER_BEHAVIOUR.items()
            if isinstance(saved.get(section, {}), dict) and key not in saved.get(section, {})]


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}


def config_changes(saved: dict[str, Any], given: dict[str, Any], *, finished_tasks: int) -> tuple[list[str], list[str]]:
    """Compare a saved run's config with the one a resume brings (both as JSON-ready dicts).

    Returns ``(refused, allowed)``: each a list of ``key: old -> new`` lines. Tasks are compared
    by position: the first ``finished_tasks`` must be identical; later ones may change, be removed
    or be added.
    """
    saved, given = _with_current_defaults(saved), dict(given)
    saved_tasks = saved.get("stream", {}).get("tasks", [])
    given_tasks = given.get("stream", {}).get("tasks", [])
    refused, allowed = [], []
    for index in range(finished_tasks):
        old = saved_tasks[index] if index < len(saved_tasks) else None
        new = given_tasks[index] if index < len(given_tasks) else None
        if new is None:
            refused.append(f"stream.tasks.{index}: finished task {old['name']!r} is missing from the new config")
            continue
        for key, (a, b) in _differences(old, new).items():
            refused.append(f"stream.tasks.{index}.{key}: {a!r} -> {b!r} (task {old['name']!r} is finished)")
    strip = lambda d: {**d, "stream": {k: v for k, v in d.get("stream", {}).items() if k != "tasks"}}  # noqa: E731
    for key, (a, b) in _differences(strip(saved), strip(given)).items():
        line = f"{key}: {a!r} -> {b!r}"
        (allowed if key.startswith(MAY_CHANGE) else refused).append(line)
    return refused, allowed


def _with_current_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an older version, with the keys added since at their defaults (what that
    version did), so they do not read as changes. Left as it is when it no longer validates."""
    data = dict(saved)
    for (section, key), value in EARLIER_BEHAVIOUR.items():
        if isinstance(data.get(section, {}), dict) and key not in data.get(section, {}):
            data[section] = {**data.get(section, {}), key: value}
    # Before a strategy's settings had one home, a run used its `strategy` block and saved a
    # `strategies` block of defaults beside it: the block is what the run used.
    strategy = data.get("strategy")
    settings = dict(data["strategies"]) if isinstance(data.get("strategies"), dict) else {}
    for block in strategy if isinstance(strategy, list) else [strategy]:
        if isinstance(block, dict) and isinstance(block.get("name"), str):
            given = settings.get(block["name"]) if isinstance(settings.get(block["name"]), dict) else {}
            settings[block["name"]] = {**given, **{k: v for k, v in block.items() if k != "name"}}
    if settings:
        data["strategies"] = settings
    try:
        return experiment_dict(validate_config(data, origin="the saved config"))
    except ConfigError:
        return dict(saved)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    flat_a, flat_b = _flat(a), _flat(b)
    missing = object()
    return {key: (flat_a.get(key), flat_b.get(key)) for key in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(key, missing) != flat_b.get(key, missing)}
