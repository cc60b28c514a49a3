"""Continual-learning strategies, training side: the loss a worker trains with and the state it
keeps across tasks.

A strategy is split where the processes are. The planning side (what each task trains on, which
teacher, how much replay) is plain data in ``pipelines.plan``, used by the scheduler. Here, in
every trainer worker, ``before_task`` / ``loss`` / ``after_task`` run around the training loop and
get a small ``TrainingContext`` — the model, the task's batches, the collectives — never the
whole learner. State kept across tasks (EWC's Fisher) is saved with the training state, so a
resumed run carries it on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from pipelines.config import (
    CumulativeStrategyConfig,
    EwcStrategyConfig,
    JointStrategyConfig,
    LwfStrategyConfig,
    NaiveStrategyConfig,
    ReplayStrategyConfig,
    RunConfig,
    Schema,
)
from pipelines.denoising import IGNORE_INDEX
from pipelines.distributed import Collectives
from pipelines.plan import TaskPlan

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainingContext:
    """What a strategy's training side may use."""

    module: torch.nn.Module  # the model itself (full parameters under ZeRO <= 2)
    device: torch.device
    dtype: torch.dtype
    comm: Collectives
    batches: Callable[[], Iterator[Batch]]  # a fresh iterator over this rank's micro-batches of the task


class TrainingStrategy(Protocol):
    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None: ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training loss of one micro-batch (``model`` is the engine: call it to run forward)."""
        ...

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """State kept across tasks, saved with the training state (empty: none)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CrossEntropy:
    """Plain cross-entropy on whatever the plan holds: naive, cumulative, joint and replay differ
    only in their plans (own task, all seen, all at the end, replayed rows mixed in)."""

    def __init__(self, config: Schema, run: RunConfig):
        self.config = config

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        pass

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch).loss

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      variant: str, temperature: float) -> torch.Tensor:
    """Per-token distillation of the teacher into the student, averaged over non-padding tokens.

    ``kl``: T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al. 2015; the T^2
    keeps gradient size independent of T). T = 2 softens the teacher much as the lecture's square
    root of the probabilities does. ``mse``: mean squared difference of the logits (the lecture's
    "analog" loss). Positions where ``labels == -100`` (padding) count for nothing.
    """
    mask = (labels != IGNORE_INDEX).to(student_logits.dtype)
    if variant == "kl":
        log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1) * temperature**2
    elif variant == "mse":
        per_token = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
    else:
        raise ValueError(f"unknown distillation variant {variant!r}; choose 'kl' or 'mse'")
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class LwF:
    """Learning without Forgetting (Li & Hoiem 2016): the model saved at the previous task boundary,
    loaded frozen, is distilled into the student on the new task's inputs with the same decoder
    inputs. loss = (1 - alpha) * CE + alpha * distillation; on the first task, CE alone."""

    def __init__(self, config: LwfStrategyConfig, run: RunConfig):
        self.config = config
        self.max_target_tokens = run.stream.max_target_tokens
        self.teacher: torch.nn.Module | None = None

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        self.teacher = None
        if plan.teacher_dir:
            self.teacher = load_frozen(plan.teacher_dir, device=context.device, dtype=context.dtype)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        config = self.config
        if self.teacher is None or config.alpha == 0:
            return model(**batch).loss
        if config.variant == "pseudo_labels":
            with torch.no_grad():
                generated = self.teacher.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                  max_new_tokens=self.max_target_tokens, do_sample=False, num_beams=1)
            pseudo = generated[:, 1:].clone()  # drop the decoder start token
            pseudo[pseudo == self.teacher.config.pad_token_id] = IGNORE_INDEX
            own = model(**batch).loss
            theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=pseudo).loss
            return (1 - config.alpha) * own + config.alpha * theirs
        out = model(**batch)
        with torch.no_grad():
            teacher_logits = self.teacher(**batch).logits  # same labels -> same decoder inputs
        distill = distillation_loss(out.logits, teacher_logits, batch["labels"], variant=config.variant,
                                    temperature=config.temperature)
        return (1 - config.alpha) * out.loss + config.alpha * distill

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        self.teacher = None  # free it; the next task loads the model just saved

    def state_dict(self) -> dict[str, Any]:
        return {}  # the teacher is a checkpoint on disk, named by the next plan

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def load_frozen(directory: str | Path, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A saved checkpoint as a frozen teacher: eval mode, no gradients, never stepped."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory)).to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017), diagonal Fisher.

    After each task: F = the empirical Fisher over ``fisher_examples`` of the task's examples (see
    :func:`empirical_fisher`), summed over tasks; anchor w* = the weights then.
    Loss = CE + lambda / 2 * sum_i F_i (w_i - w*_i)^2. Needs full parameters on every worker
    (ZeRO <= 2), checked in the config.
    """

    def __init__(self, config: EwcStrategyConfig, run: RunConfig):
        self.config = config
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        pass

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

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        per_rank = math.ceil(self.config.fisher_examples / context.comm.world_size)  # each rank its share
        fisher = empirical_fisher(context.module, context.batches(), per_rank)
        context.comm.all_reduce_mean(list(fisher.values()))
        for n, value in fisher.items():
            self.fisher[n] = self.fisher[n] + value if n in self.fisher else value
        self.anchor = {n: p.detach().float().clone() for n, p in context.module.named_parameters() if n in fisher}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchor = dict(state.get("fisher", {})), dict(state.get("anchor", {}))


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
                tokens = (one["labels"] != IGNORE_INDEX).sum()
                nll = module(**one).loss * tokens  # the model's loss is the mean over target tokens
                grads = torch.autograd.grad(nll, [p for _, p in named], allow_unused=True)
                for (n, _), g in zip(named, grads):
                    if g is not None:
                        fisher[n] += g.float().pow(2)
                seen += 1
    finally:
        module.train(was_training)
    return {n: f / seen for n, f in fisher.items()}


TRAINERS: dict[type[Schema], type] = {
    NaiveStrategyConfig: CrossEntropy, JointStrategyConfig: CrossEntropy, CumulativeStrategyConfig: CrossEntropy,
    ReplayStrategyConfig: CrossEntropy, LwfStrategyConfig: LwF, EwcStrategyConfig: EWC,
}


def build_training_strategy(run: RunConfig) -> TrainingStrategy:
    """The training side of ``run.strategy``."""
    return TRAINERS[type(run.strategy)](run.strategy, run)
