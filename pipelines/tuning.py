"""What ``forgetless tune`` searches, on which rows, and what it writes: no Ray here (actors.tune runs it).

The protocol is Chaudhry et al. 2019 ("Efficient Lifelong Learning with A-GEM", sec. 6): the
hyperparameters of every strategy are chosen on the first ``k`` tasks of the stream only, and on
rows cut from their *training* splits (a validation split), so neither a task's eval rows nor any
later task is ever read while tuning; every strategy gets the same trials: the same learning rates
(``shared_rates``: the rate moves every outcome most, so no strategy may owe its rank to a luckier
draw of it), each with a random draw of the strategy's own knobs (each strategy file's ``search``),
and the best values are then run on the whole stream by ``forgetless compare --tuned DIR``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipelines.config import RunConfig, TrainingConfig, validate_config
from pipelines.errors import ConfigError, DataError
from pipelines.strategies import STRATEGIES
from pipelines.strategies.base import Range
from pipelines.tasks import default_prefix, load_stream
from storage.files import write_atomic
from storage.tables import write_parquet_atomic

LR = Range(1e-4, 1e-2, log=True)  # every strategy's learning rate (training.lr)
MIN_VALIDATION_ROWS = 10  # a trial scored on fewer rows per task would rank trials by noise


@dataclass(frozen=True)
class Knob:
    """One searched value: ``name`` as the tuned YAML and Ray Tune show it (``lr``, ``lwf.alpha``),
    where it goes in a config (``path``), and its range."""

    name: str
    path: tuple[str, ...]
    range: Range


def _check_value(name: str, strategy: str, part: str | None, field: str, value: float, config: RunConfig) -> None:
    """Refuse a range end the knob cannot take, naming the knob."""
    try:
        if part is None:
            TrainingConfig.model_validate({**config.training.model_dump(), "lr": value})
        else:
            settings = getattr(config.strategies, part).model_dump(by_alias=True)
            STRATEGIES[part].config.model_validate({**settings, field: value})
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"tune --space, {strategy} knob {name}: {value!r} is outside what the knob takes ({reason})") from None


def search_space(config: RunConfig, strategy: str, given: dict[str, Any] | None = None) -> list[Knob]:
    """The knobs searched for ``strategy`` (a combination's parts' knobs, each under its part's name):
    the learning rate, then each part's own, minus those ``replay.rows_per_batch`` fixes;
    ``given`` (``{knob: {low, high, log}}``) replaces ranges.

    Raises:
        ConfigError: an unknown knob, or a range the knob cannot take (naming the knob).
    """
    parts = strategy.split("+")
    knobs = [Knob("lr", ("training", "lr"), LR)]
    for part in parts:
        definition = STRATEGIES[part]
        for field, bounds in definition.search.items():
            if config.replay.rows_per_batch is not None and field in definition.sets_replayed_rows:
                continue  # the comparison's one replayed-rows rate decides it
            knobs.append(Knob(f"{part}.{field}", ("strategies", part, field), bounds))
    by_name = {knob.name: knob for knob in knobs}
    for name, spec in (given or {}).items():
        if name not in by_name:
            raise ConfigError(f"tune --space, {strategy} knob {name}: not a knob of {strategy}; its knobs are "
                              f"{sorted(by_name)}")
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "log"}:
            raise ConfigError(f"tune --space, {strategy} knob {name}: give {{low: ..., high: ..., log: true|false}}")
        old = by_name[name].range
        try:
            low, high = float(spec["low"]), float(spec["high"])
        except (TypeError, ValueError):
            raise ConfigError(f"tune --space, {strategy} knob {name}: low and high must be numbers") from None
        if not low < high or (spec.get("log", old.log) and low <= 0):
            raise ConfigError(f"tune --space, {strategy} knob {name}: needs low < high (and low > 0 on a log scale)")
        by_name[name] = Knob(name, by_name[name].path, Range(low, high, bool(spec.get("log", old.log)), old.integer))
    for knob in by_name.values():
        part = None if knob.path[0] == "training" else knob.path[1]
        for value in (knob.range.low, knob.range.high):
            _check_value(knob.name, strategy, part, knob.path[-1], value, config)
    return list(by_name.values())


def read_space(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """``--space FILE``: YAML ``{strategy: {knob: {low, high, log}}}``."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"tune --space {path}: cannot read it as YAML ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"tune --space {path}: expected {{strategy: {{knob: {{low, high, log}}}}}}")
    return data


def with_values(config: RunConfig, strategy: str, values: dict[str, Any], **kwargs: Any) -> RunConfig:
    """``config`` running ``strategy`` with the tuned ``values`` (knob name -> value) in place."""
    data = config.model_dump(by_alias=True)
    for name, value in values.items():
        if name == "lr":
            data["training"]["lr"] = float(value)
            continue
        part, field = name.split(".", 1)
        data.setdefault("strategies", {}).setdefault(part, {})[field] = value
    return validate_config(data, origin=f"tuned {strategy}").with_strategy(strategy, **kwargs)


def tuning_config(config: RunConfig, *, tasks: int, validation: float, directory: Path) -> tuple[RunConfig, dict]:
    """The stream a trial trains on: the first ``tasks`` tasks, each made of its training rows
    alone (written to ``directory``), a ``validation`` share of them held out as the eval split.
    Returns the config and what it was cut from (for the tuned YAML and comparison.json).

    Raises:
        ConfigError: ``tasks`` or ``validation`` out of range, naming the option.
        DataError: a task whose validation split would be too small to score a trial.
    """
    names = [t.name for t in config.stream.tasks]
    if not 1 <= tasks <= len(names):
        raise ConfigError(f"tune --tasks {tasks}: the stream has {len(names)} task(s); tune on 1 to {len(names)} "
                          "of its first tasks (2 is the protocol's default)")
    if not 0 < validation < 1:
        raise ConfigError(f"tune --validation {validation}: the share of each task's training rows held out must be "
                          "in (0, 1)")
    stream = load_stream(config)
    chosen = [config.stream.tasks[i] for i in range(tasks)]
    data_dir = directory / "data"
    small = []
    for task in stream.tasks[:tasks]:  # every check before anything is written
        held = min(max(1, round(len(set(task.train.column("source").to_pylist())) * validation)),
                   task.train.num_rows - 1)
        if held < MIN_VALIDATION_ROWS:
            small.append(f"task {task.name!r}: {held} of its {task.train.num_rows} training rows")
    if small:
        raise DataError(f"tune --validation {validation}: a validation split needs at least {MIN_VALIDATION_ROWS} rows "
                        f"to score a trial: " + "; ".join(small) + ". Raise --validation or the task's "
                        "max_train_examples")
    written = []
    for task_config, task in zip(chosen, stream.tasks[:tasks]):
        path = data_dir / f"{task.name}.parquet"
        write_parquet_atomic(task.train.select(["source", "target"]), path)
        written.append({**task_config.model_dump(by_alias=True, exclude_none=True), "prefix": default_prefix(task_config),
                        "source": {"kind": "file", "path": str(path)}, "eval_fraction": validation,
                        "max_eval_examples": None, "max_train_examples": None})
    data = config.model_dump(by_alias=True)
    data["stream"] = {**data["stream"], "tasks": written, "orders": None}
    data["checkpoint"] = {"models": "last", "after_stream": "report"}  # a trial is read for its score only
    tuned_on = {"tasks": names[:tasks], "validation": validation,
                "rows": "each task's training split only: a seeded share held out as validation, the rest trained on; "
                        "no eval row and no later task is read"}
    return validate_config(data, origin="tune's stream"), tuned_on


def shared_rates(bounds: Range, trials: int, seed: int) -> list[float]:
    """The learning rates every strategy's trials take, in order: one drawn in each of ``trials``
    equal slices of the range (on a log scale for a log range; stratified, so that five trials
    cannot all fall in one corner), from a stream seeded by the config's seed alone, so that every
    strategy with the same range tries the same rates (common random numbers). A strategy given
    another range by ``--space`` takes the same quantiles of its own."""
    quantiles = (np.arange(trials) + np.random.default_rng([seed, *b"lr"]).random(trials)) / trials
    if bounds.log:
        low, high = math.log(bounds.low), math.log(bounds.high)
        return [float(math.exp(low + q * (high - low))) for q in quantiles]
    return [float(bounds.low + q * (bounds.high - bounds.low)) for q in quantiles]


def draw_seed(seed: int, strategy: str) -> int:
    """The search's seed for one strategy's own knobs: the same config gives every strategy its own,
    repeatable draws of them (its learning rates are ``shared_rates``)."""
    return int(np.random.default_rng([seed, *strategy.encode()]).integers(2**31 - 1))


def write_tuned(path: Path, strategy: str, values: dict[str, Any], *, record: dict[str, Any]) -> None:
    """One strategy's tuned values as YAML (what ``compare --tuned`` reads), with how they were chosen."""
    clean = {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in values.items()}
    text = yaml.safe_dump({"strategy": strategy, "values": clean, "tuned": record}, sort_keys=False)
    write_atomic(path, f"# forgetless tune: the best of {record['trials']} trial(s) of {strategy}\n" + text)


def read_tuned(directory: Path, strategy: str, config: RunConfig) -> dict[str, Any]:
    """``compare --tuned DIR``: DIR/<strategy>.yaml's values and record, checked against the strategy's knobs.

    Raises:
        ConfigError: the file is missing or not what ``tune`` writes, naming it.
    """
    path = directory / f"{strategy}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"compare --tuned {directory}: no {path.name} for strategy {strategy}; every compared "
                          f"strategy needs its tuned values (forgetless tune ... --strategies {strategy})") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"compare --tuned: {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or data.get("strategy") != strategy or not isinstance(data.get("values"), dict):
        raise ConfigError(f"compare --tuned: {path} is not a tuned file of strategy {strategy}")
    known = {knob.name for knob in search_space(config, strategy)}
    unknown = sorted(set(data["values"]) - known)
    if unknown or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in data["values"].values()):
        raise ConfigError(f"compare --tuned: {path}: values {unknown or data['values']} are not {strategy}'s knobs "
                          f"({sorted(known)}) with finite numbers")
    return {"values": data["values"], "tuned": data.get("tuned", {}), "file": str(path)}
