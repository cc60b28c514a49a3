"""Run configuration: YAML + ``key=value`` overrides, validated once into frozen pydantic models.

Everything downstream takes these typed objects; defaults live here and nowhere else.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    AfterValidator,
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    model_validator,
)

from pipelines.errors import ConfigError
from pipelines.redaction import redact_data
from pipelines.schema import Schema
from pipelines.strategies import (
    DEFAULT_STRATEGY,
    STRATEGY_CONFIGS,
    StrategyConfig,
    check_combination,
    combined_name,
    needs_full_parameters,
    parts_of,
    planning_for,
    unknown,
)
from storage.replay import MAX_SHARDS


def _file_name(value: str) -> str:
    """A name that becomes one path component (a directory or file of a run): no separators, no
    ``.``/``..``, nothing a shell or a URL would mangle."""
    if not (1 <= len(value) <= 100) or not _NAME_CHARS.issuperset(value) or set(value) == {"."}:
        raise ValueError(f"{value!r} is used as a file name: use 1-100 letters, digits, '_', '-' and '.' "
                         "(not '.' or '..' alone)")
    return value


_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
FileName = Annotated[str, AfterValidator(_file_name)]


# ----------------------------------------------------------------------------------- model
class TokenizerConfig(Schema):
    """Where the tokenizer comes from.

    With ``name_or_path`` unset and the model built from a preset, a tokenizer is trained with the
    ``tokenizers`` library on ``train_on``: ``first_task``, the first trained task's train split,
    byte-level so that any later text encodes without loss (a stream must not see its future);
    ``all_tasks``, every task's train split (the future included: comparable with older runs).
    """

    name_or_path: str | None = None
    algorithm: Literal["unigram", "bpe"] | None = None  # None: unigram for t5, byte-level bpe for bart
    vocab_size: int = Field(default=2000, ge=64, le=256_000)
    train_on: Literal["first_task", "all_tasks"] = "first_task"


_MODEL_SOURCES = ("preset", "name_or_path", "pretrain", "encoder")


class ModelConfig(Schema):
    """Where the model comes from: exactly one of

    * ``preset``: a T5/BART size preset, random init (the default, ``tiny``): our small shapes, or
      a published configuration's (``t5-small``, ``t5-base``, ``t5-large``, ``bart-base``,
      ``bart-large``: 60M, 223M, 738M, 140M, 406M parameters);
    * ``name_or_path``: a ``save_pretrained`` directory or a hub name;
    * ``pretrain``: a pretrain config (``forgetless pretrain``); built once, cached by its contents;
    * ``encoder`` (with ``arch: encoder_decoder``): a pretrained BERT-style encoder, warm-starting
      both stacks of an encoder-decoder (Rothe et al. 2020): a directory, a hub name, or ``minilm``
      (a sentence-embedding MiniLM fetched from the package index).

    ``weights: random`` keeps the architecture and tokenizer of a pretrained source but not its
    weights: the same model from random init, for measuring what the pretraining gives.
    """

    arch: Literal["t5", "bart", "encoder_decoder"] = "t5"
    # tiny/small/medium/base: our own small shapes (t5 base is the t5-small architecture); the named
    # ones are the published configurations' shapes, vocabulary rows included (random weights)
    preset: Literal["tiny", "small", "medium", "base", "t5-small", "t5-base", "t5-large", "bart-base",
                    "bart-large"] | None = "tiny"
    name_or_path: str | None = None
    pretrain: str | None = None
    encoder: str | None = None
    weights: Literal["pretrained", "random"] = "pretrained"
    tokenizer: TokenizerConfig = TokenizerConfig()

    @model_validator(mode="before")
    @classmethod
    def _preset_default_only_alone(cls, data: Any) -> Any:
        if isinstance(data, dict) and "preset" not in data and any(data.get(k) for k in _MODEL_SOURCES[1:]):
            data = {**data, "preset": None}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        chosen = [k for k in _MODEL_SOURCES if getattr(self, k) is not None]
        if len(chosen) > 1:
            if chosen[0] == "preset" and len(chosen) == 2 and chosen[1] == "name_or_path":
                raise ValueError("set either model.preset (build from config) or model.name_or_path "
                                 "(load weights), not both; use model.preset=null with name_or_path")
            raise ValueError(f"set one of model.{', model.'.join(_MODEL_SOURCES)}; got {', '.join(chosen)}")
        if not chosen:
            raise ValueError("set model.preset (tiny, small, base) or model.name_or_path, model.pretrain "
                             "or model.encoder")
        if (self.arch == "encoder_decoder") != (self.encoder is not None):
            raise ValueError("model.arch: encoder_decoder goes with model.encoder (the pretrained encoder to "
                             "warm-start from), and model.encoder only with it")
        published = self.preset is not None and "-" in self.preset
        if published and not self.preset.startswith(f"{self.arch}-"):
            raise ValueError(f"model.preset {self.preset} is a {self.preset.split('-')[0]} shape; model.arch is "
                             f"{self.arch}: set model.arch={self.preset.split('-')[0]}")
        if self.preset is not None and self.weights == "random":
            raise ValueError("model.weights: random is for pretrained sources; a preset is random init already")
        return self


# ----------------------------------------------------------------------------------- data
class BuiltinSource(Schema):
    kind: Literal["builtin"]
    name: str


class FileSource(Schema):
    """A local JSONL, CSV or Parquet file (chosen by suffix)."""

    kind: Literal["file"]
    path: str
    source_column: str = "source"
    target_column: str = "target"


class HFSource(Schema):
    """A Hugging Face dataset: a ``save_to_disk`` directory, or a hub name when a hub is reachable."""

    kind: Literal["hf"]
    path: str
    name: str | None = None
    split: str = "train"
    source_column: str = "source"
    target_column: str = "target"


TaskSource = Annotated[Union[BuiltinSource, FileSource, HFSource], Field(discriminator="kind")]


class TaskConfig(Schema):
    name: FileName
    source: TaskSource
    prefix: str | None = None  # None: "<name>: "
    metric: Literal["exact_match", "rouge_l"] = "exact_match"
    # A file task capped here reads only its first rows (pipelines.tasks.rows_to_read: enough for
    # this many training rows and max_eval_examples eval rows); the split is of those rows.
    max_train_examples: int | None = Field(default=None, gt=0)
    max_eval_examples: int | None = Field(default=None, gt=0)
    eval_fraction: float = Field(default=0.2, gt=0, lt=1)
    epochs: float | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    # The order training examples are seen in: shuffled each epoch, or grouped class by class
    # (targets sorted; the lecture's Box 2 — forgetting inside one task).
    order: Literal["shuffled", "by_class"] = "shuffled"


class PretrainingTaskConfig(Schema):
    """The pretraining objective as task 0 of a stream that starts from our own pretrained T5/BART:
    held-out denoising examples of the pretraining corpus, scored by masked-token accuracy. It is
    not trained again: its row-0 entry is the pretrained model's, and its column shows how much of
    what pretraining taught the stream forgets. ``true`` in a config means the defaults."""

    enabled: bool = True
    name: FileName = "pretraining"
    max_eval_examples: int = Field(default=200, gt=0)


class StreamConfig(Schema):
    tasks: list[TaskConfig] = Field(min_length=1)
    cache_dir: str = "~/.cache/forgetless"
    max_source_tokens: int = Field(default=128, gt=0)
    max_target_tokens: int = Field(default=32, gt=0)
    pretraining_task: PretrainingTaskConfig | None = None
    # Train / eval splits are cut with this seed (and the task's name), not the run's: every seed
    # and every task order of a comparison is evaluated on the same examples.
    split_seed: int = 0
    # Task orders for `forgetless compare --orders N` after the order of ``tasks`` (each lists every
    # task name once); seeded permutations make up the rest.
    orders: list[list[str]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _pretraining_task_flag(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("pretraining_task"), bool):
            data = {**data, "pretraining_task": {"enabled": True} if data["pretraining_task"] else None}
        return data

    @property
    def has_pretraining_task(self) -> bool:
        return self.pretraining_task is not None and self.pretraining_task.enabled

    @model_validator(mode="after")
    def _unique_names(self) -> StreamConfig:
        names = [t.name for t in self.tasks] + ([self.pretraining_task.name] if self.has_pretraining_task else [])
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {dupes}")
        own = sorted(t.name for t in self.tasks)
        for k, order in enumerate(self.orders or []):
            if sorted(order) != own:
                raise ValueError(f"orders[{k}] must list every task once: it has {order}, the tasks are {own}")
        return self

    def in_order(self, names: list[str]) -> list[TaskConfig]:
        """The tasks in the order ``names`` lists them."""
        by_name = {t.name: t for t in self.tasks}
        return [by_name[n] for n in names]


# ----------------------------------------------------------------------------------- training
class TrainingConfig(Schema):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has one per worker
    # CPUs reserved per worker; None: a local Ray's CPUs split evenly (torch threads follow), else 1.
    cpus_per_worker: float | None = Field(default=None, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    micro_batch_size: int = Field(default=16, gt=0)
    grad_accum_steps: int = Field(default=1, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)  # per task; wins over epochs
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    # How the cross-entropy of a batch is averaged: per_example (each example's mean over its target
    # tokens, then the mean over examples: a one-token label weighs what a long answer does) or
    # per_token (the mean over every target token of the batch, as transformers' models compute it)
    loss_mean: Literal["per_example", "per_token"] = "per_example"
    log_every_n_steps: int = Field(default=10, gt=0)
    deepspeed_config: str | None = None  # JSON or YAML; keys the run owns must be "auto" or agree
    # ZeRO-1/2 partition optimizer state and gradients across workers; with one worker there is
    # nothing to partition, and the bookkeeping costs ~10% of a CPU step. True: run those as stage 0
    # (same updates). False: keep the configured stage (to test the ZeRO code path itself).
    single_worker_zero_as_stage0: bool = True
    # Restarts of the trainer worker group a run may take (a worker killed, a node lost, a
    # collective broken by either) before it fails with every failure listed. Each restart resumes
    # from the last committed state: the last finished task, or the last mid-task checkpoint
    # (``checkpoint.every_n_steps``). An error in the run's own input or numbers (bad data, a
    # non-finite loss) fails the run at once: it would fail again.
    max_failures: int = Field(default=3, ge=0)
    # A local run is refused before Ray starts when ZeRO's per-worker estimate (pipelines/memory.py)
    # does not fit this machine's available memory, naming a setting that would; false skips it.
    check_memory: bool = True


class EvaluationConfig(Schema):
    batch_size: int = Field(default=64, gt=0)
    max_new_tokens: int = Field(default=16, gt=0)
    # How a classification task (exact-match metric, at most ``max_labels`` distinct training targets)
    # is scored. "generate": greedy decoding of up to max_new_tokens, compared with the target.
    # "likelihood": the task's label set ranked by the log-likelihood of each whole label (end token
    # included) given the input, the best taken: one encoder pass and a decoder pass over the labels
    # instead of max_new_tokens decoding steps, and always a valid label. Other tasks always generate;
    # feature extraction classifies over the label set either way.
    scoring: Literal["generate", "likelihood"] = "generate"
    max_labels: int = Field(default=20, ge=2)
    # Evaluate the tasks in mixed batches (examples of every task interleaved) instead of one task
    # at a time: one model answers every task, each input carrying its task in its text (prefix,
    # in-context examples). Only where the model is shared: paradigm fine_tuning or
    # prompt_engineering. Generated tasks are pooled; ranked (likelihood) and masked-token tasks are
    # still scored one at a time. A mixed batch decodes until its longest answer ends.
    mix_tasks: bool = False
    # Which cells of the accuracy matrix are measured after each task: "needed", the tasks seen so far
    # and the next one (every metric reads only those: forgetting, bwt and avg_acc the seen ones, fwt
    # the next), the rest of the row left empty; "all", every task after every task (the full
    # heatmap: how the later tasks' accuracy drifts before they are trained). The baseline is
    # always measured on every task.
    cells: Literal["needed", "all"] = "needed"
    # How an answer and its target are normalized before they are compared (exact match, ROUGE-L):
    # case (case-folded), whitespace (collapsed, ends stripped), accents (combining marks dropped:
    # 'mangeâmes' = 'mangeames', for a tokenizer that strips them). The attainable ceilings follow it.
    normalize: list[Literal["case", "accents", "whitespace"]] = ["case", "whitespace"]


class CheckpointConfig(Schema):
    # "all": a plain transformers model after every task (teachers for distillation need these);
    # "last": only the final one.
    models: Literal["all", "last"] = "all"
    # What stays once the stream's last task is committed (and the recovery probe, if on, has run).
    # "keep": everything, so the run can be extended with more tasks. "models": the training state
    # (weights, optimizer, RNG: the largest files) goes, the models above stay. "report": the models
    # go too, leaving the report, matrix, per-example scores, plots and replay rows: a sweep of many
    # runs then keeps a few MB a run. Either way the run cannot be extended; the report says so.
    after_stream: Literal["keep", "models", "report"] = "keep"
    # The training state (weights, optimizer, RNG, data and replay position) inside a task, every
    # so many optimizer steps and/or minutes (checked at each ``training.log_every_n_steps`` sync),
    # so that a restart after a failure redoes at most that much of the task. None: only at the
    # end of each task. Each costs one save of the training state (see docs/benchmarks.md).
    every_n_steps: int | None = Field(default=None, gt=0)
    every_minutes: float | None = Field(default=None, gt=0)


class ReplayConfig(Schema):
    """The sharded replay store: Ray actors, each holding one shard of examples as Arrow data.

    Size it as num_shards x capacity_rows rows; a row costs about its text in bytes (see
    docs/benchmarks.md). Add shards when one node's memory is not enough: they spread over nodes.
    """

    enabled: bool = False
    num_shards: int = Field(default=2, ge=1)
    # The most shards `forgetless replay add-shards` may grow the store to: a typo in N (1000 for 10)
    # would start that many actors, each with its own process and files.
    max_shards: int = Field(default=64, ge=1, le=MAX_SHARDS)
    capacity_rows: int = Field(default=10_000, gt=0)  # per shard
    # A total memory budget in rows, over every shard and task, shared by every strategy that keeps
    # rows (replay, DER++, A-GEM, general-sample replay): the store never holds more. Each task's
    # share is balanced (the budget split evenly over the tasks stored so far, a task short of rows
    # leaving its rest to the others); old tasks' shares shrink as tasks arrive, their rows deleted
    # before the new task's go in. None: the per-task sample below, each shard capped by capacity_rows.
    memory_rows: int | None = Field(default=None, gt=0)
    remover: Literal["fifo", "reservoir", "task_balanced"] = "reservoir"
    sampler: Literal["uniform", "task_balanced"] = "uniform"
    # Without memory_rows: inserted after each task, a seeded sample of its training rows (the
    # buffer grows by this much per task). None keeps every row: cumulative training by another name.
    rows_per_task: int | None = Field(default=200, gt=0)
    # Replayed rows per micro-batch for every replay-based strategy (replay's mixed-in rows, appended
    # to a full micro-batch of the new task; DER++'s two batches, split evenly; A-GEM's reference
    # batch). None: each strategy's own setting (replay's replay_ratio, derpp.replay_rows,
    # agem.reference_rows). `forgetless compare` needs it set when it compares replay-based strategies.
    rows_per_batch: int | None = Field(default=None, gt=0)
    directory: str | None = None  # logs and snapshots; None: <output_dir>/replay
    snapshot_every_rows: int | None = Field(default=10_000, gt=0)
    max_samples_per_insert: float | None = Field(default=None, gt=0)  # Reverb-style rate limit
    min_rows_to_sample: int = Field(default=1, ge=0)
    fsync: bool = False  # fsync the log per insert: survives machine crashes, not only process death
    # A sampler on a shard's own node takes rows from the shard's table in the node's shared memory
    # (no copy, no shard-side work); off: every shard draws and sends its rows. A rate-limited
    # store (max_samples_per_insert) always has its shards draw: they count what is sampled.
    zero_copy_sampling: bool = True
    num_cpus: float = Field(default=0.0, ge=0)  # per shard; 0 keeps shards off the trainers' CPUs
    memory_bytes: int | None = Field(default=None, gt=0)  # per shard, for Ray's scheduler
    placement: Literal["SPREAD", "DEFAULT"] = "SPREAD"  # SPREAD: shards across nodes
    # General-sample replay (GeRe, arXiv 2508.04676): rows of the pretraining corpus kept in the store
    # beside the tasks' rows and replayed with the pretraining objective. Needs stream.pretraining_task.
    pretraining_rows: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_budget(self) -> ReplayConfig:
        if self.memory_rows is not None:
            for key in ("rows_per_task", "capacity_rows", "remover"):
                if getattr(self, key) != type(self).model_fields[key].default:  # (a dumped config sets every key)
                    raise ValueError(f"replay.{key} and replay.memory_rows are two ways of sizing the store: with "
                                     f"memory_rows ({self.memory_rows}) the budget decides each task's rows and "
                                     f"which go; drop replay.{key}")
        return self

    @property
    def shard_capacity(self) -> int:
        """Rows one shard may hold: with a total budget, all of it (the plan keeps the budget, deleting
        old tasks' surplus rows itself, so no shard's remover ever acts); otherwise ``capacity_rows``."""
        return self.memory_rows if self.memory_rows is not None else self.capacity_rows


class RecoveryConfig(Schema):
    """The recovery probe (after the stream): is a "forgotten" task still in the representation?
    Starting from the final model, only the output head (``lm_head``, untied from the input
    embeddings; optionally also the last decoder block) is retrained for ``steps`` steps on each
    earlier task, which is then evaluated again. The stream's model is not changed."""

    enabled: bool = False
    steps: int = Field(default=50, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    last_decoder_block: bool = False
    max_eval_examples: int | None = Field(default=None, gt=0)  # None: the task's whole eval split


class MlflowConfig(Schema):
    tracking_uri: str | None = None  # None: sqlite:///<cwd>/mlflow.db
    experiment_name: str = "forgetless"
    run_name: str | None = None
    parent_run_id: str | None = None  # set by `forgetless compare`: runs become children of it
    # At the end of a run, how long to wait for an unreachable tracking server before leaving the
    # unsent records in <output_dir>/mlflow-pending.jsonl (sent by `forgetless resume`).
    flush_timeout_s: float = Field(default=60.0, ge=0)


class RayConfig(Schema):
    address: str | None = None  # None: start a local Ray; "auto" or ray://... for a cluster
    num_cpus: int | None = Field(default=None, gt=0)


class ParadigmConfig(Schema):
    """How the pretrained model is reused on each task (the lecture's Table 1; pipelines.paradigms).

    fine_tuning: every weight trains (the strategies apply). feature_extraction: the model frozen, a
    classifier per task over its label set on the encoder's features. prompt_engineering: nothing
    trains; k examples of the task's training split precede each evaluated input. prompt_tuning:
    the model frozen, a soft prompt per task (vectors before the encoder's input embeddings)."""

    name: Literal["fine_tuning", "feature_extraction", "prompt_engineering", "prompt_tuning"] = "fine_tuning"
    # feature_extraction: features = mean over tokens of the mean of the encoder's top ``feature_layers``
    # hidden states (1: the last layer); a task with more distinct targets than ``max_labels`` has no label set
    feature_layers: int = Field(default=1, ge=1)
    max_labels: int = Field(default=100, ge=2)
    # prompt_engineering: in-context examples per evaluated input (0: zero-shot), each written with
    # ``shot_template`` and joined by ``shot_separator``; the evaluated input ends the prompt
    shots: int = Field(default=0, ge=0)
    shot_template: str = "{source} => {target}"
    shot_separator: str = " | "
    # prompt_tuning: vectors per task's prompt, started from the token embeddings of ``prompt_init``
    # (None: the task's name in words), cycled to fill
    prompt_length: int = Field(default=20, gt=0)
    prompt_init: str | None = None
    # feature_extraction, prompt_tuning: the peak learning rate of a task's head or prompt (None:
    # training.lr, the schedule the same); a few weights usually take a larger rate than a whole model
    lr: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _template(self) -> ParadigmConfig:
        for field in ("{source}", "{target}"):
            if field not in self.shot_template:
                raise ValueError(f"paradigm.shot_template must contain {field}: it is {self.shot_template!r}")
        return self

    @property
    def freezes_model(self) -> bool:
        return self.name != "fine_tuning"

    @property
    def has_task_parameters(self) -> bool:
        """Whether each task gets parameters of its own (a head or a prompt) beside the frozen model."""
        return self.name in ("feature_extraction", "prompt_tuning")

    @property
    def takes_steps(self) -> bool:
        """Whether a task trains anything (prompt engineering only writes prompts)."""
        return self.name != "prompt_engineering"


PARADIGMS = ("feature_extraction", "fine_tuning", "prompt_engineering", "prompt_tuning")  # Table 1's columns


class Table1Config(Schema):
    """``forgetless table1``: the paradigms on the same model and tasks, at several training-set sizes."""

    paradigms: list[Literal["feature_extraction", "fine_tuning", "prompt_engineering", "prompt_tuning"]] = \
        Field(default=list(PARADIGMS), min_length=1)
    # training rows per task (None: the task's whole training split, after max_train_examples)
    train_sizes: list[int | None] = Field(default=[32, 256, None], min_length=1, max_length=6)

    @model_validator(mode="after")
    def _distinct(self) -> Table1Config:
        for name, values in (("paradigms", self.paradigms), ("train_sizes", self.train_sizes)):
            if len(set(values)) != len(values):
                raise ValueError(f"table1.{name} lists a value twice: {values}")
        if any(size is not None and size < 1 for size in self.train_sizes):
            raise ValueError(f"table1.train_sizes must be positive (or null: all): {self.train_sizes}")
        return self


OneOrMore = Annotated[
    Union[Annotated[StrategyConfig, Tag("one")], Annotated[list[StrategyConfig], Tag("combination")]],
    Discriminator(lambda value: "combination" if isinstance(value, (list, tuple)) else "one"),
]

StrategySettings = create_model(
    "StrategySettings", __base__=Schema,
    __doc__="Settings per strategy: what ``strategy: NAME`` (or a list of names) and ``forgetless compare`` use.",
    **{name: (cls, cls()) for name, cls in STRATEGY_CONFIGS.items()},
)


class RunConfig(Schema):
    # Run control, not part of the experiment (never logged, never compared on resume):
    # resume=true continues the stream in output_dir; overwrite=true empties output_dir first.
    resume: bool = False
    overwrite: bool = False
    experiment: FileName = "forgetless"  # names Ray Train's run directory: a file name
    seed: int = 0
    output_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    stream: StreamConfig
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    replay: ReplayConfig = ReplayConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    # one strategy (a name, or its block), or a combination: a list of them; a name takes its
    # settings from ``strategies``
    strategy: OneOrMore = STRATEGY_CONFIGS[DEFAULT_STRATEGY]()
    strategies: StrategySettings = StrategySettings()
    paradigm: ParadigmConfig = ParadigmConfig()
    table1: Table1Config = Table1Config()
    mlflow: MlflowConfig = MlflowConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _known_strategy(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "strategy" not in data:
            return data
        settings = dict(data["strategies"]) if isinstance(data.get("strategies"), dict) else {}
        strategy = data["strategy"]
        items = strategy if isinstance(strategy, list) else [strategy]
        parts = []
        for item in items:
            if isinstance(item, str):  # a name: its settings from `strategies`
                if item not in STRATEGY_CONFIGS:
                    raise ValueError(unknown(item))
                given = settings.get(item)
                item = {**(given if isinstance(given, dict) else {}), "name": item}
            elif isinstance(item, dict):
                name = item.get("name", DEFAULT_STRATEGY)
                if name not in STRATEGY_CONFIGS:
                    raise ValueError(unknown(name))
                given = settings.get(name) if isinstance(settings.get(name), dict) else {}
                clash = sorted(k for k in item if k != "name" and k in given and given[k] != item[k])
                if clash:
                    raise ValueError("; ".join(f"strategy {name}: {k}={item[k]!r} here and strategies.{name}.{k}="
                                               f"{given[k]!r} disagree" for k in clash)
                                     + f": set {name}'s settings in one place (strategies.{name})")
                item = {**given, "name": DEFAULT_STRATEGY, **item}
                # one home for a strategy's settings: what the run uses is what `strategies` holds
                settings[name] = {k: v for k, v in item.items() if k != "name"}
            parts.append(item)
        data = {**data, "strategies": settings}
        if isinstance(strategy, list):
            if not parts:
                raise ValueError("strategy is an empty list: name one strategy or several")
            names = [p["name"] for p in parts if isinstance(p, dict)]
            check_combination(names)
        return {**data, "strategy": parts if len(parts) > 1 else parts[0]}

    @model_validator(mode="after")
    def _strategy_needs(self) -> RunConfig:
        full = needs_full_parameters(self.strategy)
        if full and self.training.zero_stage == 3:
            raise ValueError(f"{' and '.join(full)} need{'s' if len(full) == 1 else ''} full parameters on every "
                             "worker: use training.zero_stage <= 2")
        if self.replay.pretraining_rows and not self.stream.has_pretraining_task:
            raise ValueError("replay.pretraining_rows replays the pretraining corpus: it needs stream.pretraining_task "
                             "(and model.pretrain)")
        if self.stream.has_pretraining_task and self.model.pretrain is None:
            raise ValueError("stream.pretraining_task needs model.pretrain: the pretraining objective, corpus and "
                             "held-out split come from the pretrain config the model was built by")
        if self.evaluation.mix_tasks and self.paradigm.has_task_parameters:
            raise ValueError(f"evaluation.mix_tasks: under paradigm {self.paradigm.name} each task has its own "
                             f"{'prompt' if self.paradigm.name == 'prompt_tuning' else 'head'}, so a batch can hold "
                             "one task only; set evaluation.mix_tasks=false")
        if self.paradigm.freezes_model:
            what = f"paradigm {self.paradigm.name}"
            if self.strategy_name != DEFAULT_STRATEGY:
                raise ValueError(f"{what} trains a task's own parameters only (or none): strategy "
                                 f"{self.strategy_name} has nothing to protect; use strategy={DEFAULT_STRATEGY}")
            if self.recovery.enabled:
                raise ValueError(f"{what} leaves the model as it was: the recovery probe (recovery.enabled) "
                                 "measures what fine-tuning hid in it; turn it off")
            if self.replay.enabled:
                raise ValueError(f"{what} does not replay: set replay.enabled=false")
        planning = planning_for(self.strategy)
        batches = len(planning.replay_parts) + (1 if planning.replay_ratio else 0)
        if self.replay.rows_per_batch is not None and self.replay.rows_per_batch < batches:
            raise ValueError(f"replay.rows_per_batch ({self.replay.rows_per_batch}) is split over strategy "
                             f"{self.strategy_name}'s {batches} replayed batches: give each at least one row")
        if self.resume and self.overwrite:
            raise ValueError("resume=true continues what is in output_dir and overwrite=true empties it: choose one")
        return self

    @property
    def strategy_parts(self) -> tuple[Any, ...]:
        """The run's strategy configs: one, or a combination's."""
        return parts_of(self.strategy)

    @property
    def strategy_name(self) -> str:
        """The strategy's name; a combination's names joined by '+' (``replay+lwf``)."""
        return combined_name(self.strategy)

    def with_strategy(self, name: str, *, seed: int | None = None, output_dir: str | None = None,
                      order: list[str] | None = None) -> RunConfig:
        """This config running strategy ``name`` (or a combination, ``replay+lwf``) with its settings
        from ``strategies`` (and its tasks in ``order``, a list of their names)."""
        names = name.split("+")
        for one in names:
            if one not in STRATEGY_CONFIGS:
                raise ConfigError(unknown(one))
        data = self.model_dump(by_alias=True)
        blocks = [getattr(self.strategies, one).model_dump(by_alias=True) for one in names]
        data["strategy"] = blocks if len(blocks) > 1 else blocks[0]
        if order is not None:
            data["stream"]["tasks"] = [t.model_dump(by_alias=True) for t in self.stream.in_order(order)]
        if seed is not None:
            data["seed"] = seed
        if output_dir is not None:
            data["output_dir"] = output_dir
        return validate_config(data, origin=f"strategy {name}")


# ----------------------------------------------------------------------------------- pretraining
class CorpusBuiltinSource(Schema):
    kind: Literal["builtin"]
    name: Literal["chitchat"] = "chitchat"  # chitchat-dataset 0.9.0: 7,168 conversations, 2.5M words (MIT)


class CorpusFileSource(Schema):
    """A local JSONL, CSV or Parquet file, one document per row in ``text_column``."""

    kind: Literal["file"]
    path: str
    text_column: str = "text"


CorpusSource = Annotated[Union[CorpusBuiltinSource, CorpusFileSource], Field(discriminator="kind")]


class CorpusConfig(Schema):
    source: CorpusSource = CorpusBuiltinSource(kind="builtin")
    max_documents: int | None = Field(default=None, gt=0)  # cap on training documents (after the held-out cut)
    heldout_documents: int = Field(default=300, gt=0)  # documents never trained on: the held-out split
    seq_len: int = Field(default=64, ge=4)  # tokens per example before corruption (documents are packed)


class ObjectiveConfig(Schema):
    """Denoising settings: T5 span corruption (t5) or BART text infilling (bart), as the papers set them."""

    noise_density: float = Field(default=0.15, gt=0, lt=1)  # t5: share of tokens corrupted
    mean_span_length: float = Field(default=3.0, ge=1)  # t5
    num_sentinels: int = Field(default=100, ge=1, le=1000)  # t5: <extra_id_0> ... added to the vocabulary
    mask_ratio: float = Field(default=0.3, gt=0, lt=1)  # bart
    poisson_lambda: float = Field(default=3.0, gt=0)  # bart: span lengths ~ Poisson(lambda)
    permute_sentences: bool = False  # bart: shuffle a document's sentences in the input


class PretrainConfig(Schema):
    """``forgetless pretrain``: a tokenizer trained on the corpus alone, then a T5 (span corruption) or
    BART (text infilling) pretrained through the same DeepSpeed-on-Ray worker group as a stream."""

    overwrite: bool = False
    experiment: FileName = "pretrain"
    seed: int = 0
    output_dir: str | None = None  # None: <cache_dir>/pretrained/<arch>-<preset>-<digest of this config>
    cache_dir: str = "~/.cache/forgetless"
    model: ModelConfig = ModelConfig()
    corpus: CorpusConfig = CorpusConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    training: TrainingConfig = TrainingConfig(max_steps=1000)
    eval_every_n_steps: int = Field(default=100, gt=0)
    heldout_examples: int = Field(default=256, gt=0)
    mlflow: MlflowConfig = MlflowConfig(experiment_name="forgetless-pretrain")
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _pretrainable(self) -> PretrainConfig:
        if self.model.arch not in ("t5", "bart") or self.model.preset is None:
            raise ValueError("model: pretraining builds a T5 or BART from a preset (model.arch t5 or bart, "
                             "model.preset tiny/small/base)")
        if self.training.max_steps is None:
            raise ValueError("training.max_steps: pretraining runs a fixed number of steps; set it")
        return self


# Keys that change where a pretraining runs or how it is watched, not what it produces.
PRETRAIN_PLACEMENT = ("overwrite", "experiment", "output_dir", "cache_dir", "mlflow", "ray")


RUN_CONTROL = ("resume", "overwrite")  # RunConfig keys that steer this invocation, not the experiment


def check_precision(arch: str, precision: str) -> None:
    """Refuse fp16 for T5: its activations overflow fp16's range (transformers #5651, #11461)."""
    if precision == "fp16" and arch == "t5":
        raise ConfigError(
            "training.precision: fp16 is refused for T5 — its feed-forward activations overflow fp16 "
            "and the loss turns NaN (transformers issues #5651, #11461); use bf16 (GPU) or fp32"
        )


def experiment_dict(config: RunConfig) -> dict[str, Any]:
    """The config as JSON-ready data without the run-control keys: what a run is, not how it was started.
    Secrets in URIs are redacted (see ``pipelines.redaction``): this is what config.yaml, MLflow params
    and the report show."""
    return redact_data(config.model_dump(mode="json", by_alias=True, exclude=set(RUN_CONTROL)))


# ----------------------------------------------------------------------------------- loading
def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


_UNION_FIELDS = {"source", "strategy"}
_UNION_TAGS = {"builtin", "file", "hf", "one", "combination", *STRATEGY_CONFIGS}


def _format_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        # discriminated unions put the tag in the path (source.builtin.name, strategy.one.lwf.alpha,
        # strategy.combination.1.lwf.alpha): drop the tags
        kept: list[str] = []
        for p in loc:
            tagged = kept and (kept[-1] in _UNION_FIELDS or (kept[-1].isdigit() and "strategy" in kept))
            if not (tagged and p in _UNION_TAGS):
                kept.append(p)
        loc = kept
        path = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {msg}" if path else msg)
    return problems


def validate_config(data: dict[str, Any], *, origin: str = "<config>", schema: type[Schema] | None = None) -> Any:
    """Validate a plain dict (as a ``RunConfig`` unless ``schema`` says otherwise); every problem is
    reported at once, with dotted paths."""
    try:
        return (schema or RunConfig).model_validate(data)
    except ValidationError as exc:
        problems = _format_problems(exc)
        raise ConfigError(
            f"config error in {origin} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  "
            + "\n  ".join(problems),
            problems=problems,
        ) from None


def load_pretrain_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """``load_config`` for a pretrain config."""
    return load_config(path, overrides, schema=PretrainConfig)


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                schema: type[Schema] | None = None) -> Any:
    """Load a YAML experiment file, apply ``key=value`` overrides, validate.

    Args:
        path: the experiment YAML.
        overrides: dotted ``key=value`` strings; values are parsed as YAML (``1e-3``, ``null``,
            ``[a, b]``). List items are addressed by index: ``stream.tasks.0.max_train_examples=50``.

    Raises:
        ConfigError: the file is missing or not YAML, or the result fails validation (all
            problems listed, with the file name).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); re-encode it as "
                          "UTF-8") from None
    stream = io.StringIO(text)
    stream.name = str(path)  # YAML errors then say where: in "<file>", line 3, column 5
    try:
        loaded = yaml.safe_load(stream)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, (dict, type(None))):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not a {type(loaded).__name__}")
    _refuse_resolvers(loaded, path)  # before OmegaConf sees it: selecting a key below would resolve it
    try:
        cfg = OmegaConf.create(loaded or {})
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config file {path} cannot be loaded: {exc}") from None
    for item in overrides:
        key, value = _parse_override(item)
        _refuse_resolvers(value, path, f"{key}.")
        try:
            # a list over a mapping (strategy=[replay, lwf] over a strategy block), or the reverse,
            # replaces it; a mapping over a mapping merges into it
            current = OmegaConf.select(cfg, key, default=None)
            merge = not (OmegaConf.is_config(current) and isinstance(value, (list, dict))
                         and OmegaConf.is_list(current) != isinstance(value, list))
            OmegaConf.update(cfg, key, value, merge=merge, force_add=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r} cannot be applied to {path}: {exc}") from None
    try:  # every value came from the file or an override, both checked above
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config file {path}: a ${{...}} reference cannot be resolved: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    origin = str(path) + (f" with overrides {list(overrides)}" if overrides else "")
    return validate_config(data, origin=origin, schema=schema)


# ``${other.key}``: a reference to another value of the same config, the only interpolation taken.
_REFERENCE = re.compile(r"\$\{\s*\.*[A-Za-z_][\w\-]*(?:\.[\w\-]+|\[\d+\])*\s*\}")


def _refuse_resolvers(data: Any, path: Path, key: str = "") -> None:
    """Refuse any ``${...}`` but a reference inside the config: a resolver (``${oc.env:SECRET}``,
    ``${oc.decode:...}``) would copy the environment, or anything else, into values that are
    logged to MLflow and written to report.json and config.yaml — a config shared with others must
    not be able to read the environment of whoever runs it.

    Raises:
        ConfigError: naming the key and the interpolation.
    """
    if isinstance(data, dict):
        for name, value in data.items():
            _refuse_resolvers(value, path, f"{key}{name}.")
    elif isinstance(data, list):
        for index, value in enumerate(data):
            _refuse_resolvers(value, path, f"{key}{index}.")
    elif isinstance(data, str) and "${" in data:
        rest = re.sub(r"\\\$\{", "", _REFERENCE.sub("", data))  # references and escaped \${ are fine
        if "${" in rest:
            raise ConfigError(f"config file {path}: {key.rstrip('.')} = {data!r}: only references to other keys of "
                              "the config (${section.key}) are interpolated; resolvers such as ${oc.env:...} are off, "
                              "so a shared config cannot copy the environment into what a run logs. Write the value "
                              "itself")


def flatten(config: Schema | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten to dotted keys (``training.lr``), lists by index — for MLflow params."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    out: dict[str, Any] = {}
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        dotted = f"{prefix}{key}"
        if isinstance(value, (dict, list)) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def resolve_paths(config: RunConfig, *, cwd: str | os.PathLike | None = None) -> RunConfig:
    """Make every path absolute (workers run in other directories) and fill the MLflow default.

    The default tracking store is ``sqlite:///<cwd>/mlflow.db``: one store for every run started
    from the same directory, which ``mlflow ui`` opens directly. The config was validated when it
    was loaded; only path strings change here, so nothing is validated again.
    """
    base = Path(cwd or os.getcwd())

    def absolute(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    def absolute_if_local(p: str | None) -> str | None:
        return absolute(p) if p and (base / Path(p).expanduser()).exists() else p

    tasks = []
    for task in config.stream.tasks:
        source = task.source
        if isinstance(source, FileSource) or (isinstance(source, HFSource) and (base / source.path).exists()):
            task = task.model_copy(update={"source": source.model_copy(update={"path": absolute(source.path)})})
        tasks.append(task)
    model = config.model.model_copy(update={
        "name_or_path": absolute_if_local(config.model.name_or_path),
        "pretrain": absolute(config.model.pretrain) if config.model.pretrain else None,
        "encoder": absolute_if_local(config.model.encoder),
        "tokenizer": config.model.tokenizer.model_copy(
            update={"name_or_path": absolute_if_local(config.model.tokenizer.name_or_path)}),
    })
    replay = config.replay
    if replay.directory:
        replay = replay.model_copy(update={"directory": absolute(replay.directory)})
    mlflow = config.mlflow
    if mlflow.tracking_uri is None:
        mlflow = mlflow.model_copy(update={"tracking_uri": f"sqlite:///{base.resolve() / 'mlflow.db'}"})
    return config.model_copy(update={
        "output_dir": absolute(config.output_dir),
        "stream": config.stream.model_copy(update={"tasks": tasks, "cache_dir": absolute(config.stream.cache_dir)}),
        "model": model,
        "training": config.training.model_copy(
            update={"deepspeed_config": absolute_if_local(config.training.deepspeed_config)}),
        "replay": replay,
        "mlflow": mlflow,
    })
