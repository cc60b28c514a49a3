"""Learning without Forgetting (Li & Hoiem 2016), for a text-to-text model.

In the paper the old model's outputs are recorded *for the old tasks' heads* on the new task's
inputs, and the student is trained to keep them while it learns the new head. Here a task's head
is its prefix: for each earlier task's prefix, the new micro-batch's inputs are put under it (the
plan's ``distill_prefixes``; the learner hands them as ``views``), the teacher (the model saved at
the previous task boundary, frozen) answers them greedily, and the student, teacher-forced on that
answer, is distilled towards the teacher's logits on it (``kl``, ``mse``) or trained on the answer
itself (``pseudo_labels``). Answers are generated per micro-batch rather than recorded once: the
same targets, without a pass over the whole task (on a GPU, greedy generation waits on the host
once per generated token; with short answers that is a few syncs per old prefix and step).

loss = (1 - alpha) * inner + alpha * mean over the old prefixes; on the first task, inner. In a
combination LwF sits innermost: ``inner`` is the cross-entropy of the (possibly replay-mixed)
micro-batch, and the other strategies' terms are not scaled by 1 - alpha.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipelines.schema import Schema
from pipelines.strategies.base import (
    F,
    IGNORE_INDEX,
    Inner,
    Planning,
    Range,
    StepBatch,
    StrategyDef,
    TrainingContext,
    accumulate,
    averages_per_example,
    example_mean_ce,
    load_frozen,
    torch,
)

if TYPE_CHECKING:
    from pipelines.config import RunConfig
    from pipelines.plan import TaskPlan


class LwfStrategyConfig(Schema):
    """Learning without Forgetting (Li & Hoiem 2016): the new task's inputs, put under each earlier
    task's prefix (the old "heads"), are answered by the model saved at the previous task boundary
    (frozen); the student is trained to give the same answers there, beside CE on the new task.
    loss = (1 - alpha) * CE + alpha * the distillation terms of the earlier prefixes, averaged
    (``old_heads: mean``, the default: alpha weighs old tasks against the new one alike at task 2
    and task 20) or summed as Li & Hoiem do (``sum``: the old tasks' weight grows with their number)."""

    name: Literal["lwf"] = "lwf"
    # kl: T^2 KL of softened distributions; mse: squared logit difference summed over the
    # vocabulary; pseudo_labels: CE on the teacher's greedy answers
    variant: Literal["kl", "mse", "pseudo_labels"] = "kl"
    temperature: float = Field(default=2.0, gt=0)  # kl: softmax(logits / T); T = 2 ~ square-root probabilities
    alpha: float = Field(default=0.5, ge=0, le=1)
    old_heads: Literal["mean", "sum"] = "mean"


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
    """LwF's training side: the teacher loaded before a task that has old prefixes, freed after."""

    def __init__(self, config: LwfStrategyConfig, run: RunConfig):
        self.config = config
        self.max_target_tokens = run.stream.max_target_tokens
        self.per_example = averages_per_example(run)
        self.teacher: torch.nn.Module | None = None
        self.metrics: dict[str, torch.Tensor] = {}

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        self.teacher = None
        if plan.teacher_dir and plan.distill_prefixes:
            self.teacher = load_frozen(plan.teacher_dir, device=context.device, dtype=context.dtype)

    def teacher_answers(self, view: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's greedy answer to ``view`` (as labels) and its raw logits along it."""
        teacher = self.teacher
        with torch.no_grad():
            out = teacher.generate(input_ids=view["input_ids"], attention_mask=view["attention_mask"],
                                   max_new_tokens=self.max_target_tokens, do_sample=False, num_beams=1,
                                   output_logits=True, return_dict_in_generate=True)
        eos = teacher.generation_config.eos_token_id
        eos = teacher.config.eos_token_id if eos is None else eos
        labels = answer_labels(out.sequences, eos_id=eos[0] if isinstance(eos, (list, tuple)) else eos)
        return labels, torch.stack(out.logits, dim=1)

    def loss(self, model: torch.nn.Module, batch: StepBatch, inner: Inner) -> torch.Tensor:
        views = batch.extras.get("views", [])
        config = self.config
        own = inner(model)
        if self.teacher is None or config.alpha == 0 or not views:
            return own
        terms = []
        for view in views:
            labels, teacher_logits = self.teacher_answers(view)
            student = model(input_ids=view["input_ids"], attention_mask=view["attention_mask"], labels=labels)
            if config.variant == "pseudo_labels":
                terms.append(example_mean_ce(student.logits, labels) if self.per_example else student.loss)
            else:
                terms.append(distillation_loss(student.logits, teacher_logits, labels, variant=config.variant,
                                               temperature=config.temperature))
        distill = torch.stack(terms).mean() if config.old_heads == "mean" else torch.stack(terms).sum()
        accumulate(self.metrics, "lwf_distill", distill)
        accumulate(self.metrics, "lwf_ce", own)
        return (1 - config.alpha) * own + config.alpha * distill

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        self.teacher = None  # free it; the next task loads the model just saved

    def state_dict(self) -> dict[str, Any]:
        return {}  # the teacher is a checkpoint on disk, named by the next plan

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


STRATEGY = StrategyDef(
    config=LwfStrategyConfig, planning=lambda config: Planning(needs_teacher=True), training=LwF, nesting=10,
    search={"alpha": Range(0.1, 0.9), "temperature": Range(1.0, 4.0)},
    deviations=lambda config, run: (
        "an old task's head is its prefix; the teacher answers the new inputs under it greedily, per micro-batch "
        "(Li & Hoiem record the old heads' outputs once, before training)",
        *(("the old heads' distillation terms are averaged, so alpha weighs old against new alike at any task "
           "(Li & Hoiem sum them)",) if config.old_heads == "mean" else ())),
)
