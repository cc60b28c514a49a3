"""The model side of a continual-learning run, inside one trainer process.

``Learner`` owns a DeepSpeed engine for the whole stream: it trains on one task plan at a time,
evaluates on every task, and exports plain ``transformers`` checkpoints. It knows nothing of Ray:
the same object runs in a Ray Train worker, under torchrun, or in a test with one process.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from pipelines.config import RunConfig, TrainingConfig
from pipelines.deepspeed_config import build_deepspeed_config, resolve_precision
from pipelines.errors import NonFiniteLossError
from pipelines.models import build_model, check_precision, load_tokenizer, save_pretrained
from pipelines.scoring import METRICS
from pipelines.strategies import build_strategy


@dataclass(frozen=True)
class TaskPlan:
    """What the scheduler hands the trainers for one task: plain data only."""

    index: int
    name: str
    examples: pa.Table | None  # columns source (prefix applied), target; None: no training at this task
    epochs: float | None = None
    max_steps: int | None = None
    teacher_dir: str | None = None  # the model after the previous task, for distillation


@dataclass(frozen=True)
class EvalSet:
    name: str
    metric: str
    sources: list[str]  # prefix applied
    targets: list[str]


StepCallback = Callable[[int, int, float], None]  # (step, num_steps, loss)
ReplaySource = Callable[[], pa.Table]  # a table of replayed (source, target) rows per call


def checkpoint_dir(output_dir: str | Path, index: int, name: str) -> Path:
    """Where the model after task ``index`` is saved (the next task's teacher, for distillation)."""
    return Path(output_dir) / "checkpoints" / f"task-{index:02d}-{name}"


def replayed_per_batch(micro_batch_size: int, replay_ratio: float) -> int:
    """Rows of a micro-batch drawn from replay: round(size x ratio), at least 1, leaving 1 new row."""
    return min(micro_batch_size - 1, max(1, round(micro_batch_size * replay_ratio))) if micro_batch_size > 1 else 0


def init_distributed() -> None:
    """Join (or, alone, create) the process group DeepSpeed needs.

    Ray Train and torchrun set RANK/WORLD_SIZE/MASTER_*; a plain ``python`` process gets a
    one-process group on a free loopback port (else DeepSpeed reaches for mpi4py).
    """
    if dist.is_initialized():
        return
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def num_steps(num_examples: int, *, epochs: float, max_steps: int | None, global_batch: int) -> int:
    """Optimizer steps for one task: ``max_steps`` if set, else ceil(epochs * examples / global batch)."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * num_examples / global_batch))


def lr_at(step: int, total: int, training: TrainingConfig) -> float:
    """Learning rate at optimizer step ``step`` of ``total`` in one task: warmup, then the schedule."""
    if step < training.warmup_steps:
        return training.lr * (step + 1) / training.warmup_steps
    progress = (step - training.warmup_steps) / max(1, total - training.warmup_steps)
    if training.lr_schedule == "linear":
        return training.lr * (1.0 - progress)
    if training.lr_schedule == "cosine":
        return training.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return training.lr


class Learner:
    """One rank's share of a run: model, DeepSpeed engine, strategy loss, evaluation."""

    def __init__(self, config: RunConfig, tokenizer_dir: str | Path, *, rank: int = 0, world_size: int = 1):
        init_distributed()
        self.config, self.rank, self.world_size = config, rank, world_size
        training = config.training
        on_cuda = torch.cuda.is_available() and training.use_gpu is not False
        self.precision = resolve_precision(training, on_cuda=on_cuda)
        check_precision(config.model.arch, self.precision)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        torch.manual_seed(config.seed)  # identical init on every rank
        model = build_model(config.model, self.tokenizer)
        self.ds_config = build_deepspeed_config(training, world_size=world_size, precision=self.precision, on_cuda=on_cuda)
        optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)

        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.strategy = build_strategy(config.strategy)
        self.global_step = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def num_parameters(self) -> int:
        zero3 = lambda p: getattr(p, "ds_numel", None)  # noqa: E731 - partitioned under ZeRO-3
        return sum(zero3(p) or p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------ data
    def _encode(self, sources: list[str], targets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        stream = self.config.stream
        inputs = self.tokenizer(sources, truncation=True, max_length=stream.max_source_tokens)["input_ids"]
        labels = self.tokenizer(text_target=targets, truncation=True, max_length=stream.max_target_tokens)["input_ids"]
        return inputs, labels

    def _collate(self, inputs: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        width, label_width = max(map(len, inputs)), max(map(len, labels))
        input_ids = torch.full((len(inputs), width), pad, dtype=torch.long)
        label_ids = torch.full((len(labels), label_width), -100, dtype=torch.long)  # -100: ignored by the loss
        for i, (x, y) in enumerate(zip(inputs, labels)):
            input_ids[i, : len(x)] = torch.tensor(x)
            label_ids[i, : len(y)] = torch.tensor(y)
        device = self.engine.device
        return {"input_ids": input_ids.to(device), "attention_mask": (input_ids != pad).to(device),
                "labels": label_ids.to(device)}

    def batches(self, plan: TaskPlan, replay: ReplaySource | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches of this rank's share, reshuffled each epoch with a seeded generator.

        With ``replay``, each micro-batch holds ``replay_ratio`` x size replayed rows and the rest
        from the plan.
        """
        inputs, labels = self._encode(plan.examples.column("source").to_pylist(),
                                      plan.examples.column("target").to_pylist())
        size = self.config.training.micro_batch_size
        num_replayed = replayed_per_batch(size, self.strategy.replay_ratio) if replay else 0
        size -= num_replayed
        for epoch in range(10**9):
            rng = np.random.default_rng([self.config.seed, plan.index, epoch])
            order = rng.permutation(len(inputs))[self.rank :: self.world_size]
            for start in range(0, len(order), size):
                chosen = order[start : start + size]
                batch_inputs, batch_labels = [inputs[i] for i in chosen], [labels[i] for i in chosen]
                if num_replayed:
                    rows = replay()
                    more_inputs, more_labels = self._encode(rows.column("source").to_pylist(),
                                                            rows.column("target").to_pylist())
                    batch_inputs, batch_labels = batch_inputs + more_inputs, batch_labels + more_labels
                yield self._collate(batch_inputs, batch_labels)

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors across ranks, in place (no-op with one rank)."""
        if self.world_size > 1:
            for tensor in tensors:
                dist.all_reduce(tensor)
                tensor /= self.world_size

    # ------------------------------------------------------------------ training
    def _check_finite(self, loss: torch.Tensor, plan: TaskPlan, step: int) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
        if self.world_size > 1:  # every rank must stop together, or the others hang in the next collective
            dist.all_reduce(bad)
        if bad.item():
            raise NonFiniteLossError(plan.name, step, float(loss.item()))

    def train_task(self, plan: TaskPlan, on_step: StepCallback | None = None,
                   replay: ReplaySource | None = None) -> dict[str, float]:
        """Train on one task plan; returns steps, mean loss, seconds, and wall-clock start/end."""
        started_at, start = time.time(), time.perf_counter()
        if plan.examples is None:  # the strategy trains nothing at this task (joint before the last)
            return {"steps": 0, "mean_loss": float("nan"), "seconds": 0.0, "started_at": started_at,
                    "ended_at": time.time(), "examples": 0}
        training = self.config.training
        global_batch = training.micro_batch_size * training.grad_accum_steps * self.world_size
        total = num_steps(plan.examples.num_rows, epochs=plan.epochs or training.epochs,
                          max_steps=plan.max_steps or (None if plan.epochs else training.max_steps),
                          global_batch=global_batch)
        self.strategy.before_task(self, plan)
        batches = self.batches(plan, replay)
        self.engine.train()
        losses, examples = [], 0
        for step in range(total):
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr_at(step, total, training)
            step_loss = 0.0
            for _ in range(training.grad_accum_steps):
                batch = next(batches)
                examples += batch["input_ids"].shape[0]
                loss = self.strategy.loss(self.engine, batch)
                self._check_finite(loss, plan, step)
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
                step_loss += loss.item() / training.grad_accum_steps
            losses.append(step_loss)
            self.global_step += 1
            if on_step is not None:
                on_step(step, total, step_loss)
        seconds = time.perf_counter() - start
        self.strategy.after_task(self, plan)
        return {"steps": total, "mean_loss": float(np.mean(losses)), "seconds": seconds,
                "started_at": started_at, "ended_at": time.time(), "examples": examples}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _generate(self, sources: list[str]) -> list[str]:
        stream = self.config.stream
        enc = self.tokenizer(sources, truncation=True, max_length=stream.max_source_tokens, padding=True,
                             return_tensors="pt").to(self.engine.device)
        out = self.model.generate(
            **enc, max_new_tokens=self.config.evaluation.max_new_tokens, do_sample=False, num_beams=1,
            # ZeRO-3 partitions the weights: every rank must run every forward pass together.
            synced_gpus=self.config.training.zero_stage == 3 and self.world_size > 1,
        )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def evaluate_one(self, eval_set: EvalSet) -> float:
        """Mean score on one task; each rank scores an equal share (padded), summed across ranks."""
        n, size = len(eval_set.sources), self.config.evaluation.batch_size
        per_rank = math.ceil(n / self.world_size)
        mine = [self.rank + self.world_size * k for k in range(per_rank)]  # indices >= n are padding
        score = METRICS[eval_set.metric]
        total = torch.zeros(2, dtype=torch.float64)
        for start in range(0, per_rank, size):
            chunk = mine[start : start + size]
            predictions = self._generate([eval_set.sources[min(i, n - 1)] for i in chunk])
            for i, prediction in zip(chunk, predictions):
                if i < n:
                    total += torch.tensor([score(prediction, eval_set.targets[i]), 1.0], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def evaluate(self, eval_sets: list[EvalSet]) -> dict[str, float]:
        self.engine.eval()
        try:
            return {s.name: self.evaluate_one(s) for s in eval_sets}
        finally:
            self.engine.train()

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | Path) -> Path:
        """Write a plain transformers checkpoint (model + tokenizer). Collective: every rank calls it."""
        directory = Path(directory)
        if self.config.training.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                if self.rank == 0:
                    save_pretrained(self.model, self.tokenizer, directory)
        elif self.rank == 0:
            save_pretrained(self.model, self.tokenizer, directory)
        if self.world_size > 1:
            dist.barrier()
        return directory


def silence_library_noise() -> None:
    """Quiet the per-call progress bars and warnings of transformers and DeepSpeed in workers."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
