"""What a run is, resolved on the driver before any worker starts: the report and config changes
it resumes from, its stream (with the pretraining task when it measures one), its starting weights,
its tokenizer, a frozen-model paradigm's heads or prompts — every check of the input on the way.
``forgetless run``, ``compare`` and ``table1`` resolve a run here; ``actors.launch`` runs it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from tqdm.auto import tqdm

from actors.cluster import cluster_address
from pipelines.config import ObjectiveConfig, PretrainConfig, RunConfig, experiment_dict
from pipelines.errors import ConfigError, DataError
from pipelines.models import (build_model, count_parameters, directory_digest, encoder_decoder_config, fetch_encoder,
                              hf_config, load_tokenizer, long_targets, model_size, preset_config, stream_tokenizer,
                              target_ceilings)
from pipelines.paradigms import TaskSlot, check_paradigm, check_prompt_lengths, eval_sets, task_slots
from pipelines.plan import check_stream, fingerprint
from pipelines.report import ModelInit, RunReport
from pipelines.resume import refuse_extending_dropped
from pipelines.rundir import OutputDir, config_changes, contained_report
from pipelines.tasks import TaskStream, load_stream
from storage.files import atomic_directory

if TYPE_CHECKING:
    from actors.launch import RunWorkers


@dataclass(frozen=True)
class ResolvedRun:
    """A run ready to start: what the scheduler and the workers are handed."""

    stream: TaskStream
    start: ModelStart
    tokenizer_dir: Path
    slots: list[TaskSlot] | None  # a frozen-model paradigm's heads or prompts (None: fine-tuning)
    previous: RunReport | None = None  # the report it resumes from
    changes: list[str] | None = None  # the config changes that resumption brings
    ceilings: dict[str, float] | None = None  # each task's best reachable score (models.target_ceilings)


def resolve_run(config: RunConfig, output: OutputDir, *, resuming: bool, progress: bool,
                workers: RunWorkers | None = None) -> ResolvedRun | RunReport:
    """Resolve a run whose output directory this process holds; the previous report itself when every
    task is finished and the resume adds none (nothing to train).

    ``workers``: the run's worker groups (``actors.launch.RunWorkers``), for a pretrain config the
    stream names and the cache does not hold yet: it is built in the group the stream then trains in.

    Raises:
        ConfigError, DataError: bad input, each named with where it is.
    """
    previous, changes = prepare_resume(config, output) if resuming else (None, [])
    stream = load_stream(config)
    start = resolve_start(config, progress=progress, workers=workers)
    stream = _with_pretraining_task(config, stream, start)
    if previous is not None:
        _check_finished_data(previous, stream, output)
        refuse_extending_dropped(previous, stream.names)
        if config.paradigm.has_task_parameters and stream.names != previous.tasks:
            raise ConfigError(f"paradigm {config.paradigm.name} gives each task of the stream its own parameters "
                              f"when the run starts ({previous.tasks}); a resume cannot add or change tasks "
                              f"({stream.names}): start a new run for the longer stream")
        if previous.finished_tasks == len(stream) and previous.tasks == stream.names:
            return previous
    check_stream(config, stream)
    check_paradigm(config, stream)
    tokenizer_dir = _prepare_tokenizer(config, stream, output, resuming=resuming, start=start)
    tokenizer = load_tokenizer(tokenizer_dir)
    ceilings, problems = target_ceilings(tokenizer, stream, config.stream.max_target_tokens,
                                         config.evaluation.normalize)
    for problem in problems:
        tqdm.write(f"warning: {problem}", file=sys.stderr)
    # a local run only: its workers share this machine (a run on a cluster, or in a job submitted to one,
    # has nodes this driver does not know before Ray starts)
    if config.paradigm.name == "fine_tuning" and config.training.check_memory and cluster_address(config) is None:
        check_memory(config, tokenizer, start)
    slots = None
    if config.paradigm.name != "fine_tuning":  # a frozen-model paradigm's heads or prompts, its prompts' lengths
        slots = task_slots(config, stream, tokenizer)
        check_prompt_lengths(config, eval_sets(config, stream), tokenizer)
    return ResolvedRun(stream, start, tokenizer_dir, slots, previous, changes, ceilings)


def available_memory() -> int | None:
    """This machine's available memory in bytes (Linux's MemAvailable), None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(config: RunConfig, tokenizer: Any, start: ModelStart, *, host_bytes: int | None = None) -> None:
    """Refuse a local run whose training cannot fit this machine (its workers share it), before Ray
    starts: ZeRO's per-worker estimate against the available memory, with the nearest setting that
    fits (pipelines.memory). The model is counted from its config (T5, BART, BERT2BERT: no torch);
    another architecture is built on torch's meta device to count it.

    Raises:
        ConfigError: it does not fit; naming the estimate, its parts and a setting that would fit.
    """
    from pipelines.deepspeed_config import build_deepspeed_config, resolve_precision
    from pipelines.memory import refuse_unless_it_fits, run_setting, shape_of

    host_bytes = host_bytes or available_memory()
    if host_bytes is None:
        return
    on_cuda = config.training.use_gpu is not False and _has_nvidia_gpu()
    accelerator = None
    if on_cuda:  # torch only where there is a GPU to ask about
        import torch

        on_cuda = torch.cuda.is_available()
        accelerator = torch.cuda.get_device_properties(0).total_memory if on_cuda else None
    precision = resolve_precision(config.training, on_cuda=on_cuda)
    ds = build_deepspeed_config(config.training, world_size=config.training.num_workers, precision=precision,
                                on_cuda=on_cuda)
    if config.model.preset is not None:  # without transformers' config classes: they import torch
        model_config = preset_config(config.model, len(tokenizer))
    elif config.model.arch == "encoder_decoder":
        model_config = encoder_decoder_config(start.checkpoint or config.model.encoder)
    else:
        model_config = hf_config(config.model, tokenizer, start.checkpoint)
    parameters = count_parameters(model_config, len(tokenizer))
    if parameters is None:  # counted from the config where it can be, else built on the meta device
        parameters, model_config = model_size(config.model, tokenizer, start.checkpoint)
    refuse_unless_it_fits(shape_of(model_config, parameters),
                          run_setting(config, ds, on_cuda=on_cuda, precision=precision), host_bytes=host_bytes,
                          accelerator_bytes=accelerator, where="training (training.check_memory=false skips this check)")


def _has_nvidia_gpu() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def prepare_resume(config: RunConfig, output: OutputDir) -> tuple[RunReport, list[str]]:
    """The report to resume from and the (allowed) config changes; refuse the others, all listed.

    Raises:
        ConfigError: the saved run cannot be read, or the config changes what its finished rows mean.
    """
    previous = contained_report(RunReport.read(output.report), output.path)
    try:
        saved = yaml.safe_load(output.config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{output.config}: cannot read the saved config of the run to resume ({exc})") from None
    refused, allowed = config_changes(saved, experiment_dict(config), finished_tasks=previous.finished_tasks)
    if refused:
        raise ConfigError(
            f"cannot resume {output.path}: {len(refused)} change(s) would alter what its {previous.finished_tasks} "
            f"finished task(s) mean, or what its saved state loads into:\n  " + "\n  ".join(refused)
            + "\nUndo them (the saved config is " + str(output.config) + "), or start a new run in another "
              "output_dir", problems=refused)
    return previous, allowed


def _check_finished_data(previous: RunReport, stream: TaskStream, output: OutputDir) -> None:
    changed = []
    for task in stream.tasks[: previous.finished_tasks]:
        digest, now = previous.resume.data_fingerprints.get(task.name), fingerprint(task)
        if digest is not None and digest != now:
            changed.append(f"task {task.name!r}: its examples changed since it was trained ({digest} -> {now})")
    if changed:
        raise DataError(f"cannot resume {output.path}: the data of finished tasks changed:\n  " + "\n  ".join(changed)
                        + "\nRestore the original data, or start a new run in another output_dir")


def _prepare_tokenizer(config: RunConfig, stream: TaskStream, output: OutputDir, *, resuming: bool,
                       start: ModelStart) -> Path:
    """A resumed run keeps its tokenizer (the model's vocabulary); a new one builds and saves it."""
    if resuming and output.tokenizer.is_dir():
        return output.tokenizer
    tokenizer = stream_tokenizer(config.model, stream, start.checkpoint)
    for problem in long_targets(tokenizer, stream, config.stream.max_target_tokens):
        tqdm.write(f"warning: {problem}", file=sys.stderr)
    with atomic_directory(output.tokenizer) as tmp:
        tokenizer.save_pretrained(tmp)
    if config.model.name_or_path:
        build_model(config.model, tokenizer)  # a bad directory fails here, not in every worker
    return output.tokenizer


def shared_tokenizer(config: RunConfig, directory: Path, *, progress: bool,
                     workers: RunWorkers | None = None) -> dict[str, str]:
    """The one tokenizer of a comparison (``forgetless compare``): built as a run of ``config`` in its
    own task order builds its own (trained on what ``model.tokenizer.train_on`` allows, or a
    checkpoint's), saved in ``directory`` for every run to load. Returns where it is, its digest
    and what it came from (comparison.json records them).

    Every strategy, order and seed then reads the same vocabulary: a tokenizer trained per run
    would confound the orders with their vocabularies (and Unigram training is not bit-for-bit
    repeatable across processes). An order whose first task is another reads a vocabulary fitted
    to the config's first task. ``workers``: the comparison's worker groups, where a pretrain config
    the stream names is built (``resolve_start``)."""
    stream = load_stream(config)
    start = resolve_start(config, progress=progress, workers=workers)
    stream = _with_pretraining_task(config, stream, start)
    tokenizer = stream_tokenizer(config.model, stream, start.checkpoint)
    with atomic_directory(directory) as tmp:
        tokenizer.save_pretrained(tmp)
    source = config.model.tokenizer.name_or_path or start.checkpoint
    trained_on = (stream.names[0] if config.model.tokenizer.train_on == "first_task" else "every task's training rows")
    return {"path": str(directory), "digest": directory_digest(directory),
            "source": f"loaded from {source}" if source else f"trained on {trained_on} (the config's own order)"}


@dataclass(frozen=True)
class ModelStart:
    """Where a stream's weights come from, resolved on the driver: the ``init`` record of the report,
    the directory workers load, and (our own pretrained T5/BART) the objective and pretrain config."""

    init: ModelInit
    checkpoint: str | None = None
    objective: dict[str, Any] | None = None
    pretrain: PretrainConfig | None = None


def _objective(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pretraining objective a checkpoint's manifest records (its seed corrupts the held-out set)."""
    if not manifest or "objective" not in manifest:
        return None
    fields = {k: v for k, v in manifest["objective"].items() if k in ObjectiveConfig.model_fields}
    return {"arch": manifest["arch"], "objective": fields, "seed": manifest["seed"]}


def resolve_start(config: RunConfig, *, progress: bool, workers: RunWorkers | None = None) -> ModelStart:
    """The stream's starting weights: a pretrain config built (once) into the cache (in ``workers``'
    group when given, else in a worker group of its own), the named encoder fetched, a checkpoint
    directory's manifest read.

    Raises:
        ConfigError: the pretrain config or the checkpoint cannot be used.
    """
    model = config.model
    kind = "random" if model.weights == "random" else "pretrained"
    if model.preset is not None:
        return ModelStart(ModelInit(kind="random", source=f"preset {model.arch}/{model.preset}"))
    from pipelines.pretraining import read_manifest  # imports torch: only a start from a checkpoint reads one

    if model.pretrain is not None:
        from actors.pretrain import ensure_pretrained

        directory, pretrain = ensure_pretrained(model.pretrain, cache_dir=config.stream.cache_dir, progress=progress,
                                                tracking_uri=config.mlflow.tracking_uri, workers=workers)
        manifest = read_manifest(directory)
        return ModelStart(ModelInit(kind=kind, source=f"pretrain {model.pretrain}", checkpoint=str(directory),
                                    pretrain=manifest), str(directory), _objective(manifest), pretrain)
    if model.encoder is not None:
        directory = fetch_encoder(model.encoder, config.stream.cache_dir)
        return ModelStart(ModelInit(kind=kind, source=f"encoder {model.encoder}", checkpoint=directory), directory)
    manifest = read_manifest(model.name_or_path) if Path(model.name_or_path).is_dir() else None
    return ModelStart(ModelInit(kind=kind, source=f"name_or_path {model.name_or_path}",
                                checkpoint=model.name_or_path, pretrain=manifest),
                      model.name_or_path, _objective(manifest))


def _with_pretraining_task(config: RunConfig, stream: TaskStream, start: ModelStart) -> TaskStream:
    if not config.stream.has_pretraining_task:  # the config's validation ties it to model.pretrain
        return stream
    from pipelines.pretraining import pretraining_task

    task = pretraining_task(config.stream.pretraining_task, start.pretrain, load_tokenizer(start.checkpoint))
    return TaskStream((task, *stream.tasks))
