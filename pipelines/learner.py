"""The model side of a continual-learning run, inside one trainer process.

``Learner`` owns a DeepSpeed engine for the whole stream: it executes one task plan at a time,
evaluates on every task, exports plain ``transformers`` checkpoints and saves / loads the training
state a resumed run continues from. It knows nothing of Ray: the same object runs in a Ray Train
worker, under torchrun, or in a test with one process.
"""

from __future__ import annotations

import gc
import logging
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipelines.config import ModelConfig, RunConfig, TrainingConfig
from pipelines.deepspeed_config import build_deepspeed_config, resolve_precision
from pipelines.denoising import (
    MASKED_TOKEN_ACCURACY,
    Corruptor,
    collate_denoised,
    denoising_examples,
    score_denoising,
)
from pipelines.distributed import Collectives, init_distributed
from pipelines.errors import DataError, NonFiniteLossError
from pipelines.models import build_model, check_precision, load_tokenizer, save_pretrained
from pipelines.paradigms import PARADIGM_FILE, ParadigmModel, TaskSlot, source_tokens, trained_for
from pipelines.plan import EvalSet, RecoveryPlan, RecoveryTask, TaskPlan
from pipelines.scoring import METRICS
from pipelines.strategies import build_training_strategy
from pipelines.strategies.base import IGNORE_INDEX, StepBatch, TrainingContext
from storage.files import atomic_directory

log = logging.getLogger("forgetless")

# (step, num_steps, mean loss since the last call, the strategy's metrics averaged the same way)
StepCallback = Callable[[int, int, float, dict[str, float]], None]
ReplaySource = Callable[[], pa.Table]  # a table of replayed (source, target) rows per call


@torch.no_grad()
def label_log_likelihoods(body: torch.nn.Module, encoder_inputs: dict[str, torch.Tensor], label_ids: list[list[int]],
                          *, budget: int = 1 << 25) -> torch.Tensor:
    """(batch, labels) log-likelihood of each whole label sequence given each input, teacher-forced.

    The encoder runs once; the labels go through the decoder in groups of as many as keep a pass's
    logits under ``budget`` elements. ``encoder_inputs``: the encoder's keyword arguments
    (``input_ids`` or ``inputs_embeds``, and ``attention_mask``)."""
    from transformers.modeling_outputs import BaseModelOutput

    mask = encoder_inputs["attention_mask"]
    hidden = body.get_encoder()(**encoder_inputs, return_dict=True).last_hidden_state
    batch, count = hidden.shape[0], len(label_ids)
    width = max(map(len, label_ids))
    targets = torch.full((count, width), IGNORE_INDEX, dtype=torch.long, device=hidden.device)
    for k, ids in enumerate(label_ids):
        targets[k, : len(ids)] = torch.tensor(ids, device=hidden.device)
    head = body.get_output_embeddings().weight
    vocab = getattr(head, "ds_shape", head.shape)[0]  # ZeRO-3 leaves an empty placeholder in .shape
    group = max(1, budget // max(1, batch * width * vocab))
    scores = torch.empty(batch, count, dtype=torch.float32, device=hidden.device)
    for start in range(0, count, group):
        size = min(group, count - start)
        labels = targets[start : start + size].repeat(batch, 1)  # row b * size + j: input b, label start + j
        logits = body(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(size, 0)),
                      attention_mask=mask.repeat_interleave(size, 0), labels=labels).logits
        picked = logits.float().log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        scores[:, start : start + size] = (picked * (labels != IGNORE_INDEX)).sum(-1).view(batch, size)
    return scores


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

        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
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

        def write() -> None:
            with atomic_directory(directory) as tmp:
                save_pretrained(self.body, self.tokenizer, tmp)
                if isinstance(self.model, ParadigmModel):  # the heads or prompts, beside the untouched body
                    torch.save(self.model.extra_state(), tmp / PARADIGM_FILE)
                if extra is not None:
                    extra(tmp)

        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                if self.rank == 0:
                    write()
        elif self.rank == 0:
            write()
        self.comm.barrier()
        return directory

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
        self._heldout: tuple[str, list] | None = None
        self._built_corruptor: Corruptor | None = None
        self.strategy = build_training_strategy(config)
        self._stored_columns: pa.Table | None = None
        self.global_step = 0

    def close(self) -> None:
        self.strategy = None  # a teacher model, Fisher information, reference gradients
        self._heldout = self._built_corruptor = None
        super().close()

    def context(self, plan: TaskPlan) -> TrainingContext:
        return TrainingContext(
            module=self.model, engine=self.engine, device=self.device, dtype=next(self.model.parameters()).dtype,
            comm=self.comm, batches=lambda: (batch.inputs for batch in self.batches(plan, extras=False)),
            collate=lambda sources, targets: self._collate(*self._encode(sources, targets)),
            eval_batch_size=self.config.evaluation.batch_size, rank=self.rank)

    # ------------------------------------------------------------------ data
    def _encode(self, sources: list[str], targets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        inputs = self.tokenizer(sources, truncation=True, max_length=self.source_tokens)["input_ids"]
        return inputs, self._encode_targets(targets)

    def _encode_targets(self, targets: list[str]) -> list[list[int]]:
        labels = self.tokenizer(text_target=targets, truncation=True,
                                max_length=self.config.stream.max_target_tokens)["input_ids"]
        if self.config.model.arch == "encoder_decoder":  # BERT writes [CLS] first: the decoder starts with it already
            start = self.body.config.decoder_start_token_id
            labels = [y[1:] if y and y[0] == start else y for y in labels]
        return labels

    def _collate_inputs(self, inputs: list[list[int]]) -> dict[str, torch.Tensor]:
        """Encoder inputs, padded, and their attention mask, on the engine's device."""
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(inputs), max(map(len, inputs))), pad, dtype=torch.long)
        for i, x in enumerate(inputs):
            input_ids[i, : len(x)] = torch.tensor(x)
        return {"input_ids": input_ids.to(self.device), "attention_mask": (input_ids != pad).to(self.device)}

    def _collate(self, inputs: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        label_ids = torch.full((len(labels), max(map(len, labels))), IGNORE_INDEX, dtype=torch.long)
        for i, y in enumerate(labels):
            label_ids[i, : len(y)] = torch.tensor(y)
        return {**self._collate_inputs(inputs), "labels": label_ids.to(self.device)}

    def batches(self, plan: TaskPlan, replay: ReplaySource | None = None, *,
                extras: bool = True) -> Iterator[StepBatch]:
        """Endless micro-batches of this rank's share, reshuffled each epoch with a seeded generator.

        With ``replay``, one draw of ``plan.replay_rows_per_batch`` replayed rows per micro-batch,
        split as ``plan.replay_parts`` say: a ``mix`` part is appended to the micro-batch (the rest
        from the plan); any other part is a separate batch in ``extras`` under its name (with the
        rows' stored logits beside the labels when the part asks for them). With
        ``plan.distill_prefixes``, ``extras["views"]`` holds the micro-batch's inputs under each
        earlier task's prefix instead of this task's. ``extras=False``: the task's own rows only.

        Raises:
            DataError: this rank's share of the plan is empty (fewer rows than workers).
        """
        sources = plan.examples.column("source").to_pylist()
        inputs, labels = self._encode(sources, plan.examples.column("target").to_pylist())
        if len(inputs) <= self.rank:
            raise DataError(f"task {plan.name!r} has {len(inputs)} training row(s) for {self.world_size} workers: "
                            f"worker {self.rank} has none to train on; lower training.num_workers")
        views = self._views(sources, plan) if extras else []
        classes = None
        if isinstance(self.model, ParadigmModel) and self.config.paradigm.name == "feature_extraction":
            classes = self.model.classes(plan.examples.column("target").to_pylist(), self.model.slot_of[plan.name])
        parts = plan.replay_parts if replay is not None and extras and plan.replay_rows_per_batch else ()
        denoise_rng = np.random.default_rng([plan.seed, plan.index, self.rank, 0xDE])
        size = self.config.training.micro_batch_size - sum(part.rows for part in parts if part.mix)
        by_class = (np.argsort(np.asarray(plan.examples.column("target").to_pylist(), dtype=object), kind="stable")
                    if plan.order == "by_class" else None)
        for epoch in range(10**9):
            rng = np.random.default_rng([plan.seed, plan.index, epoch])
            everything = by_class if plan.order == "by_class" else rng.permutation(len(inputs))
            order = everything[self.rank :: self.world_size]
            for start in range(0, len(order), size):
                chosen = order[start : start + size]
                batch_inputs, batch_labels = [inputs[i] for i in chosen], [labels[i] for i in chosen]
                extra: dict[str, Any] = {}
                rows, offset = (replay() if parts else None), 0
                for part in parts:  # one draw, split in the plan's order
                    chunk, offset = rows.slice(offset, part.rows), offset + part.rows
                    if part.mix:
                        more_inputs, more_labels = self._replayed(chunk, plan, denoise_rng)
                        batch_inputs, batch_labels = batch_inputs + more_inputs, batch_labels + more_labels
                    elif part.logits:
                        extra[part.name] = self._with_logits(chunk)
                    else:
                        extra[part.name] = self._collate(*self._replayed(chunk, plan, denoise_rng))
                if views:
                    extra["views"] = [self._collate_inputs([view[i] for i in chosen]) for view in views]
                model_inputs = self._collate(batch_inputs, batch_labels)
                if classes is not None:  # feature extraction: the class of each target in the task's label set
                    model_inputs["class_ids"] = classes[torch.as_tensor(chosen, dtype=torch.long)].to(self.device)
                yield StepBatch(model_inputs, extra)

    def _views(self, sources: list[str], plan: TaskPlan) -> list[list[list[int]]]:
        """LwF: this task's sources under each earlier task's prefix, encoded."""
        if not plan.distill_prefixes:
            return []
        bare = [s[len(plan.prefix):] if s.startswith(plan.prefix) else s for s in sources]
        return [self.tokenizer([prefix + s for s in bare], truncation=True, max_length=self.source_tokens)["input_ids"]
                for prefix in plan.distill_prefixes]

    def _with_logits(self, rows: pa.Table) -> dict[str, torch.Tensor]:
        """DER++: replayed rows with their stored top-k logits, as tensors beside the labels
        (``logit_valid`` marks the target tokens that have stored logits)."""
        batch = self._collate(*self._encode(rows.column("source").to_pylist(), rows.column("target").to_pylist()))
        stored = rows.column("logits").to_pylist() if "logits" in rows.column_names else [None] * rows.num_rows
        ks = {logits["k"] for logits in stored if logits is not None}
        width, k = batch["labels"].shape[1], max(ks, default=1)
        ids = torch.zeros((rows.num_rows, width, k), dtype=torch.long)
        values = torch.zeros((rows.num_rows, width, k), dtype=torch.float32)
        valid = torch.zeros((rows.num_rows, width), dtype=torch.bool)
        for i, logits in enumerate(stored):
            if logits is None or logits["k"] != k:
                continue
            tokens = min(logits["tokens"], width)
            shape = (logits["tokens"], k)
            ids[i, :tokens] = torch.tensor(logits["ids"], dtype=torch.long).view(shape)[:tokens]
            values[i, :tokens] = torch.tensor(logits["values"], dtype=torch.float32).view(shape)[:tokens]
            valid[i, :tokens] = True
        device = self.device
        return {**batch, "logit_ids": ids.to(device), "logit_values": values.to(device), "logit_valid": valid.to(device)}

    def _replayed(self, rows: pa.Table, plan: TaskPlan,
                  rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]]]:
        """Encoded replayed rows; rows of the pretraining corpus (general-sample replay) are
        corrupted with the pretraining objective instead."""
        sources, targets = rows.column("source").to_pylist(), rows.column("target").to_pylist()
        if not plan.denoised_tasks or "task_id" not in rows.column_names:
            return self._encode(sources, targets)
        corpus = set(np.flatnonzero(np.isin(rows.column("task_id").to_numpy(), plan.denoised_tasks)).tolist())
        inputs, labels = [], []
        if len(corpus) < len(sources):
            inputs, labels = self._encode([s for i, s in enumerate(sources) if i not in corpus],
                                          [t for i, t in enumerate(targets) if i not in corpus])
        if corpus:
            corruptor = self._corruptor("pretraining")
            encoded = self.tokenizer([sources[i] for i in sorted(corpus)], add_special_tokens=False)["input_ids"]
            limit = self.source_tokens - 1
            for ids in encoded:
                if len(ids) >= 2:
                    example = corruptor(ids[:limit], rng)
                    inputs.append(example.input_ids)
                    labels.append(example.labels)
        return inputs, labels

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
        batches = self.batches(plan, replay)
        self.engine.train()
        window = torch.zeros(2, device=self.device)  # summed step losses, non-finite losses
        first_bad = torch.full((), float("inf"), device=self.device)
        loss_sum, window_steps, examples = 0.0, 0, 0
        scale = (self.config.paradigm.lr or training.lr) / training.lr if slot is not None else 1.0
        for step in range(total):
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
            if (step + 1) % every == 0 or step + 1 == total:
                metrics = self.strategy.metrics
                names = sorted(metrics)
                synced = torch.cat([window, *(metrics[n].reshape(1) for n in names)]) if names else window
                summed, num_bad, *extra = self.comm.all_reduce_sum(synced).tolist()  # the loop's one host sync
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
        seconds = time.perf_counter() - start
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
    @torch.no_grad()
    def _generate(self, sources: list[str], model: torch.nn.Module | None = None, task: str | None = None) -> list[str]:
        enc = self.tokenizer(sources, truncation=True, max_length=self.source_tokens, padding=True,
                             return_tensors="pt").to(self.device)
        settings = dict(
            max_new_tokens=self.config.evaluation.max_new_tokens, do_sample=False, num_beams=1,
            # ZeRO-3 partitions the weights: every rank must run every forward pass together.
            synced_gpus=model is None and self.config.training.zero_stage == 3 and self.world_size > 1,
        )
        if model is None and isinstance(self.model, ParadigmModel):
            out = self.model.predict(enc["input_ids"], enc["attention_mask"], task, settings)
            if isinstance(out, list):  # feature extraction answers with label strings
                return out
        else:
            out = (model or self.model).generate(**enc, **settings)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def _rank(self, sources: list[str], labels: tuple[str, ...], model: torch.nn.Module | None,
              task: str) -> list[str]:
        """Likelihood scoring: for each source, the label of ``labels`` the model finds likeliest."""
        enc = self.tokenizer(sources, truncation=True, max_length=self.source_tokens, padding=True,
                             return_tensors="pt").to(self.device)
        if model is None and isinstance(self.model, ParadigmModel):
            body, inputs = self.model.body, self.model.encoder_inputs(enc["input_ids"], enc["attention_mask"], task)
        else:
            body, inputs = model or self.model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        scores = label_log_likelihoods(body, inputs, self._encode_targets(list(labels)))
        return [labels[k] for k in scores.argmax(-1).tolist()]

    def _score(self, eval_set: EvalSet, model: torch.nn.Module | None = None) -> tuple[float, int]:
        """This rank's summed score and count: an equal share of the examples, padded so every rank
        generates the same number of batches (ZeRO-3 needs them in lockstep). With ``model`` (a
        plain module on this rank alone), every example."""
        if eval_set.metric == MASKED_TOKEN_ACCURACY:
            return self._score_denoising(eval_set, self._share(len(eval_set.sources), model), model)
        return self._score_sets([eval_set], model)[0]

    def _share(self, n: int, model: torch.nn.Module | None) -> list[int]:
        """This rank's indices of ``n`` examples: an equal share, indices >= n padding (every rank
        runs the same number of batches); all of them for a plain ``model`` on this rank alone."""
        ranks, rank = (1, 0) if model is not None else (self.world_size, self.rank)
        return [rank + ranks * k for k in range(-(-n // ranks))]

    def _score_sets(self, eval_sets: list[EvalSet], model: torch.nn.Module | None = None) -> list[tuple[float, int]]:
        """This rank's (summed score, count) per eval set, their examples interleaved (each set's first,
        then each set's second, ...): with several sets (``evaluation.mix_tasks``) every batch holds
        several tasks, each input carrying its task in its text, and answers are generated; one set
        alone is ranked over its label set when it has one."""
        one = eval_sets[0] if len(eval_sets) == 1 else None
        items = [(j, i) for i, j in sorted((i, j) for j, s in enumerate(eval_sets) for i in range(len(s.sources)))]
        n, size = len(items), self.config.evaluation.batch_size
        mine = self._share(n, model)
        totals = [[0.0, 0] for _ in eval_sets]
        for start in range(0, len(mine), size):
            chunk = mine[start : start + size]
            pairs = [items[min(k, n - 1)] for k in chunk]
            sources = [eval_sets[j].sources[i] for j, i in pairs]
            predictions = (self._rank(sources, one.labels, model, one.name) if one is not None and one.labels
                           else self._generate(sources, model, one.name if one is not None else None))
            for k, (j, i), prediction in zip(chunk, pairs, predictions):
                if k < n:
                    totals[j][0] += METRICS[eval_sets[j].metric](prediction, eval_sets[j].targets[i])
                    totals[j][1] += 1
        return [(total, count) for total, count in totals]

    def _corruptor(self, task: str) -> Corruptor:
        """The pretraining objective over this tokenizer, built once (replay asks for it every batch)."""
        if self.objective is None:
            raise DataError(f"task {task!r} is scored by masked-token accuracy, but the model's pretraining "
                            "objective is unknown (the stream's model.pretrain sets it)")
        if self._built_corruptor is None:
            self._built_corruptor = Corruptor.build(self.objective["arch"], self.objective["objective"],
                                                    self.tokenizer)
        return self._built_corruptor

    def _score_denoising(self, eval_set: EvalSet, mine: list[int],
                         model: torch.nn.Module | None = None) -> tuple[float, int]:
        """The pretraining task: masked-token accuracy on its held-out texts, corrupted as the
        pretraining's held-out set was (same objective, same seeds)."""
        if self._heldout is None or self._heldout[0] != eval_set.name:
            self._heldout = (eval_set.name, denoising_examples(eval_set.sources, self.tokenizer,
                                                               self._corruptor(eval_set.name),
                                                               seed=self.objective["seed"]))
        examples = self._heldout[1]
        n = len(examples)
        real = sum(1 for i in mine if i < n)
        ordered = [examples[i] for i in mine if i < n] + [examples[-1]] * (len(mine) - real)
        totals = score_denoising(model or self.body, ordered, batch_size=self.config.evaluation.batch_size,
                                 pad_id=self.tokenizer.pad_token_id, device=self.device, counted=real)
        correct, masked = totals[:2].tolist()
        return correct, int(masked)

    def evaluate(self, eval_sets: list[EvalSet]) -> dict[str, float]:
        """Mean score on each eval set; one all-reduce for all of them."""
        self.engine.eval()
        try:
            scores: list[tuple[float, int] | None] = [None] * len(eval_sets)
            pooled = ([k for k, s in enumerate(eval_sets) if not s.labels and s.metric != MASKED_TOKEN_ACCURACY]
                      if self.config.evaluation.mix_tasks else [])
            if len(pooled) > 1:
                for k, result in zip(pooled, self._score_sets([eval_sets[k] for k in pooled])):
                    scores[k] = result
            local = [value for k, s in enumerate(eval_sets) for value in (scores[k] or self._score(s))]
        finally:
            self.engine.train()
        totals = self.comm.all_reduce_sum(self.comm.tensor(local, dtype=torch.float64)).view(-1, 2).tolist()
        return {s.name: total / count for s, (total, count) in zip(eval_sets, totals)}

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
                block = _last_decoder_block(model)
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
            total, count = self._score(task.eval_set, model)
            results[task.name] = total / max(count, 1)
        return results

    def _probe_batches(self, task: RecoveryTask, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        size = self.config.training.micro_batch_size
        sources, targets = task.examples.column("source").to_pylist(), task.examples.column("target").to_pylist()
        corruptor = self._corruptor(task.name) if task.eval_set.metric == MASKED_TOKEN_ACCURACY else None
        if corruptor is None:
            inputs, labels = self._encode(sources, targets)
        else:
            encoded = self.tokenizer(sources, add_special_tokens=False)["input_ids"]
        rng = np.random.default_rng([seed, task.index, 0xC0DE])
        while True:
            chosen = rng.choice(len(sources), size=min(size, len(sources)), replace=False)
            if corruptor is None:
                yield self._collate([inputs[i] for i in chosen], [labels[i] for i in chosen])
            else:
                batch = collate_denoised([corruptor(encoded[i], rng) for i in chosen if len(encoded[i]) >= 2],
                                         self.tokenizer.pad_token_id, self.device)
                batch.pop("masked")
                yield batch

    # ------------------------------------------------------------------ checkpoints and state
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


def _last_decoder_block(model: torch.nn.Module) -> torch.nn.Module:
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
