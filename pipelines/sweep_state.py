"""What a ``forgetless compare`` has done so far: ``<output_dir>/compare-state.json``.

Written when the comparison starts and again after each run: the setup it was started with
(strategies, seeds, task orders, tuned values, the experiment config), its shared tokenizer and
digest, its MLflow parent run, and each finished run's timing. ``compare ... resume=true`` reads
it to continue an interrupted comparison where it stopped: a run that finished every task is
skipped (its report and timing kept), the interrupted one resumes from its last commit in its own
MLflow run, the rest start; all under the same parent run and tokenizer. A setup that differs is
refused, naming each change: a comparison's runs must share one protocol.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from pipelines.config import flatten
from pipelines.errors import ConfigError
from pipelines.report import RunReport
from storage.files import write_atomic

STATE_FILE = "compare-state.json"
_UNSET = "(unset)"
MAX_STATE_BYTES = 16 << 20  # a state of thousands of runs is well under 1 MB


class RunTiming(BaseModel):
    """A finished run's cost as its comparison measured it (``actors.sweep.TimedRun.timing``)."""

    model_config = ConfigDict(extra="forbid")
    wall_s: float
    startup_s: float
    train_eval_s: float
    overhead_s: float


class SweepState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    setup: dict[str, Any]
    tokenizer: dict[str, str]  # path, digest, source: comparison.json's protocol.tokenizer
    parent_run_id: str
    runs: dict[str, RunTiming] = {}  # a run's directory under output_dir -> its timing

    @field_validator("tokenizer")
    @classmethod
    def _digest(cls, tokenizer: dict[str, str]) -> dict[str, str]:
        missing = sorted({"path", "digest", "source"} - set(tokenizer))
        if missing:
            raise ValueError(f"tokenizer lacks {', '.join(missing)}")
        return tokenizer

    @field_validator("runs")
    @classmethod
    def _inside(cls, runs: dict[str, RunTiming]) -> dict[str, RunTiming]:
        for key in runs:  # a key names a directory of the comparison's own, never one outside it
            path = PurePosixPath(key)
            if not key or path.is_absolute() or ".." in path.parts or "\\" in key:
                raise ValueError(f"runs: {key!r} is not a run directory inside the comparison")
        return runs

    def write(self, base: Path) -> None:
        write_atomic(base / STATE_FILE, self.model_dump_json(indent=2))


def setup_record(experiment: dict[str, Any], strategies: list[str], seeds: int, orders: list[list[str]],
                 tuned: dict[str, Any] | None) -> dict[str, Any]:
    """What must not change between a comparison and its resumption: ``experiment`` is the config's
    ``experiment_dict``; its output_dir is left out (a comparison's directory may be moved)."""
    return {"strategies": list(strategies), "seeds": seeds, "orders": [list(o) for o in orders],
            "tuned": tuned or None, "config": {k: v for k, v in experiment.items() if k != "output_dir"}}


def read_state(base: Path) -> SweepState | None:
    """The state of the comparison in ``base``; None when there is none.

    Raises:
        ConfigError: the file cannot be read or is not a comparison's state (naming it).
    """
    path = base / STATE_FILE
    if not path.exists() and not path.is_symlink():
        return None
    reason = None
    if path.is_symlink():  # a run directory may sit on a shared volume: nothing in it points elsewhere
        reason = "a symbolic link, which is never followed"
    elif path.stat().st_size > MAX_STATE_BYTES:
        reason = f"{path.stat().st_size:,} bytes, over the {MAX_STATE_BYTES:,} a state holds"
    else:
        try:
            return SweepState.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            reason = f"{where + ': ' if where else ''}{first['msg']}"[:300]
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    raise ConfigError(f"{path}: not a readable comparison state ({reason}); the comparison cannot be resumed from "
                      "it: start over with overwrite=true, or choose another output_dir")


def setup_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every dotted key whose value differs, as ``key: old -> new``."""
    a, b = flatten(old), flatten(new)
    return [f"{key}: {a.get(key, _UNSET)} -> {b.get(key, _UNSET)}" for key in sorted(set(a) | set(b))
            if a.get(key, _UNSET) != b.get(key, _UNSET)]


def finished_report(run_dir: Path) -> RunReport | None:
    """A run's report when the run finished every task of its stream (a resumed comparison skips it).

    Raises:
        ConfigError: its report.json is there but unreadable (naming the file).
    """
    path = run_dir / "report.json"
    if not path.is_file():
        return None
    report = RunReport.read(path)
    return report if report.status == "FINISHED" and report.finished_tasks == len(report.tasks) else None
