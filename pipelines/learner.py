"""The model side of a continual-learning run, inside one trainer process.

``Learner`` owns a DeepSpeed engine for the whole stream: it executes one task plan at a time,
evaluates on every task, exports plain ``transformers`` checkpoints and saves / loads the training
state a resumed run continues from. It knows nothing of Ray: the same object runs in a Ray Train
worker, under torchrun, or in a test with one process.
"""

from __future__ import annotations

import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipelines.config import RunConfig, TrainingConfig
from pipelines.deepspeed_config import build_deepspeed_config, resolve_precision
from pipelines.distributed import Collectives, init_distributed
from pipelines.errors import DataError, NonFiniteLossError
from pipelines.models import build_model, check_precision, load_tokenizer, save_pretrained
from pipelines.plan import EvalSet, TaskPlan
from pipelines.scoring import METRICS
from pipelines.strategies import IGNORE_INDEX, TrainingContext, build_training_strategy
from storage.files import atomic_directory

StepCallback = Callable[[int, int, float], None]  # (step, num_steps, mean loss since the last call)
ReplaySource = Callable[[], pa.Table]  # a table of replayed (source, target) rows per call


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
    """One rank's share of a run: model, DeepSpeed engine, strategy loss, evaluation, state."""

    def __init__(self, config: RunConfig, tokenizer_dir: str | Path, *, rank: int = 0, world_size: int = 1):
        init_distributed()
        self.config, self.rank, self.world_size = config, rank, world_size
        training = config.training
        on_cuda = torch.cuda.is_available() and training.use_gpu is not False
        self.precision = resolve_precision(training, on_cuda=on_cuda)
        check_precision(config.model.arch, self.precision)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        torch.manual_seed(config.seed)  # identical init on every rank, and in a resumed run
        model = build_model(config.model, self.tokenizer)
        self.ds_config = build_deepspeed_config(training, world_size=world_size, precision=self.precision,
                                                on_cuda=on_cuda)
        optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)

        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.comm = Collectives(device=self.engine.device, world_size=world_size)
        self.strategy = build_training_strategy(config)
        self.global_step = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.comm.device

    @property
    def num_parameters(self) -> int:
        zero3 = lambda p: getattr(p, "ds_numel", None)  # noqa: E731 - partitioned under ZeRO-3
        return sum(zero3(p) or p.numel() for p in self.model.parameters())

    def context(self, plan: TaskPlan) -> TrainingContext:
        return TrainingContext(module=self.model, device=self.device, dtype=next(self.model.parameters()).dtype,
                               comm=self.comm, batches=lambda: self.batches(plan))

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
        label_ids = torch.full((len(labels), label_width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(zip(inputs, labels)):
            input_ids[i, : len(x)] = torch.tensor(x)
            label_ids[i, : len(y)] = torch.tensor(y)
        device = self.device
        return {"input_ids": input_ids.to(device), "attention_mask": (input_ids != pad).to(device),
                "labels": label_ids.to(device)}

    def batches(self, plan: TaskPlan, replay: ReplaySource | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches of this rank's share, reshuffled each epoch with a seeded generator.

        With ``replay``, each micro-batch holds ``plan.replay_rows_per_batch`` replayed rows and
        the rest from the plan.

        Raises:
            DataError: this rank's share of the plan is empty (fewer rows than workers).
        """
        inputs, labels = self._encode(plan.examples.column("source").to_pylist(),
                                      plan.examples.column("target").to_pylist())
        if len(inputs) <= self.rank:
            raise DataError(f"task {plan.name!r} has {len(inputs)} training row(s) for {self.world_size} workers: "
                            f"worker {self.rank} has none to train on; lower training.num_workers")
        num_replayed = plan.replay_rows_per_batch if replay is not None else 0
        size = self.config.training.micro_batch_size - num_replayed
        for epoch in range(10**9):
            rng = np.random.default_rng([plan.seed, plan.index, epoch])
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

    # ------------------------------------------------------------------ training
    def train_task(self, plan: TaskPlan, on_step: StepCallback | None = None,
                   replay: ReplaySource | None = None) -> dict[str, float]:
        """Train on one task plan; returns steps, mean loss, seconds, and wall-clock start/end.

        The loss stays on the device between syncs: every ``training.log_every_n_steps`` steps
        (and at the task's end) one all-reduce carries the window's summed loss and a count of
        non-finite losses, and that is the only host sync of the loop. ``on_step`` is called
        then, with the window's mean loss over steps and ranks. A non-finite loss on any rank
        stops every rank at the same check, naming the first step it appeared at.
        """
        started_at, start = time.time(), time.perf_counter()
        if plan.examples is None or plan.num_steps == 0:  # nothing to train at this task (joint before the last)
            return {"steps": 0, "mean_loss": None, "seconds": 0.0, "started_at": started_at,
                    "ended_at": time.time(), "examples": 0}
        training = self.config.training
        total, every = plan.num_steps, training.log_every_n_steps
        context = self.context(plan)
        self.strategy.before_task(context, plan)
        batches = self.batches(plan, replay)
        self.engine.train()
        window = torch.zeros(2, device=self.device)  # summed step losses, non-finite losses
        first_bad = torch.full((), float("inf"), device=self.device)
        loss_sum, window_steps, examples = 0.0, 0, 0
        for step in range(total):
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr_at(step, total, training)
            for _ in range(training.grad_accum_steps):
                batch = next(batches)
                examples += batch["input_ids"].shape[0]
                loss = self.strategy.loss(self.engine, batch)
                value = loss.detach().float()
                bad = ~torch.isfinite(value)
                first_bad = torch.where(bad & torch.isinf(first_bad), float(step), first_bad)
                window += torch.stack([value / training.grad_accum_steps, bad.float()])
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            self.global_step += 1
            window_steps += 1
            if (step + 1) % every == 0 or step + 1 == total:
                summed, num_bad = self.comm.all_reduce_sum(window).tolist()  # the loop's one host sync
                if num_bad:
                    first = int(self.comm.all_reduce_min(first_bad).item())
                    raise NonFiniteLossError(plan.name, first, summed)
                loss_sum += summed
                if on_step is not None:
                    on_step(step, total, summed / (window_steps * self.world_size))
                window.zero_()
                window_steps = 0
        seconds = time.perf_counter() - start
        self.strategy.after_task(context, plan)
        return {"steps": total, "mean_loss": loss_sum / (total * self.world_size), "seconds": seconds,
                "started_at": started_at, "ended_at": time.time(), "examples": examples}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _generate(self, sources: list[str]) -> list[str]:
        stream = self.config.stream
        enc = self.tokenizer(sources, truncation=True, max_length=stream.max_source_tokens, padding=True,
                             return_tensors="pt").to(self.device)
        out = self.model.generate(
            **enc, max_new_tokens=self.config.evaluation.max_new_tokens, do_sample=False, num_beams=1,
            # ZeRO-3 partitions the weights: every rank must run every forward pass together.
            synced_gpus=self.config.training.zero_stage == 3 and self.world_size > 1,
        )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def _score(self, eval_set: EvalSet) -> tuple[float, int]:
        """This rank's summed score and count: an equal share of the examples, padded so every rank
        generates the same number of batches (ZeRO-3 needs them in lockstep)."""
        n, size = len(eval_set.sources), self.config.evaluation.batch_size
        per_rank = -(-n // self.world_size)
        mine = [self.rank + self.world_size * k for k in range(per_rank)]  # indices >= n are padding
        score = METRICS[eval_set.metric]
        total, count = 0.0, 0
        for start in range(0, per_rank, size):
            chunk = mine[start : start + size]
            predictions = self._generate([eval_set.sources[min(i, n - 1)] for i in chunk])
            for i, prediction in zip(chunk, predictions):
                if i < n:
                    total += score(prediction, eval_set.targets[i])
                    count += 1
        return total, count

    def evaluate(self, eval_sets: list[EvalSet]) -> dict[str, float]:
        """Mean score on each eval set; one all-reduce for all of them."""
        self.engine.eval()
        try:
            local = [value for s in eval_sets for value in self._score(s)]
        finally:
            self.engine.train()
        totals = self.comm.all_reduce_sum(self.comm.tensor(local, dtype=torch.float64)).view(-1, 2).tolist()
        return {s.name: total / count for s, (total, count) in zip(eval_sets, totals)}

    # ------------------------------------------------------------------ checkpoints and state
    def save(self, directory: str | Path) -> Path:
        """Write a plain transformers checkpoint (model + tokenizer), whole or not at all.

        Collective: every rank calls it (ZeRO-3 gathers the weights for rank 0).
        """
        directory = Path(directory)
        if self.config.training.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                if self.rank == 0:
                    with atomic_directory(directory) as tmp:
                        save_pretrained(self.model, self.tokenizer, tmp)
        elif self.rank == 0:
            with atomic_directory(directory) as tmp:
                save_pretrained(self.model, self.tokenizer, tmp)
        self.comm.barrier()
        return directory

    def save_state(self, directory: str | Path) -> Path:
        """Save what a resumed run needs to continue exactly: the DeepSpeed checkpoint (weights,
        optimizer state, ZeRO partitions), and per rank the RNG states and step count, plus the
        strategy's state. Collective.

        Written under ``<directory>.partial`` and renamed once every rank has finished, so
        ``directory`` holds a complete state or is absent.
        """
        directory = Path(directory)
        partial = directory.with_name(directory.name + ".partial")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        self.comm.barrier()
        self.engine.save_checkpoint(str(partial.parent), tag=partial.name, save_latest=False,
                                    client_state={"global_step": self.global_step})
        torch.save({"rng": _rng_state(), "global_step": self.global_step}, partial / f"rank-{self.rank:03d}.pt")
        if self.rank == 0:
            torch.save(self.strategy.state_dict(), partial / "strategy.pt")
        self.comm.barrier()
        if self.rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
            partial.rename(directory)
        self.comm.barrier()
        return directory

    def load_state(self, directory: str | Path) -> None:
        """Continue from a ``save_state`` directory (same number of workers and ZeRO stage).

        Raises:
            DataError: the directory is incomplete or was saved by another number of workers.
        """
        directory = Path(directory)
        rank_file = directory / f"rank-{self.rank:03d}.pt"
        if not rank_file.is_file() or not (directory / "strategy.pt").is_file():
            saved = sorted(p.name for p in directory.glob("rank-*.pt")) if directory.is_dir() else []
            raise DataError(f"training state {directory} is incomplete or was saved by another number of workers "
                            f"(it has {saved or 'nothing'}; this is worker {self.rank} of {self.world_size})")
        loaded, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise DataError(f"DeepSpeed could not load the training state in {directory}")
        extra = torch.load(rank_file, weights_only=False)
        _set_rng_state(extra["rng"])
        self.global_step = extra["global_step"]
        self.strategy.load_state_dict(torch.load(directory / "strategy.pt", weights_only=False,
                                                 map_location=self.device))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def silence_library_noise() -> None:
    """Quiet the per-call progress bars and warnings of transformers and DeepSpeed in workers."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
