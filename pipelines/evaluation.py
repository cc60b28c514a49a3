"""Scoring a model on eval sets, on one rank: greedy generation, likelihood ranking over a label
set, masked-token accuracy on the pretraining task, tasks mixed in one batch; every rank's share
summed by one all-reduce. The learner evaluates through it; the recovery probe scores a plain
module with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipelines.batching import Batcher
from pipelines.config import EvaluationConfig
from pipelines.denoising import MASKED_TOKEN_ACCURACY, Corruptor, denoising_examples, score_denoising
from pipelines.distributed import Collectives
from pipelines.paradigm_model import ParadigmModel
from pipelines.plan import EvalSet
from pipelines.scoring import METRICS
from pipelines.strategies.base import IGNORE_INDEX


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


class Evaluator:
    """One rank's scorer of the run's model.

    Args:
        batcher: the rank's encoder (labels are encoded as targets are).
        model: the engine's module (a ``ParadigmModel`` under a frozen-model paradigm); ``body``: the
            seq2seq model inside it; ``engine``: put in eval mode while scoring, back to train after.
        comm: the collectives that sum every rank's share.
        settings: the run's ``evaluation`` block.
        lockstep: every rank must run every forward pass together (ZeRO-3 with several ranks).
        corruptor, objective_seed: the pretraining objective and its held-out seed, for the
            pretraining task's masked-token accuracy (None: no such task).
    """

    def __init__(self, batcher: Batcher, *, model: torch.nn.Module, body: torch.nn.Module, engine: Any,
                 comm: Collectives, settings: EvaluationConfig, lockstep: bool,
                 corruptor: Callable[[str], Corruptor] | None = None, objective_seed: int | None = None):
        self.batcher, self.tokenizer = batcher, batcher.tokenizer
        self.model, self.body, self.engine, self.comm, self.settings = model, body, engine, comm, settings
        self.lockstep, self.corruptor, self.objective_seed = lockstep, corruptor, objective_seed
        self.source_tokens, self.device = batcher.source_tokens, batcher.device
        self.rank, self.world_size = batcher.rank, batcher.world_size
        self._heldout: tuple[str, list] | None = None
        self.example_scores: dict[str, list[float]] = {}  # the last evaluate's, per task

    @torch.no_grad()
    def generate(self, sources: list[str], model: torch.nn.Module | None = None, task: str | None = None) -> list[str]:
        """Greedy answers to ``sources`` (decoded text): by the run's model (under a frozen-model
        paradigm, with ``task``'s head or prompt; feature extraction answers with label strings), or
        by ``model``, a plain module on this rank alone."""
        enc = self.tokenizer(sources, truncation=True, max_length=self.source_tokens, padding=True,
                             return_tensors="pt").to(self.device)
        settings = dict(
            max_new_tokens=self.settings.max_new_tokens, do_sample=False, num_beams=1,
            # ZeRO-3 partitions the weights: every rank must run every forward pass together.
            synced_gpus=model is None and self.lockstep,
        )
        if model is None and isinstance(self.model, ParadigmModel):
            out = self.model.predict(enc["input_ids"], enc["attention_mask"], task, settings)
            if isinstance(out, list):  # feature extraction answers with label strings
                return out
        else:
            out = (model or self.model).generate(**enc, **settings)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def rank_labels(self, sources: list[str], labels: tuple[str, ...], model: torch.nn.Module | None,
              task: str) -> list[str]:
        """Likelihood scoring: for each source, the label of ``labels`` the model finds likeliest."""
        enc = self.tokenizer(sources, truncation=True, max_length=self.source_tokens, padding=True,
                             return_tensors="pt").to(self.device)
        if model is None and isinstance(self.model, ParadigmModel):
            body, inputs = self.model.body, self.model.encoder_inputs(enc["input_ids"], enc["attention_mask"], task)
        else:
            body, inputs = model or self.model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        scores = label_log_likelihoods(body, inputs, self.batcher.encode_targets(list(labels)))
        return [labels[k] for k in scores.argmax(-1).tolist()]

    def score(self, eval_set: EvalSet, model: torch.nn.Module | None = None,
              examples: list[float] | None = None) -> tuple[float, int]:
        """This rank's summed score and count: an equal share of the examples, padded so every rank
        generates the same number of batches (ZeRO-3 needs them in lockstep). With ``model`` (a
        plain module on this rank alone), every example. ``examples``: each scored example's score
        is written at its index (a masked-token task has none: it scores tokens, not examples)."""
        if eval_set.metric == MASKED_TOKEN_ACCURACY:
            return self.score_denoising(eval_set, self.share(len(eval_set.sources), model), model)
        return self.score_sets([eval_set], model, None if examples is None else [examples])[0]

    def share(self, n: int, model: torch.nn.Module | None) -> list[int]:
        """This rank's indices of ``n`` examples: an equal share, indices >= n padding (every rank
        runs the same number of batches); all of them for a plain ``model`` on this rank alone."""
        ranks, rank = (1, 0) if model is not None else (self.world_size, self.rank)
        return [rank + ranks * k for k in range(-(-n // ranks))]

    def score_sets(self, eval_sets: list[EvalSet], model: torch.nn.Module | None = None,
                   examples: list[list[float]] | None = None) -> list[tuple[float, int]]:
        """This rank's (summed score, count) per eval set, their examples interleaved (each set's first,
        then each set's second, ...): with several sets (``evaluation.mix_tasks``) every batch holds
        several tasks, each input carrying its task in its text, and answers are generated; one set
        alone is ranked over its label set when it has one."""
        one = eval_sets[0] if len(eval_sets) == 1 else None
        items = [(j, i) for i, j in sorted((i, j) for j, s in enumerate(eval_sets) for i in range(len(s.sources)))]
        n, size = len(items), self.settings.batch_size
        mine = self.share(n, model)
        totals = [[0.0, 0] for _ in eval_sets]
        forms = tuple(self.settings.normalize)
        for start in range(0, len(mine), size):
            chunk = mine[start : start + size]
            pairs = [items[min(k, n - 1)] for k in chunk]
            sources = [eval_sets[j].sources[i] for j, i in pairs]
            predictions = (self.rank_labels(sources, one.labels, model, one.name) if one is not None and one.labels
                           else self.generate(sources, model, one.name if one is not None else None))
            for k, (j, i), prediction in zip(chunk, pairs, predictions):
                if k < n:
                    value = METRICS[eval_sets[j].metric](prediction, eval_sets[j].targets[i], forms)
                    totals[j][0] += value
                    totals[j][1] += 1
                    if examples is not None:
                        examples[j][i] = value
        return [(total, count) for total, count in totals]

    def score_denoising(self, eval_set: EvalSet, mine: list[int],
                         model: torch.nn.Module | None = None) -> tuple[float, int]:
        """The pretraining task: masked-token accuracy on its held-out texts, corrupted as the
        pretraining's held-out set was (same objective, same seeds)."""
        if self._heldout is None or self._heldout[0] != eval_set.name:  # built once per held-out set
            self._heldout = (eval_set.name, denoising_examples(eval_set.sources, self.tokenizer,
                                                               self.corruptor(eval_set.name),
                                                               seed=self.objective_seed))
        examples = self._heldout[1]
        n = len(examples)
        real = sum(1 for i in mine if i < n)
        ordered = [examples[i] for i in mine if i < n] + [examples[-1]] * (len(mine) - real)
        totals = score_denoising(model or self.body, ordered, batch_size=self.settings.batch_size,
                                 pad_id=self.tokenizer.pad_token_id, device=self.device, counted=real)
        correct, masked = totals[:2].tolist()
        return correct, int(masked)

    def evaluate(self, eval_sets: list[EvalSet]) -> dict[str, float]:
        """Mean score on each eval set; one all-reduce for all of them, which also carries each
        example's score (every example is scored on one rank, zeros elsewhere: the sum is its
        score). Those are left in ``example_scores`` (task -> one score per eval example, in the
        eval set's order; none for a masked-token task), for the comparison's bootstrap."""
        self.engine.eval()
        per_example = [[0.0] * (0 if s.metric == MASKED_TOKEN_ACCURACY else len(s.sources)) for s in eval_sets]
        try:
            scores: list[tuple[float, int] | None] = [None] * len(eval_sets)
            pooled = ([k for k, s in enumerate(eval_sets) if not s.labels and s.metric != MASKED_TOKEN_ACCURACY]
                      if self.settings.mix_tasks else [])
            if len(pooled) > 1:
                chosen = [eval_sets[k] for k in pooled]
                for k, result in zip(pooled, self.score_sets(chosen, examples=[per_example[k] for k in pooled])):
                    scores[k] = result
            local = [value for k, s in enumerate(eval_sets) for value in (scores[k] or self.score(s, None, per_example[k]))]
        finally:
            self.engine.train()
        flat = local + [value for values in per_example for value in values]
        summed = self.comm.all_reduce_sum(self.comm.tensor(flat, dtype=torch.float64)).tolist()
        totals, offset = summed[: len(local)], len(local)
        self.example_scores = {}
        for s, values in zip(eval_sets, per_example):
            if values:
                self.example_scores[s.name] = summed[offset : offset + len(values)]
                offset += len(values)
        return {s.name: totals[2 * k] / totals[2 * k + 1] for k, s in enumerate(eval_sets)}
