"""Text to tensors on one rank: encoding, collation, and the endless micro-batches of a task plan
(replayed rows split into the parts the plan names, views under old prefixes, corpus rows corrupted
with the pretraining objective). No model, no engine: what the learner trains on and what a
strategy's ``collate`` turns its rows into.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.denoising import Corruptor
from pipelines.errors import DataError
from pipelines.plan import TaskPlan
from pipelines.strategies.base import IGNORE_INDEX, StepBatch

ReplaySource = Callable[[], pa.Table]  # a table of replayed (source, target) rows per call


class Batcher:
    """One rank's encoder of text and maker of micro-batches.

    Args:
        tokenizer: the stream's tokenizer.
        source_tokens: what a source is cut to; ``max_target_tokens``: what a target is cut to.
        micro_batch_size: rows per micro-batch, replayed rows mixed in included.
        device: where batches are put.
        rank, world_size: this rank's share of a plan's rows is every ``world_size``-th one.
        drop_first: a token the tokenizer writes first that the decoder starts with already
            (BERT's [CLS] for an encoder-decoder warm start); None: keep every token.
        label_classes: feature extraction: (targets, task) -> each target's class id (None: no classes).
        corruptor: (task) -> the pretraining objective, for replayed corpus rows.
    """

    def __init__(self, tokenizer: Any, *, source_tokens: int, max_target_tokens: int, micro_batch_size: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, drop_first: int | None = None,
                 label_classes: Callable[[list[str], str], torch.Tensor] | None = None,
                 corruptor: Callable[[str], Corruptor] | None = None):
        self.tokenizer, self.source_tokens, self.max_target_tokens = tokenizer, source_tokens, max_target_tokens
        self.micro_batch_size, self.device, self.rank, self.world_size = micro_batch_size, device, rank, world_size
        self.drop_first, self.label_classes = drop_first, label_classes
        self._corruptor = corruptor

    def corruptor(self, task: str) -> Corruptor:
        if self._corruptor is None:
            raise DataError(f"task {task!r} replays corpus text, but no pretraining objective was given")
        return self._corruptor(task)

    def encode(self, sources: list[str], targets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        inputs = self.tokenizer(sources, truncation=True, max_length=self.source_tokens)["input_ids"]
        return inputs, self.encode_targets(targets)

    def encode_targets(self, targets: list[str]) -> list[list[int]]:
        labels = self.tokenizer(text_target=targets, truncation=True,
                                max_length=self.max_target_tokens)["input_ids"]
        if self.drop_first is not None:  # BERT writes [CLS] first: the decoder starts with it already
            labels = [y[1:] if y and y[0] == self.drop_first else y for y in labels]
        return labels

    def collate_inputs(self, inputs: list[list[int]]) -> dict[str, torch.Tensor]:
        """Encoder inputs, padded, and their attention mask, on the engine's device."""
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(inputs), max(map(len, inputs))), pad, dtype=torch.long)
        for i, x in enumerate(inputs):
            input_ids[i, : len(x)] = torch.tensor(x)
        return {"input_ids": input_ids.to(self.device), "attention_mask": (input_ids != pad).to(self.device)}

    def collate(self, inputs: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        label_ids = torch.full((len(labels), max(map(len, labels))), IGNORE_INDEX, dtype=torch.long)
        for i, y in enumerate(labels):
            label_ids[i, : len(y)] = torch.tensor(y)
        return {**self.collate_inputs(inputs), "labels": label_ids.to(self.device)}

    def batches(self, plan: TaskPlan, replay: ReplaySource | None = None, *,
                extras: bool = True, skip: int = 0) -> Iterator[StepBatch]:
        """Endless micro-batches of this rank's share, reshuffled each epoch with a seeded generator.

        With ``replay``, one draw of ``plan.replay_rows_per_batch`` replayed rows per micro-batch,
        split as ``plan.replay_parts`` say: a ``mix`` part is appended to the micro-batch (the rest
        from the plan); any other part is a separate batch in ``extras`` under its name (with the
        rows' stored logits beside the labels when the part asks for them). With
        ``plan.distill_prefixes``, ``extras["views"]`` holds the micro-batch's inputs under each
        earlier task's prefix instead of this task's. ``extras=False``: the task's own rows only.
        ``skip``: the first ``skip`` micro-batches are drawn (their replay draws and corruptions too,
        so everything after is what it would have been) but not built or yielded: where a task
        restarted from a mid-task checkpoint goes on.

        Raises:
            DataError: this rank's share of the plan is empty (fewer rows than workers).
        """
        sources = plan.examples.column("source").to_pylist()
        inputs, labels = self.encode(sources, plan.examples.column("target").to_pylist())
        if len(inputs) <= self.rank:
            raise DataError(f"task {plan.name!r} has {len(inputs)} training row(s) for {self.world_size} workers: "
                            f"worker {self.rank} has none to train on; lower training.num_workers")
        views = self.views(sources, plan) if extras else []
        classes = None
        if self.label_classes is not None:  # feature extraction: each target's class in the task's label set
            classes = self.label_classes(plan.examples.column("target").to_pylist(), plan.name)
        parts = plan.replay_parts if replay is not None and extras and plan.replay_rows_per_batch else ()
        denoise_rng = np.random.default_rng([plan.seed, plan.index, self.rank, 0xDE])
        size = self.micro_batch_size - sum(part.rows for part in parts if part.mix and not part.on_top)
        by_class = (np.argsort(np.asarray(plan.examples.column("target").to_pylist(), dtype=object), kind="stable")
                    if plan.order == "by_class" else None)
        for epoch in range(10**9):
            rng = np.random.default_rng([plan.seed, plan.index, epoch])
            everything = by_class if plan.order == "by_class" else rng.permutation(len(inputs))
            order = everything[self.rank :: self.world_size]
            for start in range(0, len(order), size):
                chosen = order[start : start + size]
                if skip:  # drawn, not built: a replay draw and any corruption consume their generators
                    skip -= 1
                    rows = replay() if parts else None
                    for part, offset in zip(parts, np.cumsum([0, *(p.rows for p in parts)])):
                        if plan.denoised_tasks and (part.mix or not part.logits):
                            self.replayed(rows.slice(int(offset), part.rows), plan, denoise_rng)
                    continue
                batch_inputs, batch_labels = [inputs[i] for i in chosen], [labels[i] for i in chosen]
                extra: dict[str, Any] = {}
                rows, offset = (replay() if parts else None), 0
                for part in parts:  # one draw, split in the plan's order
                    chunk, offset = rows.slice(offset, part.rows), offset + part.rows
                    if part.mix:
                        more_inputs, more_labels = self.replayed(chunk, plan, denoise_rng)
                        batch_inputs, batch_labels = batch_inputs + more_inputs, batch_labels + more_labels
                    elif part.logits:
                        extra[part.name] = self.with_logits(chunk)
                    else:
                        extra[part.name] = self.collate(*self.replayed(chunk, plan, denoise_rng))
                if views:
                    extra["views"] = [self.collate_inputs([view[i] for i in chosen]) for view in views]
                model_inputs = self.collate(batch_inputs, batch_labels)
                if classes is not None:  # feature extraction: the class of each target in the task's label set
                    model_inputs["class_ids"] = classes[torch.as_tensor(chosen, dtype=torch.long)].to(self.device)
                yield StepBatch(model_inputs, extra)

    def views(self, sources: list[str], plan: TaskPlan) -> list[list[list[int]]]:
        """LwF: this task's sources under each earlier task's prefix, encoded."""
        if not plan.distill_prefixes:
            return []
        bare = [s[len(plan.prefix):] if s.startswith(plan.prefix) else s for s in sources]
        return [self.tokenizer([prefix + s for s in bare], truncation=True, max_length=self.source_tokens)["input_ids"]
                for prefix in plan.distill_prefixes]

    def with_logits(self, rows: pa.Table) -> dict[str, torch.Tensor]:
        """DER++: replayed rows with their stored top-k logits, as tensors beside the labels
        (``logit_valid`` marks the target tokens that have stored logits)."""
        batch = self.collate(*self.encode(rows.column("source").to_pylist(), rows.column("target").to_pylist()))
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

    def replayed(self, rows: pa.Table, plan: TaskPlan,
                  rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]]]:
        """Encoded replayed rows; rows of the pretraining corpus (general-sample replay) are
        corrupted with the pretraining objective instead."""
        sources, targets = rows.column("source").to_pylist(), rows.column("target").to_pylist()
        if not plan.denoised_tasks or "task_id" not in rows.column_names:
            return self.encode(sources, targets)
        corpus = set(np.flatnonzero(np.isin(rows.column("task_id").to_numpy(), plan.denoised_tasks)).tolist())
        inputs, labels = [], []
        if len(corpus) < len(sources):
            inputs, labels = self.encode([s for i, s in enumerate(sources) if i not in corpus],
                                          [t for i, t in enumerate(targets) if i not in corpus])
        if corpus:
            corruptor = self.corruptor("pretraining")
            encoded = self.tokenizer([sources[i] for i in sorted(corpus)], add_special_tokens=False)["input_ids"]
            limit = self.source_tokens - 1
            for ids in encoded:
                if len(ids) >= 2:
                    example = corruptor(ids[:limit], rng)
                    inputs.append(example.input_ids)
                    labels.append(example.labels)
        return inputs, labels
