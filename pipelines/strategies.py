"""Continual-learning strategies: what a task trains on, and the loss it trains with.

A strategy is split where the processes are. In the scheduler, ``training_examples`` sees the whole
stream and returns plain data (None: no training at this task). In every trainer worker,
``before_task`` / ``loss`` / ``after_task`` run around the training loop; state that a strategy
keeps across tasks (EWC's Fisher, LwF's teacher) lives in the worker's strategy object, which
lives as long as the worker group (the whole stream).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa
import torch
import torch.nn.functional as F

from pipelines.config import EwcStrategyConfig, LwfStrategyConfig, ReplayStrategyConfig, Schema, TrainingConfig
from pipelines.tasks import TaskStream

if TYPE_CHECKING:
    from pipelines.learner import Learner, TaskPlan

Batch = dict[str, torch.Tensor]


class Strategy(Protocol):
    name: str
    replay_ratio: float  # share of each micro-batch drawn from the replay store (0: none)
    needs_teacher: bool  # the model after the previous task must be saved and handed over

    def training_examples(self, stream: TaskStream, task_index: int) -> pa.Table | None:
        """(source, target) rows to train on at task ``task_index``, prefixes applied; None: skip."""
        ...

    def plan_max_steps(self, stream: TaskStream, task_index: int, training: TrainingConfig) -> int | None:
        """Steps for this task when the strategy decides them (else None: the learner's rule)."""
        ...

    def before_task(self, learner: Learner, plan: TaskPlan) -> None: ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training loss of one micro-batch."""
        ...

    def after_task(self, learner: Learner, plan: TaskPlan) -> None: ...


def task_examples(stream: TaskStream, task_indices: range | list[int]) -> pa.Table:
    return pa.concat_tables(
        pa.table({"source": stream[i].sources("train"), "target": stream[i].targets("train")}) for i in task_indices
    )


class Naive:
    """Sequential fine-tuning: each task's own data, plain cross-entropy. Forgets; the lower bound."""

    name = "naive"
    replay_ratio = 0.0
    needs_teacher = False

    def __init__(self, config: Schema):
        self.config = config

    def training_examples(self, stream: TaskStream, task_index: int) -> pa.Table | None:
        return task_examples(stream, [task_index])

    def plan_max_steps(self, stream: TaskStream, task_index: int, training: TrainingConfig) -> int | None:
        return None

    def before_task(self, learner: Learner, plan: TaskPlan) -> None:
        pass

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch).loss

    def after_task(self, learner: Learner, plan: TaskPlan) -> None:
        pass


class Cumulative(Naive):
    """At task t, train on the union of tasks 0..t (the same number of steps per task as naive)."""

    name = "cumulative"

    def training_examples(self, stream: TaskStream, task_index: int) -> pa.Table | None:
        return task_examples(stream, range(task_index + 1))


class Joint(Naive):
    """Multitask training, the upper bound: nothing until the last task, then one training on
    every task's data with the steps all tasks would have had together. Only the final row of
    its matrix is meaningful (earlier rows are the untrained model)."""

    name = "joint"

    def training_examples(self, stream: TaskStream, task_index: int) -> pa.Table | None:
        return task_examples(stream, range(len(stream))) if task_index == len(stream) - 1 else None

    def plan_max_steps(self, stream: TaskStream, task_index: int, training: TrainingConfig) -> int | None:
        per_task = [t.max_steps or (None if t.epochs else training.max_steps) for t in stream]
        if all(per_task):
            return sum(per_task)  # same budget as the sequential strategies
        return None  # epoch-based: the union's size already gives the summed budget


class Replay(Naive):
    """Each micro-batch mixes ``replay_ratio`` examples of earlier tasks, sampled from the replay
    store, with the new task's. The scheduler inserts each task's examples after it is trained."""

    name = "replay"

    def __init__(self, config: ReplayStrategyConfig):
        super().__init__(config)
        self.replay_ratio = config.replay_ratio


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      variant: str, temperature: float) -> torch.Tensor:
    """Per-token distillation of the teacher into the student, averaged over non-padding tokens.

    ``kl``: T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al. 2015; the T^2
    keeps gradient size independent of T). T = 2 softens the teacher much as the lecture's square
    root of the probabilities does. ``mse``: mean squared difference of the logits (the lecture's
    "analog" loss). Positions where ``labels == -100`` (padding) count for nothing.
    """
    mask = (labels != -100).to(student_logits.dtype)
    if variant == "kl":
        log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1) * temperature**2
    elif variant == "mse":
        per_token = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
    else:
        raise ValueError(f"unknown distillation variant {variant!r}; choose 'kl' or 'mse'")
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class LwF(Naive):
    """Learning without Forgetting (Li & Hoiem 2016): the model saved at the previous task boundary,
    loaded frozen, is distilled into the student on the new task's inputs with the same decoder
    inputs. loss = (1 - alpha) * CE + alpha * distillation; on the first task, CE alone."""

    name = "lwf"
    needs_teacher = True

    def __init__(self, config: LwfStrategyConfig):
        super().__init__(config)
        self.teacher: torch.nn.Module | None = None
        self._max_target_tokens = 32

    def before_task(self, learner: Learner, plan: TaskPlan) -> None:
        self.teacher = None
        if plan.teacher_dir:
            self.teacher = load_frozen(plan.teacher_dir, device=learner.engine.device,
                                       dtype=next(learner.model.parameters()).dtype)
        self._max_target_tokens = learner.config.stream.max_target_tokens

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        config: LwfStrategyConfig = self.config  # type: ignore[assignment]
        if self.teacher is None or config.alpha == 0:
            return model(**batch).loss
        if config.variant == "pseudo_labels":
            with torch.no_grad():
                generated = self.teacher.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                  max_new_tokens=self._max_target_tokens, do_sample=False, num_beams=1)
            pseudo = generated[:, 1:].clone()  # drop the decoder start token
            pad = self.teacher.config.pad_token_id
            pseudo[pseudo == pad] = -100
            own = model(**batch).loss
            theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=pseudo).loss
            return (1 - config.alpha) * own + config.alpha * theirs
        out = model(**batch)
        with torch.no_grad():
            teacher_logits = self.teacher(**batch).logits  # same labels -> same decoder inputs
        distill = distillation_loss(out.logits, teacher_logits, batch["labels"], variant=config.variant,
                                    temperature=config.temperature)
        return (1 - config.alpha) * out.loss + config.alpha * distill

    def after_task(self, learner: Learner, plan: TaskPlan) -> None:
        self.teacher = None  # free it; the next task loads the model just saved


def load_frozen(directory: str | Path, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A saved checkpoint as a frozen teacher: eval mode, no gradients, never stepped."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory)).to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class EWC(Naive):
    """Elastic weight consolidation (Kirkpatrick et al. 2017), diagonal Fisher.

    After each task: F = the empirical Fisher over ``fisher_examples`` of the task's examples (see
    :func:`empirical_fisher`), summed over tasks; anchor w* = the weights then.
    Loss = CE + lambda / 2 * sum_i F_i (w_i - w*_i)^2. Needs full parameters on every worker
    (ZeRO <= 2), checked in the config.
    """

    name = "ewc"

    def __init__(self, config: EwcStrategyConfig):
        super().__init__(config)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        module = getattr(model, "module", model)
        total = torch.zeros((), device=next(module.parameters()).device)
        for name, param in module.named_parameters():
            if name in self.fisher:
                total = total + (self.fisher[name] * (param.float() - self.anchor[name]).pow(2)).sum()
        return 0.5 * self.config.ewc_lambda * total

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        loss = model(**batch).loss
        return loss + self.penalty(model) if self.fisher else loss

    def after_task(self, learner: Learner, plan: TaskPlan) -> None:
        per_rank = math.ceil(self.config.fisher_examples / learner.world_size)  # each rank its share
        fisher = empirical_fisher(learner.model, learner.batches(plan), per_rank)
        learner.all_reduce_mean(list(fisher.values()))
        for n, value in fisher.items():
            self.fisher[n] = self.fisher[n] + value if n in self.fisher else value
        self.anchor = {n: p.detach().float().clone() for n, p in learner.model.named_parameters() if n in fisher}


def empirical_fisher(module: torch.nn.Module, batches: Iterator[Batch], num_examples: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over ``num_examples`` examples of the squared gradient of
    each example's log-likelihood (the sum over its target tokens), one backward pass per example.

    Per example, not per batch: the square of a batch-mean gradient is about ``1 / batch_size`` of
    the mean of the squares (the cross terms of unrelated examples cancel), which would quietly
    scale lambda down by the micro-batch size. Dropout is off while it runs: the Fisher of the
    model as it is.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    seen, was_training = 0, module.training
    module.eval()
    try:
        while seen < num_examples:
            batch = next(batches)
            for i in range(min(len(batch["labels"]), num_examples - seen)):
                one = {key: value[i : i + 1] for key, value in batch.items()}
                tokens = (one["labels"] != -100).sum()
                nll = module(**one).loss * tokens  # the model's loss is the mean over target tokens
                grads = torch.autograd.grad(nll, [p for _, p in named], allow_unused=True)
                for (n, _), g in zip(named, grads):
                    if g is not None:
                        fisher[n] += g.float().pow(2)
                seen += 1
    finally:
        module.train(was_training)
    return {n: f / seen for n, f in fisher.items()}


STRATEGIES: dict[str, type] = {"naive": Naive, "joint": Joint, "cumulative": Cumulative, "replay": Replay,
                               "lwf": LwF, "ewc": EWC}


def build_strategy(config: Schema) -> Strategy:
    name = getattr(config, "name", None)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](config)
