"""The four ways of reusing a pretrained model of the lecture's Table 1, as ways to run a stream.

- ``fine_tuning``: every weight trains; the stream's strategy decides how (``pipelines.strategies``).
- ``feature_extraction``: the pretrained model is frozen. Each task gets a linear classifier over
  its label set (the distinct targets of its training split), trained on the encoder's features:
  the mean over non-padding tokens of the mean of the top ``feature_layers`` hidden states,
  computed in eval mode (a fixed feature map). Predictions are label strings, scored as usual.
- ``prompt_engineering``: nothing trains. Each evaluated input is preceded by ``shots`` examples
  of its task's training split, drawn with the run's seed and never the evaluated input itself.
- ``prompt_tuning`` (Lester et al. 2021): the pretrained model is frozen. Each task gets
  ``prompt_length`` vectors put before the encoder's input embeddings, started from the token
  embeddings of an English prompt; they are all that trains.

A frozen body cannot forget and a per-task head or prompt cannot interfere: the forgetting these
paradigms show is zero by construction, and the tests check it bit for bit.

Per-task parameters (heads, prompts) exist from the start, one optimizer parameter group per task,
so one DeepSpeed engine serves the whole stream and its checkpoints resume as a fine-tuned run's
do. While task t trains only group t has a non-zero learning rate (AdamW then changes nothing else:
its update and its weight decay are both scaled by the learning rate), and group t's optimizer
state is reset when task t starts. The frozen weights are never handed to the optimizer.

This module is the driver's side (slots, prompts, checks; no torch, so the driver and the
scheduler start without it); the model the workers train is in ``pipelines.paradigm_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import ParadigmConfig, RunConfig
from pipelines.errors import DataError
from pipelines.plan import EvalSet
from pipelines.tasks import Task, TaskStream



@dataclass(frozen=True)
class TaskSlot:
    """One task's own parameters under a frozen-model paradigm, as plain data the driver decides."""

    name: str
    labels: tuple[str, ...] = ()  # feature_extraction: the classifier's classes, sorted
    prompt_ids: tuple[int, ...] = ()  # prompt_tuning: token ids whose embeddings start the prompt


def prompt_text(paradigm: ParadigmConfig, task: Task) -> str:
    """The English prompt a task's soft prompt starts from: ``prompt_init``, or the task's name in words."""
    return paradigm.prompt_init or task.name.replace("_", " ").replace("-", " ")


def task_slots(config: RunConfig, stream: TaskStream, tokenizer: Any) -> list[TaskSlot] | None:
    """The per-task parameters of a frozen-model paradigm, one slot per trained task (none for the
    others), after checking that every task can have them. None: the paradigm has no such parameters.

    Raises:
        DataError: feature extraction on a task without a label set (more distinct targets than
            ``paradigm.max_labels``: a generation task), or a prompt with no tokens.
    """
    paradigm = config.paradigm
    if not paradigm.has_task_parameters:
        return None
    if paradigm.name == "feature_extraction":
        return [TaskSlot(name, labels=labels) for name, labels in label_sets(config, stream).items()]
    slots = []
    for task in stream:
        if task.trainable:
            text = prompt_text(paradigm, task)
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise DataError(f"paradigm.prompt_init {text!r} (task {task.name!r}) has no tokens to start "
                                "the soft prompt from")
            slots.append(TaskSlot(task.name, prompt_ids=ids))
    return slots


def label_sets(config: RunConfig, stream: TaskStream) -> dict[str, tuple[str, ...]]:
    """Each trained task's label set (its distinct training targets, sorted), for feature extraction.

    Raises:
        DataError: a task with more distinct targets than ``paradigm.max_labels``: a generation task.
    """
    limit = config.paradigm.max_labels
    out = {}
    for task in stream:
        if not task.trainable:
            continue
        labels = tuple(sorted(set(task.targets("train"))))
        if len(labels) > limit:
            raise DataError(
                f"paradigm feature_extraction trains a classifier over a task's label set, but task {task.name!r} "
                f"has {len(labels)} distinct targets in {task.train.num_rows} training rows (more than "
                f"paradigm.max_labels={limit}): it is a generation task. Run it with fine_tuning or prompt_tuning, "
                "or raise paradigm.max_labels if it is a classification")
        out[task.name] = labels
    return out


def check_paradigm(config: RunConfig, stream: TaskStream) -> None:
    """Refuse what the run's paradigm cannot do with these tasks, before a tokenizer or a worker
    exists: a label set for feature extraction, enough training rows for the shots.

    Raises:
        DataError: naming the task and the setting.
    """
    if config.paradigm.name == "feature_extraction":
        label_sets(config, stream)
    elif config.paradigm.name == "prompt_engineering":
        eval_sets(config, stream)


def few_shot_sources(paradigm: ParadigmConfig, task: Task, *, seed: int, index: int) -> list[str]:
    """Task ``index``'s eval inputs, each preceded by ``paradigm.shots`` of its training examples.

    The examples of eval input i are drawn by a generator seeded with (seed, index, i): the same
    prompts for a seed whatever else runs. A training example whose input equals the evaluated one
    is never drawn (the splits are de-duplicated, but a user's data may repeat an input).

    Raises:
        DataError: fewer usable training examples than ``paradigm.shots``.
    """
    sources = task.sources("eval")
    if paradigm.shots == 0:
        return sources
    pool_sources, pool_targets = task.sources("train"), task.targets("train")
    if len(pool_sources) < paradigm.shots:
        raise DataError(f"paradigm.shots={paradigm.shots} in-context examples, but task {task.name!r} has "
                        f"{len(pool_sources)} training example(s) to draw them from; lower paradigm.shots")
    pool = np.asarray(pool_sources, dtype=object)
    prompts = []
    for i, query in enumerate(sources):
        rng = np.random.default_rng([seed, index, i])
        allowed = np.flatnonzero(pool != query)
        if len(allowed) < paradigm.shots:
            raise DataError(f"task {task.name!r}: eval example {i} leaves {len(allowed)} other training example(s) "
                            f"for paradigm.shots={paradigm.shots}; lower paradigm.shots")
        chosen = rng.choice(allowed, size=paradigm.shots, replace=False)
        shots = [paradigm.shot_template.format(source=pool_sources[j], target=pool_targets[j]) for j in chosen]
        prompts.append(paradigm.shot_separator.join([*shots, query_text(paradigm, query)]))
    return prompts


def query_text(paradigm: ParadigmConfig, source: str) -> str:
    """The evaluated input written as a shot with its target left out."""
    return paradigm.shot_template.format(source=source, target="").rstrip()


def eval_sets(config: RunConfig, stream: TaskStream) -> list[EvalSet]:
    """What every task is evaluated on; under prompt engineering with shots, its k-shot prompts; under
    ``evaluation.scoring: likelihood``, each classification task's label set to rank."""
    few_shot = config.paradigm.name == "prompt_engineering" and config.paradigm.shots > 0
    return [EvalSet(t.name, t.metric,
                    few_shot_sources(config.paradigm, t, seed=config.seed, index=i) if few_shot and t.trainable
                    else t.sources("eval"), t.targets("eval"), ranked_labels(config, t))
            for i, t in enumerate(stream)]


def ranked_labels(config: RunConfig, task: Task) -> tuple[str, ...]:
    """The labels a task's answers are chosen from under likelihood scoring: its distinct training
    targets, sorted, when it is a classification (exact match, at most ``evaluation.max_labels`` of
    them); () otherwise, and under feature extraction (its heads choose from the label set already)."""
    evaluation = config.evaluation
    if (evaluation.scoring != "likelihood" or config.paradigm.name == "feature_extraction" or not task.trainable
            or task.metric != "exact_match"):
        return ()
    labels = tuple(sorted(set(task.targets("train"))))
    return labels if len(labels) <= evaluation.max_labels else ()


def check_prompt_lengths(config: RunConfig, sets: list[EvalSet], tokenizer: Any) -> None:
    """Refuse k-shot prompts longer than ``stream.max_source_tokens`` before anything runs: cut to
    fit, a prompt would lose its end — the input being asked about.

    Raises:
        DataError: naming the task, the example and both lengths.
    """
    if config.paradigm.name != "prompt_engineering" or config.paradigm.shots == 0:
        return
    limit = config.stream.max_source_tokens
    for eval_set in sets:
        lengths = [len(ids) for ids in tokenizer(eval_set.sources)["input_ids"]]
        longest = int(np.argmax(lengths)) if lengths else 0
        if lengths and lengths[longest] > limit:
            raise DataError(
                f"task {eval_set.name!r}: the {config.paradigm.shots}-shot prompt of eval example {longest} is "
                f"{lengths[longest]} tokens, over stream.max_source_tokens={limit} (cut to fit, it would lose the "
                f"input it asks about); {sum(n > limit for n in lengths)} of {len(lengths)} prompts are too long. "
                "Lower paradigm.shots or raise stream.max_source_tokens (within the model's limit)")
