"""Continual-learning strategies, training side: the loss a worker trains with and the state it
keeps across tasks.

A strategy is split where the processes are. The planning side (what each task trains on, which
teacher, how much replay) is plain data in ``pipelines.plan``, used by the scheduler. Here, in
every trainer worker, ``before_task`` / ``loss`` / ``after_task`` run around the training loop and
get a small ``TrainingContext`` — the model, the task's batches, the collectives — never the
whole learner. State kept across tasks (EWC's Fisher) is saved with the training state, so a
resumed run carries it on. A micro-batch may carry more than the model's inputs (LwF's ``views``
under old prefixes, A-GEM's ``reference`` batch, DER++'s replayed batches): the strategy that asked
for them takes them out. A strategy's ``metrics`` (summed on the device over micro-batches) are
averaged over the logging window and ranks by the learner and logged as ``train/<name>``.
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
    AgemStrategyConfig,
    CumulativeStrategyConfig,
    DerppStrategyConfig,
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
    root of the probabilities does. ``mse``: the squared difference of the logits summed over the
    vocabulary (the lecture's "analog" loss; a mean over the vocabulary would be V times weaker).
    Positions where ``labels == -100`` (padding) count for nothing.
    """
    mask = (labels != IGNORE_INDEX).to(torch.float32)
    if variant == "kl":
        log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1) * temperature**2
    elif variant == "mse":
        per_token = (student_logits.float() - teacher_logits.float()).pow(2).sum(-1)
    else:
        raise ValueError(f"unknown distillation variant {variant!r}; choose 'kl' or 'mse'")
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def answer_labels(sequences: torch.Tensor, *, eos_id: int) -> torch.Tensor:
    """Generated answers (decoder start token dropped) as labels: everything after the first end
    of sequence is padding (-100); the end token itself is kept, as the teacher chose it."""
    answer = sequences[:, 1:].clone()
    is_eos = (answer == eos_id).int()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    answer[after_eos] = IGNORE_INDEX
    return answer


class LwF:
    """Learning without Forgetting (Li & Hoiem 2016), for a text-to-text model.

    In the paper the old model's outputs are recorded *for the old tasks' heads* on the new task's
    inputs, and the student is trained to keep them while it learns the new head. Here a task's
    head is its prefix: for each earlier task's prefix, the new micro-batch's inputs are put under
    it, the teacher (the model saved at the previous task boundary, frozen) answers them greedily,
    and the student, teacher-forced on that answer, is distilled towards the teacher's logits on it
    (``kl``, ``mse``) or trained on the answer itself (``pseudo_labels``). Answers are generated per
    micro-batch rather than recorded once: the same targets, without a pass over the whole task
    (on a GPU, greedy generation waits on the host once per generated token; with short answers
    that is a few syncs per old prefix and step).
    loss = (1 - alpha) * CE(new task) + alpha * mean over the old prefixes; on the first task, CE.
    """

    def __init__(self, config: LwfStrategyConfig, run: RunConfig):
        self.config = config
        self.max_target_tokens = run.stream.max_target_tokens
        self.teacher: torch.nn.Module | None = None
        self.metrics: dict[str, torch.Tensor] = {}

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        self.teacher = None
        if plan.teacher_dir and plan.distill_prefixes:
            self.teacher = load_frozen(plan.teacher_dir, device=context.device, dtype=context.dtype)

    @torch.no_grad()
    def teacher_answers(self, view: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's greedy answer to ``view`` (as labels) and its raw logits along it."""
        teacher = self.teacher
        out = teacher.generate(input_ids=view["input_ids"], attention_mask=view["attention_mask"],
                               max_new_tokens=self.max_target_tokens, do_sample=False, num_beams=1,
                               output_logits=True, return_dict_in_generate=True)
        eos = teacher.generation_config.eos_token_id
        eos = teacher.config.eos_token_id if eos is None else eos
        labels = answer_labels(out.sequences, eos_id=eos[0] if isinstance(eos, (list, tuple)) else eos)
        return labels, torch.stack(out.logits, dim=1)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        views = batch.pop("views", [])
        config = self.config
        own = model(**batch).loss
        if self.teacher is None or config.alpha == 0 or not views:
            return own
        terms = []
        for view in views:
            labels, teacher_logits = self.teacher_answers(view)
            student = model(input_ids=view["input_ids"], attention_mask=view["attention_mask"], labels=labels)
            if config.variant == "pseudo_labels":
                terms.append(student.loss)
            else:
                terms.append(distillation_loss(student.logits, teacher_logits, labels, variant=config.variant,
                                               temperature=config.temperature))
        distill = torch.stack(terms).mean()
        _accumulate(self.metrics, "lwf_distill", distill)
        _accumulate(self.metrics, "lwf_ce", own)
        return (1 - config.alpha) * own + config.alpha * distill

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        self.teacher = None  # free it; the next task loads the model just saved

    def state_dict(self) -> dict[str, Any]:
        return {}  # the teacher is a checkpoint on disk, named by the next plan

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _accumulate(metrics: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Add a micro-batch's value to a strategy's window of metrics (on the device: no host sync)."""
    value = value.detach().float()
    metrics[name] = metrics[name] + value if name in metrics else value


def load_frozen(directory: str | Path, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A saved checkpoint as a frozen teacher: eval mode, no gradients, never stepped."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory)).to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class EWC:
    """Online elastic weight consolidation (Schwarz et al. 2018), diagonal Fisher.

    After each task: F <- gamma * F + F_task, where F_task is the empirical Fisher over
    ``fisher_examples`` of the task's examples (see :func:`empirical_fisher`), and the anchor
    w* <- the weights then (one anchor: the latest). Loss = CE + lambda / 2 * sum_i F_i (w_i - w*_i)^2.
    With gamma = 1 this is the accumulated form Huszar (2018) showed the per-task penalties
    approximate. The penalty and its ratio to the CE are logged (``ewc_penalty``,
    ``ewc_penalty_ratio``). Needs full parameters on every worker (ZeRO <= 2), checked in the config.
    """

    def __init__(self, config: EwcStrategyConfig, run: RunConfig):
        self.config = config
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, torch.Tensor] = {}

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
        if not self.fisher:
            return loss
        penalty = self.penalty(model)
        _accumulate(self.metrics, "ewc_penalty", penalty)
        _accumulate(self.metrics, "ewc_penalty_ratio", penalty / loss.detach().float().clamp(min=1e-12))
        return loss + penalty

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        per_rank = math.ceil(self.config.fisher_examples / context.comm.world_size)  # each rank its share
        fisher = empirical_fisher(context.module, context.batches(), per_rank)
        context.comm.all_reduce_mean(list(fisher.values()))
        gamma = self.config.gamma
        for n, value in fisher.items():
            self.fisher[n] = gamma * self.fisher[n] + value if n in self.fisher else value
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


def agem_coefficient(grad: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A-GEM's projection coefficient c = min(0, g . g_ref) / (g_ref . g_ref), and g . g_ref.

    The projected gradient is g - c g_ref; c = 0 (no change) when g already agrees with g_ref.
    Computed on the device: no host sync.
    """
    dot = sum((g.float() * r.float()).sum() for g, r in zip(grad, reference))
    norm = sum(r.float().pow(2).sum() for r in reference)
    return torch.where(dot < 0, dot / norm.clamp(min=1e-30), torch.zeros_like(dot)), dot


class AGEM:
    """Averaged GEM (Chaudhry et al. 2019).

    For each micro-batch: g, the gradient of its loss, and g_ref, the gradient of the loss on a
    batch of replayed rows (the episodic memory), both averaged over the workers. If g . g_ref < 0
    the step uses g - (g . g_ref / g_ref . g_ref) g_ref instead, whose dot product with g_ref is
    zero. The loss handed to the engine is L - c * L_ref with c fixed: its gradient is exactly the
    projected one, so DeepSpeed's own backward, gradient reduction and step run unchanged. Cost per
    micro-batch: three forward passes and two backward passes more than plain fine-tuning, and an
    all-reduce of two gradient-sized vectors (with more than one worker). With ``grad_accum_steps``
    > 1 each micro-batch is projected on its own.
    """

    def __init__(self, config: AgemStrategyConfig, run: RunConfig):
        self.config = config
        self.comm: Collectives | None = None
        self.device: torch.device | None = None
        self.metrics: dict[str, torch.Tensor] = {}

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        self.comm, self.device = context.comm, context.device

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        reference = batch.pop("reference", None)
        if reference is None:
            return model(**batch).loss
        # The two gradients come from forward passes of the bare module: a DeepSpeed engine's
        # outputs carry its backward hooks, meant for its own backward only. The engine's passes
        # after them replay the same random state (the same dropout), so their gradients are the
        # ones just measured and the step is exactly g - c g_ref.
        module = getattr(model, "module", model)
        params = [p for p in module.parameters() if p.requires_grad]
        state = _rng_state(self.device)
        grad = _grads(module(**batch).loss, params)
        ref_grad = _grads(module(**reference).loss, params)
        if self.comm is not None and self.comm.world_size > 1:
            sizes = [g.numel() for g in grad + ref_grad]
            flat = torch.cat([g.flatten().float() for g in grad + ref_grad])
            self.comm.all_reduce_mean([flat])
            pieces = list(torch.split(flat, sizes))
            grad, ref_grad = pieces[: len(grad)], pieces[len(grad) :]
        coefficient, dot = agem_coefficient(grad, ref_grad)
        _accumulate(self.metrics, "agem_projected", (dot < 0).float())
        del grad, ref_grad
        _set_rng_state(state, self.device)
        loss, ref_loss = model(**batch).loss, model(**reference).loss
        return loss - coefficient.detach() * ref_loss

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}  # the memory is the replay store

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d params (zeros for parameters the loss does not use)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _rng_state(device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state and the device's (CUDA keeps it on the host: no sync)."""
    on_cuda = device is not None and device.type == "cuda"
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_cuda else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device | None) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def stored_logits_mse(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the current logits, taken at the stored vocabulary ids, and
    the stored values: over the stored (token, k) entries of the rows that have them."""
    current = logits.float().gather(-1, ids)
    squared = (current - values).pow(2).mean(-1)  # per token, over its k stored entries
    mask = valid.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp(min=1)


class DERpp:
    """Dark Experience Replay++ (Buzzega et al. 2020).

    Each row the replay store gets after a task carries the top ``top_k`` logits the model gave
    each of its target tokens then (teacher-forced on its target), stored as Arrow in the store.
    Training loss = CE(new batch) + alpha * MSE(current logits at the stored ids, stored values) on
    one replayed batch + beta * CE on another. Buzzega et al. record the logits while a row is
    being trained on; rows enter our store at the task boundary, so theirs are the logits at the
    end of the row's task. Top-k instead of the whole vocabulary keeps a row's logits to
    ``tokens x k x 8`` bytes.
    """

    def __init__(self, config: DerppStrategyConfig, run: RunConfig):
        self.config = config
        self.metrics: dict[str, torch.Tensor] = {}

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        pass

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        dark, replayed = batch.pop("replay_logits", None), batch.pop("replay_ce", None)
        loss = model(**batch).loss
        if dark is not None and self.config.alpha:
            out = model(input_ids=dark["input_ids"], attention_mask=dark["attention_mask"], labels=dark["labels"])
            mse = stored_logits_mse(out.logits, dark["logit_ids"], dark["logit_values"], dark["logit_valid"])
            _accumulate(self.metrics, "derpp_mse", mse)
            loss = loss + self.config.alpha * mse
        if replayed is not None and self.config.beta:
            ce = model(**replayed).loss
            _accumulate(self.metrics, "derpp_replay_ce", ce)
            loss = loss + self.config.beta * ce
        return loss

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}  # the rows and their logits are in the replay store

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


TRAINERS: dict[type[Schema], type] = {
    NaiveStrategyConfig: CrossEntropy, JointStrategyConfig: CrossEntropy, CumulativeStrategyConfig: CrossEntropy,
    ReplayStrategyConfig: CrossEntropy, LwfStrategyConfig: LwF, EwcStrategyConfig: EWC, AgemStrategyConfig: AGEM,
    DerppStrategyConfig: DERpp,
}


def build_training_strategy(run: RunConfig) -> TrainingStrategy:
    """The training side of ``run.strategy``."""
    return TRAINERS[type(run.strategy)](run.strategy, run)
