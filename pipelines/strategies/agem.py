"""Averaged GEM (Chaudhry et al. 2019).

For each micro-batch: g, the gradient of its loss (in a combination: of the loss of every strategy
inside A-GEM), and g_ref, the gradient of the loss on a batch of replayed rows (the episodic
memory), both averaged over the workers. If g . g_ref < 0 the step uses g - (g . g_ref / g_ref .
g_ref) g_ref instead, whose dot product with g_ref is zero. The loss handed to the engine is
L - c * L_ref with c fixed: its gradient is exactly the projected one, so DeepSpeed's own backward,
gradient reduction and step run unchanged. Cost per micro-batch: three forward passes and two
backward passes more than plain fine-tuning, and an all-reduce of two gradient-sized vectors (with
more than one worker). With ``grad_accum_steps`` > 1 each micro-batch is projected on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipelines.schema import Schema
from pipelines.strategies.base import (
    Inner,
    Planning,
    Range,
    ReplayPart,
    StepBatch,
    StrategyDef,
    TrainingContext,
    accumulate,
    averages_per_example,
    quiet_metrics,
    sequence_ce,
    torch,
)

if TYPE_CHECKING:
    from pipelines.config import RunConfig
    from pipelines.distributed import Collectives
    from pipelines.plan import TaskPlan

REFERENCE = "reference"  # the replayed batch a micro-batch carries for g_ref


class AgemStrategyConfig(Schema):
    """A-GEM (Chaudhry et al. 2019): each micro-batch's gradient g is checked against the gradient
    g_ref of a batch of replayed rows; when g . g_ref < 0 it is projected to g - (g . g_ref /
    g_ref . g_ref) g_ref, so the loss on the replayed rows does not rise to first order."""

    name: Literal["agem"] = "agem"
    reference_rows: int = Field(default=16, gt=0)  # replayed rows per reference gradient


def agem_coefficient(grad: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A-GEM's projection coefficient c = min(0, g . g_ref) / (g_ref . g_ref), and g . g_ref.

    The projected gradient is g - c g_ref; c = 0 (no change) when g already agrees with g_ref.
    Computed on the device: no host sync.
    """
    dot = sum((g.float() * r.float()).sum() for g, r in zip(grad, reference))
    norm = sum(r.float().pow(2).sum() for r in reference)
    return torch.where(dot < 0, dot / norm.clamp(min=1e-30), torch.zeros_like(dot)), dot


class AGEM:
    """A-GEM's training side: no state (the memory is the replay store)."""

    def __init__(self, config: AgemStrategyConfig, run: RunConfig):
        self.config = config
        self.per_example = averages_per_example(run)
        self.comm: Collectives | None = None
        self.device: torch.device | None = None
        self.metrics: dict[str, torch.Tensor] = {}

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        self.comm, self.device = context.comm, context.device

    def loss(self, model: torch.nn.Module, batch: StepBatch, inner: Inner) -> torch.Tensor:
        reference = batch.extras.get(REFERENCE)
        if reference is None:
            return inner(model)
        # The two gradients come from forward passes of the bare module: a DeepSpeed engine's
        # outputs carry its backward hooks, meant for its own backward only. The engine's passes
        # after them replay the same random state (the same dropout), so their gradients are the
        # ones just measured and the step is exactly g - c g_ref.
        module = getattr(model, "module", model)
        params = [p for p in module.parameters() if p.requires_grad]
        state = _rng_state(self.device)
        with quiet_metrics():
            grad = _grads(inner(module), params)
        ref_grad = _grads(sequence_ce(module, reference, per_example=self.per_example), params)
        if self.comm is not None and self.comm.world_size > 1:
            sizes = [g.numel() for g in grad + ref_grad]
            flat = torch.cat([g.flatten().float() for g in grad + ref_grad])
            self.comm.all_reduce_mean([flat])
            pieces = list(torch.split(flat, sizes))
            grad, ref_grad = pieces[: len(grad)], pieces[len(grad) :]
        coefficient, dot = agem_coefficient(grad, ref_grad)
        accumulate(self.metrics, "agem_projected", (dot < 0).float())
        del grad, ref_grad
        _set_rng_state(state, self.device)
        loss, ref_loss = inner(model), sequence_ce(model, reference, per_example=self.per_example)
        return loss - coefficient.detach() * ref_loss

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        return None

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


STRATEGY = StrategyDef(
    config=AgemStrategyConfig,
    planning=lambda config: Planning(replay_parts=(ReplayPart(REFERENCE, config.reference_rows),)),
    training=AGEM, nesting=40, claims=frozenset({"memory"}), full_parameters=True,
    search={"reference_rows": Range(4, 32, integer=True)}, sets_replayed_rows=("reference_rows",),
    deviations=lambda config, run: (
        ("with training.grad_accum_steps > 1 each micro-batch's gradient is projected against its own "
         "reference batch, not the accumulated step's gradient against one (each projected part agreeing with "
         "its reference is a stricter condition)",) if run.training.grad_accum_steps > 1 else ()),
)
