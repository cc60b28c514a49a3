"""The model side of a continual-learning run, inside one trainer process.

``Learner`` owns a DeepSpeed engine for the whole stream: it executes one task plan at a time,
evaluates on every task, exports plain ``transformers`` checkpoints and saves / loads the training
state a resumed run continues from. It knows nothing of Ray: the same object runs in a Ray Train
worker, under torchrun, or in a test with one process.
"""

from __future__ import annotations

import dataclasses

import gc
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipelines.batching import Batcher, ReplaySource
from pipelines.config import ModelConfig, RunConfig, TrainingConfig, check_precision
from pipelines.deepspeed_config import build_deepspeed_config, resolve_precision
from pipelines.denoising import MASKED_TOKEN_ACCURACY, Corruptor, collate_denoised
from pipelines.distributed import Collectives, deepspeed_module, init_distributed
from pipelines.errors import DataError, NonFiniteLossError
from pipelines.evaluation import Evaluator
from pipelines.models import (ShardedWeights, build_model, load_tokenizer, save_config_and_tokenizer,
                              save_pretrained)
from pipelines.paradigm_model import PARADIGM_STEM, ParadigmModel, source_tokens, trained_for
from pipelines.paradigms import TaskSlot
from pipelines.plan import EvalSet, RecoveryPlan, RecoveryTask, TaskPlan
from pipelines.state_files import load_tree, refuse_unsafe_pickles, save_tree, weights_only_loads
from pipelines.strategies import build_training_strategy
from pipelines.strategies.base import StepBatch, TrainingContext
from storage import checksums, files
from storage.files import atomic_directory, fsync_directory, fsync_tree

log = logging.getLogger("forgetless")

# (step, num_steps, mean loss since the last call, the strategy's metrics averaged the same way)
StepCallback = Callable[[int, int, float, dict[str, float]], None]


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


class Engine:
    """A model in a DeepSpeed engine with its AdamW optimizer, on one rank: what a stream's
    ``Learner`` and a pretraining's ``Pretrainer`` both train."""

    def __init__(self, model_config: ModelConfig, training: TrainingConfig, tokenizer_dir: str | Path, *, seed: int,
                 rank: int = 0, world_size: int = 1, checkpoint: str | None = None,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        init_distributed()
        self.training, self.zero_stage, self.rank, self.world_size = training, training.zero_stage, rank, world_size
        on_cuda = torch.cuda.is_available() and training.use_gpu is not False
        self.precision = resolve_precision(training, on_cuda=on_cuda)
        check_precision(model_config.arch, self.precision)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        # identical init on every rank, in a resumed run, and whatever this process ran before
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = build_model(model_config, self.tokenizer, checkpoint)
        if wrap is not None:
            model = wrap(model)
        self.ds_config = build_deepspeed_config(training, world_size=world_size, precision=self.precision,
                                                on_cuda=on_cuda)
        # A frozen-model paradigm: one parameter group per task's own parameters; the frozen weights
        # are not the optimizer's at all.
        groups = ([{"params": params} for params in model.slot_parameters()] if isinstance(model, ParadigmModel)
                  else model.parameters())
        optimizer = torch.optim.AdamW(groups, lr=training.lr, weight_decay=training.weight_decay)

        self.engine, self.optimizer, _, _ = deepspeed_module().initialize(model=model, optimizer=optimizer,
                                                                          config=self.ds_config)
        self.comm = Collectives(device=self.engine.device, world_size=world_size)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def body(self) -> torch.nn.Module:
        """The seq2seq model itself (under a frozen-model paradigm, without its heads or prompts)."""
        return self.model.body if isinstance(self.model, ParadigmModel) else self.model

    @property
    def device(self) -> torch.device:
        return self.comm.device

    @property
    def num_parameters(self) -> int:
        zero3 = lambda p: getattr(p, "ds_numel", None)  # noqa: E731 - partitioned under ZeRO-3
        return sum(zero3(p) or p.numel() for p in self.model.parameters())

    def save(self, directory: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
        """Write a plain transformers checkpoint (model + tokenizer, and what ``extra`` writes into
        the directory), whole or not at all.

        Collective: every rank calls it (ZeRO-3 gathers the weights for rank 0).
        """
        directory = Path(directory)

        def write(weights: Callable[[Path], None] | None = None) -> None:
            with atomic_directory(directory) as tmp:
                if weights is None:
                    save_pretrained(self.body, self.tokenizer, tmp)
                else:
                    weights(tmp)
                    save_config_and_tokenizer(self.body, self.tokenizer, tmp)
                if isinstance(self.model, ParadigmModel):  # the heads or prompts, beside the untouched body
                    save_tree(self.model.extra_state(), tmp, PARADIGM_STEM)
                if extra is not None:
                    extra(tmp)

        if self.zero_stage == 3:  # parameters an evaluation left gathered or in flight are released first
            self.engine.empty_partition_cache()
        if self.zero_stage == 3 and not isinstance(self.model, ParadigmModel):
            if self.rank == 0:
                write(self._write_gathered)
            else:
                self._write_gathered(None)
        elif self.zero_stage == 3:  # a frozen body and its heads or prompts: small next to the model
            with deepspeed_module().zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                if self.rank == 0:
                    write()
        elif self.rank == 0:
            write()
        self.comm.barrier()
        return directory

    def _write_gathered(self, directory: Path | None) -> None:
        """ZeRO-3: gather the model one module at a time, rank 0 writing its weights into
        ``directory`` a file at a time (``ShardedWeights``): every rank holds one module's
        parameters at a time, rank 0 at most one file's worth besides. (Gathering every parameter at
        once put a whole copy on every rank, and writing it a second on rank 0: t5-large on two
        workers ran out of memory there.) Collective: every rank calls it; ``directory`` None off
        rank 0."""
        gathered = deepspeed_module().zero.GatheredParameters
        writer = ShardedWeights(directory) if directory is not None else None
        written: set[int] = set()  # a tied parameter (one ds_id under several names) is written once
        for prefix, module in self.body.named_modules():
            params = list(module.named_parameters(prefix=prefix, recurse=False))
            if params:
                with gathered([p for _, p in params], modifier_rank=None):
                    for key, param in params:
                        ident = getattr(param, "ds_id", id(param))
                        if writer is not None and ident not in written:
                            # a copy in host memory: the gathered one is partitioned again on leaving the block
                            writer.add(key, param.detach().to("cpu", copy=True))
                        written.add(ident)
            if writer is not None:
                skipped = getattr(module, "_non_persistent_buffers_set", set())
                for name, buffer in module.named_buffers(prefix=prefix, recurse=False):
                    if buffer is not None and name.rsplit(".", 1)[-1] not in skipped:
                        writer.add(name, buffer.detach().to("cpu", copy=True))
        if writer is not None:
            writer.close()

    def close(self) -> None:
        """Release the engine (optimizer state, ZeRO's partitions, device memory): a trainer worker
        builds one engine per run, run after run in one process. Unusable after."""
        engine = self.__dict__.pop("engine", None)
        self.optimizer = None
        if engine is not None:
            engine.destroy()
            del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Learner(Engine):
    """One rank's share of a run: model, DeepSpeed engine, strategy loss, evaluation, state.

    ``checkpoint``: the directory the model's weights come from when the config names them
    indirectly (a built pretrain config, a fetched encoder); see ``pipelines.models.build_model``.
    """

    def __init__(self, config: RunConfig, tokenizer_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                 checkpoint: str | None = None, objective: dict[str, Any] | None = None,
                 slots: list[TaskSlot] | None = None):
        wrap = (lambda body: ParadigmModel(body, config.paradigm, slots or [])) if slots is not None else None
        if config.paradigm.has_task_parameters and wrap is None:
            raise ValueError(f"paradigm {config.paradigm.name} needs the tasks' slots (pipelines.paradigms.task_slots)")
        super().__init__(config.model, config.training, tokenizer_dir, seed=config.seed, rank=rank,
                         world_size=world_size, checkpoint=checkpoint, wrap=wrap)
        self.config = config
        self.source_tokens = source_tokens(self.body, config)  # what a source is cut to
        if self.source_tokens < config.stream.max_source_tokens and rank == 0:
            log.warning("prompt tuning: sources cut to %d tokens, what the encoder's positions leave beside the "
                        "%d-vector prompt (stream.max_source_tokens=%d)", self.source_tokens,
                        config.paradigm.prompt_length, config.stream.max_source_tokens)
        self.objective = objective  # the pretraining objective (its task's eval corrupts text the same way)
        self._built_corruptor: Corruptor | None = None
        model = self.model
        self.batching = Batcher(
            self.tokenizer, source_tokens=self.source_tokens, max_target_tokens=config.stream.max_target_tokens,
            micro_batch_size=config.training.micro_batch_size, device=self.device, rank=rank, world_size=world_size,
            drop_first=self.body.config.decoder_start_token_id if config.model.arch == "encoder_decoder" else None,
            label_classes=(lambda targets, task: model.classes(targets, model.slot_of[task]))
            if isinstance(model, ParadigmModel) and config.paradigm.name == "feature_extraction" else None,
            corruptor=self._corruptor)
        self.evaluation = Evaluator(
            self.batching, model=model, body=self.body, engine=self.engine, comm=self.comm,
            settings=config.evaluation, lockstep=self.zero_stage == 3 and world_size > 1,
            corruptor=self._corruptor, objective_seed=objective["seed"] if objective else None)
        self.strategy = build_training_strategy(config)
        self._stored_columns: pa.Table | None = None
        self.global_step = 0

    def close(self) -> None:
        self.strategy = None  # a teacher model, Fisher information, reference gradients
        self.batching = self.evaluation = self._built_corruptor = None  # they hold the model and engine
        super().close()

    def context(self, plan: TaskPlan) -> TrainingContext:
        shuffled = dataclasses.replace(plan, order="shuffled")  # what a strategy estimates from: every class
        return TrainingContext(
            module=self.model, engine=self.engine, device=self.device, dtype=next(self.model.parameters()).dtype,
            comm=self.comm, batches=lambda: (batch.inputs for batch in self.batches(shuffled, extras=False)),
            collate=lambda sources, targets: self.batching.collate(*self.batching.encode(sources, targets)),
            eval_batch_size=self.config.evaluation.batch_size, rank=self.rank)

    # ------------------------------------------------------------------ data
    def batches(self, plan: TaskPlan, replay: ReplaySource | None = None, *,
                extras: bool = True, skip: int = 0) -> Iterator[StepBatch]:
        """This rank's endless micro-batches of ``plan`` (see ``Batcher.batches``)."""
        return self.batching.batches(plan, replay, extras=extras, skip=skip)

    # ------------------------------------------------------------------ training
    def train_task(self, plan: TaskPlan, on_step: StepCallback | None = None,
                   replay: ReplaySource | None = None,
                   on_checkpoint: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
        """Train on one task plan; returns steps, mean loss, seconds, and wall-clock start/end.

        The loss stays on the device between syncs: every ``training.log_every_n_steps`` steps
        (and at the task's end) one all-reduce carries the window's summed loss and a count of
        non-finite losses, and that is the only host sync of the loop. ``on_step`` is called
        then, with the window's mean loss over steps and ranks. A non-finite loss on any rank
        stops every rank at the same check, naming the first step it appeared at.

        Mid-task checkpoints (``checkpoint.every_n_steps`` / ``every_minutes``): at such a step the
        window is synced too, and ``on_checkpoint(steps_done, progress)`` is called on every rank
        (it saves the state, with ``progress`` beside it: see ``save_state``). A plan with
        ``resume_dir`` continues from such a state: the weights, optimizer and RNG of that step,
        the same micro-batches and replay draws from there on (the ones before it are drawn and
        dropped), the task's loss and example counts so far.
        """
        started_at, start = time.time(), time.perf_counter()
        self.strategy.clear_metrics()
        self._stored_columns = None
        if plan.examples is None or plan.num_steps == 0:  # nothing to train at this task (joint before the last)
            return {"steps": 0, "mean_loss": None, "seconds": 0.0, "started_at": started_at,
                    "ended_at": time.time(), "examples": 0, "trainable_params": 0, "trainable_bytes": 0}
        training = self.config.training
        total, every = plan.num_steps, training.log_every_n_steps
        slot = self._start_slot(plan)
        context = self.context(plan)
        self.strategy.before_task(context, plan)
        loss_sum, window_steps, examples, first_step, earlier_s = 0.0, 0, 0, 0, 0.0
        if plan.resume_dir:  # a restart inside the task: the state of its last mid-task checkpoint
            progress = self.load_state(plan.resume_dir) or {}
            first_step, loss_sum = int(progress.get("steps_done", 0)), float(progress.get("loss_sum", 0.0))
            examples, earlier_s = int(progress.get("examples", 0)), float(progress.get("seconds", 0.0))
            started_at = float(progress.get("started_at", started_at))
        batches = self.batches(plan, replay, skip=first_step * training.grad_accum_steps)
        self.engine.train()
        window = torch.zeros(2, device=self.device)  # summed step losses, non-finite losses
        first_bad = torch.full((), float("inf"), device=self.device)
        scale = (self.config.paradigm.lr or training.lr) / training.lr if slot is not None else 1.0
        every_steps = self.config.checkpoint.every_n_steps if on_checkpoint is not None else None
        every_s = (self.config.checkpoint.every_minutes or 0) * 60 if on_checkpoint is not None else 0
        last_saved = time.monotonic()
        for step in range(first_step, total):
            lr = lr_at(step, total, training) * scale
            for k, group in enumerate(self.engine.optimizer.param_groups):
                group["lr"] = lr if slot is None or k == slot else 0.0  # other tasks' heads/prompts stay put
            for _ in range(training.grad_accum_steps):
                batch = next(batches)
                examples += batch.inputs["input_ids"].shape[0]
                loss = self.strategy.loss(self.engine, batch)
                value = loss.detach().float()
                bad = ~torch.isfinite(value)
                first_bad = torch.where(bad & torch.isinf(first_bad), float(step), first_bad)
                window += torch.stack([value / training.grad_accum_steps, bad.float()])
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            self.global_step += 1
            window_steps += 1
            saves_here = every_steps is not None and (step + 1) % every_steps == 0 and step + 1 < total
            if (step + 1) % every == 0 or step + 1 == total or saves_here:
                metrics = self.strategy.metrics
                names = sorted(metrics)
                # a checkpoint by the clock: rank 0's decides, so that every rank saves at the same step
                due = float(bool(every_s) and self.rank == 0 and time.monotonic() - last_saved >= every_s)
                synced = torch.cat([window, torch.full((1,), due, device=self.device),  # a fill: no copy, no sync
                                    *(metrics[n].reshape(1) for n in names)])
                summed, num_bad, due, *extra = self.comm.all_reduce_sum(synced).tolist()  # the loop's one host sync
                if num_bad:
                    first = int(self.comm.all_reduce_min(first_bad).item())
                    raise NonFiniteLossError(plan.name, first, summed)
                loss_sum += summed
                micro_batches = window_steps * training.grad_accum_steps * self.world_size
                if on_step is not None:
                    on_step(step, total, summed / (window_steps * self.world_size),
                            {n: v / micro_batches for n, v in zip(names, extra)})
                window.zero_()
                self.strategy.clear_metrics()
                window_steps = 0
                if (saves_here or due) and step + 1 < total:
                    on_checkpoint(step + 1, {"steps_done": step + 1, "loss_sum": loss_sum, "examples": examples,
                                             "seconds": earlier_s + time.perf_counter() - start,
                                             "started_at": started_at})
                    last_saved = time.monotonic()
        seconds = earlier_s + time.perf_counter() - start
        self._stored_columns = self.strategy.after_task(context, plan)
        return {"steps": total, "mean_loss": loss_sum / (total * self.world_size), "seconds": seconds,
                "started_at": started_at, "ended_at": time.time(), "examples": examples,
                **dict(zip(("trainable_params", "trainable_bytes"), trained_for(self.model, self.config, plan.name)))}

    def _start_slot(self, plan: TaskPlan) -> int | None:
        """A frozen-model paradigm: make ``plan``'s task the one the model trains, with fresh optimizer
        state for its parameter group (its Adam moments would otherwise start from another task's
        zero-gradient steps). Returns the group's index; None under fine tuning."""
        if not isinstance(self.model, ParadigmModel):
            return None
        slot = self.model.slot_of[plan.name]
        self.model.active = slot
        optimizer = self.engine.optimizer
        base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO and bf16 wrappers keep the torch one
        for param in base.param_groups[slot]["params"]:
            base.state.pop(param, None)
        return slot

    def stored_columns(self) -> pa.Table | None:
        """What the strategies add to the rows the replay store gets after the last trained task (DER++:
        their logits), one row per stored row, in their order; rank 0 only (None: nothing)."""
        columns, self._stored_columns = self._stored_columns, None
        return columns

    # ------------------------------------------------------------------ evaluation
    def _corruptor(self, task: str) -> Corruptor:
        """The pretraining objective over this tokenizer, built once (replay asks for it every batch)."""
        if self.objective is None:
            raise DataError(f"task {task!r} is scored by masked-token accuracy, but the model's pretraining "
                            "objective is unknown (the stream's model.pretrain sets it)")
        if self._built_corruptor is None:
            self._built_corruptor = Corruptor.build(self.objective["arch"], self.objective["objective"],
                                                    self.tokenizer)
        return self._built_corruptor

    def evaluate(self, eval_sets: list[EvalSet]) -> dict[str, float]:
        """Mean score on each eval set (see ``Evaluator.evaluate``). Collective."""
        return self.evaluation.evaluate(eval_sets)

    @property
    def example_scores(self) -> dict[str, list[float]]:
        """The last ``evaluate``'s score of every eval example, per task."""
        return self.evaluation.example_scores

    # ------------------------------------------------------------------ the recovery probe
    def recovery_probe(self, plan: RecoveryPlan) -> dict[str, float]:
        """For each earlier task: the final model with only its output head (untied from the input
        embeddings; and the last decoder block, if the plan says so) retrained for ``plan.steps``
        steps on that task, then that task's score. Runs on this rank alone, outside the engine: the
        stream's model and optimizer are untouched. Returns {task: score after the head retrain}."""
        from transformers import AutoModelForSeq2SeqLM

        results = {}
        for task in plan.tasks:
            torch.manual_seed(plan.seed)
            model = AutoModelForSeq2SeqLM.from_pretrained(plan.checkpoint).to(self.device)
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())  # its own copy: inputs stay as they were
            model.requires_grad_(False)
            trained = [head.weight]
            if plan.last_decoder_block:
                block = last_decoder_block(model)
                block.requires_grad_(True)
                trained += list(block.parameters())
            head.weight.requires_grad_(True)
            optimizer = torch.optim.AdamW(trained, lr=plan.lr)
            batches = self._probe_batches(task, plan.seed)
            model.train()
            for _ in range(plan.steps):
                loss = model(**next(batches)).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            model.eval()
            total, count = self.evaluation.score(task.eval_set, model)
            results[task.name] = total / max(count, 1)
        return results

    def _probe_batches(self, task: RecoveryTask, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        size = self.config.training.micro_batch_size
        sources, targets = task.examples.column("source").to_pylist(), task.examples.column("target").to_pylist()
        corruptor = self._corruptor(task.name) if task.eval_set.metric == MASKED_TOKEN_ACCURACY else None
        if corruptor is None:
            inputs, labels = self.batching.encode(sources, targets)
        else:
            encoded = self.tokenizer(sources, add_special_tokens=False)["input_ids"]
        rng = np.random.default_rng([seed, task.index, 0xC0DE])
        while True:
            chosen = rng.choice(len(sources), size=min(size, len(sources)), replace=False)
            if corruptor is None:
                yield self.batching.collate([inputs[i] for i in chosen], [labels[i] for i in chosen])
            else:
                batch = collate_denoised([corruptor(encoded[i], rng) for i in chosen if len(encoded[i]) >= 2],
                                         self.tokenizer.pad_token_id, self.device)
                batch.pop("masked")
                yield batch

    # ------------------------------------------------------------------ checkpoints and state
    def save_state(self, directory: str | Path, progress: dict[str, float] | None = None) -> Path:
        """Save what a resumed run needs to continue exactly: the DeepSpeed checkpoint (weights,
        optimizer state, ZeRO partitions), and per rank the RNG states and step count, plus the
        strategy's state. Collective.

        The RNG states and the strategy's state are written as JSON and safetensors
        (``pipelines.state_files``): nothing in them runs code when loaded. Written under
        ``<directory>.partial``, fsynced, and renamed once every rank has finished, so ``directory``
        holds a complete state or is absent, after a machine crash too (report.json, which names
        it, is written only after this returns). ``progress``: where a mid-task state is in its task
        (steps done, the loss and examples so far), kept beside the step count; ``load_state``
        returns it. Every file's CRC-32C is listed in it (``storage.checksums``: each rank takes a
        share), for the scheduler to check before a restart or a resume loads it.
        """
        directory = Path(directory)
        partial = directory.with_name(directory.name + ".partial")
        if self.rank == 0:
            files.remove_tree(partial)  # left by a save that was killed
        self.comm.barrier()
        try:
            self.engine.save_checkpoint(str(partial.parent), tag=partial.name, save_latest=False,
                                        client_state={"global_step": self.global_step})
            save_tree({"rng": _rng_state(), "global_step": self.global_step, "task": progress}, partial,
                      f"rank-{self.rank:03d}")
            if self.rank == 0:
                save_tree(self.strategy.state_dict(), partial, "strategy")
            self.comm.barrier()
            checksums.write_share(partial, self.rank, self.world_size)  # checked before a restart loads it
            self.comm.barrier()
            fsync_tree(partial)  # every rank, its files among them: on disk before the name publishes them
        except Exception as exc:  # a full disk: named, with what a state takes; the last commit stands
            if not files.is_disk_full(exc):
                raise
            earlier = [files.tree_bytes(p) for p in directory.parent.glob("task-*") if p.is_dir() and p != partial]
            needed = max([files.tree_bytes(partial), *earlier])
            files.remove_tree(partial)
            raise files.disk_full_error(directory, needed or None, exc) from exc
        self.comm.barrier()
        if self.rank == 0:
            files.remove_tree(directory)
            files.replace(partial, directory)
            fsync_directory(directory.parent)
        self.comm.barrier()
        return directory

    def load_state(self, directory: str | Path) -> dict[str, float] | None:
        """Continue from a ``save_state`` directory (same number of workers and ZeRO stage); returns
        the ``progress`` it was saved with (None: a state saved at a task's end).

        Nothing in it is unpickled: DeepSpeed's files are scanned first and then read weights-only
        (tensors and an allow-list of plain types); the rest is JSON and safetensors. A state
        saved before that format (``rank-NNN.pt``, ``strategy.pt``) loads weights-only too.

        Raises:
            DataError: the directory is incomplete, was saved by another number of workers, or
                holds a file that is not plain data (named).
        """
        directory = Path(directory)
        rank, legacy = f"rank-{self.rank:03d}", not (directory / "strategy.json").is_file()
        needed = ([directory / f"{rank}.pt", directory / "strategy.pt"] if legacy
                  else [directory / f"{rank}.json", directory / f"{rank}.safetensors", directory / "strategy.json",
                        directory / "strategy.safetensors"])
        if not all(p.is_file() for p in needed):
            saved = sorted({p.stem for p in directory.glob("rank-*")}) if directory.is_dir() else []
            raise DataError(f"training state {directory} is incomplete or was saved by another number of workers "
                            f"(it has {saved or 'nothing'}; this is worker {self.rank} of {self.world_size})")
        refuse_unsafe_pickles(directory)
        with weights_only_loads():
            loaded, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
            if loaded is None:
                raise DataError(f"DeepSpeed could not load the training state in {directory}")
            if legacy:
                extra = torch.load(needed[0], weights_only=True)
                strategy = torch.load(needed[1], weights_only=True, map_location=self.device)
        if not legacy:
            extra, strategy = load_tree(directory, rank), load_tree(directory, "strategy", device=self.device)
        try:
            _set_rng_state(extra["rng"])
            self.global_step = int(extra["global_step"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"training state {directory}: {needed[0].name} lacks the RNG state or the step count "
                            f"({type(exc).__name__}: {exc})") from None
        self.strategy.load_state_dict(strategy)
        return extra.get("task")


def last_decoder_block(model: torch.nn.Module) -> torch.nn.Module:
    """The last block of the decoder stack of a T5, BART or BERT2BERT model."""
    decoder = model.get_decoder()
    for name in ("block", "layers"):  # T5, BART
        if hasattr(decoder, name):
            return getattr(decoder, name)[-1]
    return decoder.bert.encoder.layer[-1] if hasattr(decoder, "bert") else decoder.encoder.layer[-1]


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
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
