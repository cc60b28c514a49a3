"""The run report: one typed object, written by the scheduler after every task, read by the CLI,
``forgetless compare`` and ``forgetless resume``.

``report.json`` is also the run's commit record: a task counts as finished once a report with its
row has been written (atomically). A resumed run continues after the last such task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.errors import ConfigError
from pipelines.redaction import redact_data

Status = Literal["RUNNING", "FINISHED", "FAILED", "KILLED"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskStats(_Model):
    """How one task's training went (steps 0: the strategy trained nothing at this task)."""

    steps: int
    mean_loss: float | None
    seconds: float
    eval_seconds: float = 0.0
    save_seconds: float = 0.0  # the task's model and training state written (rank 0's clock)
    started_at: float
    ended_at: float
    examples: int
    trainable_params: int | None = None  # parameters this task trained (a frozen-model paradigm: its own)
    trainable_bytes: int | None = None  # ... and their bytes: what serving the task beside the others stores


class MlflowRef(_Model):
    tracking_uri: str  # credentials redacted
    run_id: str | None
    experiment_id: str | None = None
    pending_records: int = 0  # metrics/params/tags not yet written (MLflow unreachable); flushed on resume


class ReplaySummary(_Model):
    num_shards: int
    rows: int
    rows_per_task: dict[str, int]
    rows_per_shard: list[int]
    bytes: int
    directory: str | None
    restore_warnings: list[str] = []
    memory_rows: int | None = None  # replay.memory_rows: the total budget (None: none)
    rows_after_task: dict[str, int] = {}  # the store's rows once each task's were in (the budget's check)


class Resumption(_Model):
    """One ``forgetless resume`` of this run."""

    at: float  # unix time
    finished_tasks: int  # rows already in the matrix when it resumed
    previous_status: Status  # how the earlier attempt ended (RUNNING: it was killed without a word)
    new_tasks: list[str] = []  # tasks the resume added to the stream (or changed before they were trained)
    changed: list[str] = []  # settings it changed, as "key: old -> new"


class MidTaskPoint(_Model):
    """The last mid-task checkpoint of the task being trained (``checkpoint.every_n_steps``)."""

    task_index: int
    steps_done: int  # optimizer steps of the task before it
    global_step: int  # optimizer steps of the whole stream before it
    training_state: str  # the state saved then (weights, optimizer, RNG, data position)


class Restart(_Model):
    """One restart of the trainer worker group inside a run, after a failure (``training.max_failures``);
    not to be confused with ``recovery``, the probe of what a head retrain recovers."""

    number: int  # 1, 2, ...
    at: float  # unix time the restarted group came up
    last_progress_at: float | None = None  # the failed attempt's last report (a step, a row, a checkpoint)
    died: list[str] = []  # the workers that ended without a word ("worker 1 (pid 4242 on node-3)")
    reasons: list[str] = []  # what the other workers reported, in order
    task_index: int | None = None  # the task being trained or evaluated when it failed
    # optimizer steps trained again: reached by the failed attempt, after the restore point (None: not
    # known, when the scheduler that followed the steps died)
    steps_redone: int | None = 0
    restored_from: str = ""  # "task 2, step 40 (mid-task checkpoint)", "the end of task 1", "the start"


class ResumePoint(_Model):
    """What a resume needs besides the matrix: where the committed state is."""

    training_state: str | None = None  # the training state saved after the last finished task
    replay_checkpoint: str | None = None  # the replay store's checkpoint tag at that moment
    data_fingerprints: dict[str, str] = {}  # task -> digest of its examples (an extension must not change them)
    mid_task: MidTaskPoint | None = None  # a checkpoint inside the next task, later than training_state
    # checkpoint.after_stream when it deleted files once the stream was through: no extending the run
    dropped: Literal["models", "report"] | None = None


class ModelInit(_Model):
    """Where the stream's weights started."""

    kind: Literal["pretrained", "random"]
    source: str  # what the config named: "preset t5/tiny", "pretrain <file>", "encoder minilm", "name_or_path <dir>"
    checkpoint: str | None = None  # the directory the weights (kind random: only the architecture) came from
    pretrain: dict[str, Any] | None = None  # the pretraining's manifest (our own T5/BART)


class RunReport(_Model):
    tasks: list[str]
    acc_matrix: list[list[float | None]]  # acc[t][j]: accuracy on task j after training task t; None: not measured
    baseline: list[float | None]  # before any training
    metrics: dict[str, float | None]  # avg_acc, forgetting, bwt, fwt after the last finished task; None: undefined
    metrics_per_task: list[dict[str, Any]] = []
    strategy: str
    strategy_config: dict[str, Any] | list[dict[str, Any]]  # a combination: each strategy's, in its order
    paradigm: dict[str, Any] = {"name": "fine_tuning"}  # how the pretrained model is reused (pipelines.paradigms)
    note: str | None = None
    fwt_measures: str | None = None  # what fwt reads as under this run's scoring (metrics.what_fwt_measures)
    # each task's best reachable score: its evaluation targets through the run's tokenizer and back,
    # under its metric (models.target_ceilings); below 1, no model can reach 1 on that task
    ceilings: dict[str, float] = {}
    experiment: str
    seed: int
    status: Status = "RUNNING"
    error: str | None = None
    finished_tasks: int = 0
    complete: bool = False
    train: dict[str, TaskStats] = {}
    between_task_overhead_s: list[float] = []
    checkpoints: dict[str, str] = {}
    mlflow: MlflowRef
    output_dir: str
    seconds: float = 0.0
    replay: ReplaySummary | None = None
    resumes: list[Resumption] = []
    resume: ResumePoint = ResumePoint()
    init: ModelInit | None = None
    # The recovery probe: task -> before (acc[t, t]), after_stream (acc[T-1, t]), after_head_retrain
    recovery: dict[str, dict[str, float | None]] = {}
    restarts: list[Restart] = []  # the trainer worker group's restarts after failures, inside this run
    # a saved training state that failed its checksums before it was loaded, and what the run did
    # instead ("... fails its checksum; task 3 continued from the end of task 2, 20 steps redone")
    fallbacks: list[str] = []

    def to_json(self) -> str:
        """The report as report.json holds it: every string passed through ``redact`` (an error's
        text, a manifest copied in, a URI), so no credential reaches the file."""
        return json.dumps(redact_data(json.loads(self.model_dump_json())), indent=2)

    @classmethod
    def read(cls, path: str | Path) -> RunReport:
        """Load a report.json.

        Raises:
            ConfigError: the file is missing, not JSON, or not a report (naming the file).
        """
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no run report here (was this directory written by `forgetless run`?)") from None
        except (ValidationError, ValueError) as exc:
            first = exc.errors()[0] if isinstance(exc, ValidationError) else {"msg": str(exc), "loc": ()}
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{path}: not a readable run report ({where + ': ' if where else ''}{first['msg']})") from None


def report_dict(report: RunReport) -> dict[str, Any]:
    return json.loads(report.to_json())
