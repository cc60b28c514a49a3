"""Pretraining objectives on token ids: T5 span corruption and BART text infilling.

Both take the token ids of one text (no special tokens) and a seeded ``numpy`` generator, and
return a ``Denoised`` example: the corrupted input, the target, and which target positions were
corrupted (what "masked-token accuracy" scores). ``Corruptor`` picks the arch's objective and its
special ids from a tokenizer; ``score_denoising`` is the one held-out measure, used by
``forgetless pretrain`` and by a stream's pretraining task alike.

T5 (Raffel et al. 2020, section 3.1.4): ``noise_density`` of the tokens, in spans whose mean
length is ``mean_span_length``, are dropped from the input; each span leaves one sentinel there.
The target is each span's sentinel followed by the span, in order. Input and target together
reconstruct the text exactly.

BART (Lewis et al. 2020, section 2.2): ``mask_ratio`` of the tokens, in spans whose lengths are
drawn from Poisson(``poisson_lambda``), are replaced by one mask token per span; a zero-length span
inserts a mask. The target is the original text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.config import ObjectiveConfig
from pipelines.errors import DataError
from pipelines.models import sentinel_tokens

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's ignore_index)
MASKED_TOKEN_ACCURACY = "masked_token_accuracy"  # the metric of a pretraining task


@dataclass(frozen=True)
class Denoised:
    """One pretraining example: ``input_ids`` -> ``labels``; ``masked[i]``: labels[i] was corrupted in the input."""

    input_ids: list[int]
    labels: list[int]
    masked: list[bool]

    @property
    def num_masked(self) -> int:
        return sum(self.masked)


def _random_partition(total: int, parts: int, rng: np.random.Generator, *, minimum: int) -> list[int]:
    """``total`` split into ``parts`` random summands, each at least ``minimum`` (stars and bars)."""
    spare = total - parts * minimum
    if spare < 0:
        raise ValueError(f"cannot split {total} into {parts} parts of at least {minimum}")
    cuts = np.sort(rng.choice(spare + parts - 1, size=parts - 1, replace=False)) if parts > 1 else np.array([], int)
    bounds = np.concatenate([[-1], cuts, [spare + parts - 1]])
    return [int(x) + minimum for x in np.diff(bounds) - 1]


def span_corruption_counts(length: int, noise_density: float, mean_span_length: float,
                           max_spans: int) -> tuple[int, int]:
    """(noise tokens, spans) for a text of ``length`` tokens, as T5 rounds them."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    num_spans = min(num_spans, num_noise, length - num_noise, max_spans)
    return num_noise, num_spans


def span_corruption(tokens: Sequence[int], rng: np.random.Generator, *, sentinel_ids: Sequence[int],
                    eos_id: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> Denoised:
    """T5's span corruption of one text.

    Noise and kept tokens alternate, starting with kept tokens; their span lengths are random
    partitions of the counts ``span_corruption_counts`` gives.

    Raises:
        ValueError: fewer than 2 tokens, or no sentinel ids.
    """
    if not sentinel_ids:
        raise ValueError("span corruption needs sentinel token ids")
    tokens = list(tokens)
    num_noise, num_spans = span_corruption_counts(len(tokens), noise_density, mean_span_length, len(sentinel_ids))
    noise = _random_partition(num_noise, num_spans, rng, minimum=1)
    kept = _random_partition(len(tokens) - num_noise, num_spans, rng, minimum=1)
    inputs, labels, masked = [], [], []
    position = 0
    for span, (keep, drop) in enumerate(zip(kept, noise)):
        inputs += tokens[position : position + keep]
        position += keep
        sentinel = sentinel_ids[span]
        inputs.append(sentinel)
        labels.append(sentinel)
        masked.append(False)
        labels += tokens[position : position + drop]
        masked += [True] * drop
        position += drop
    inputs += tokens[position:]
    return Denoised(inputs + [eos_id], labels + [eos_id], masked + [False])


def restore_span_corruption(example: Denoised, sentinel_ids: Sequence[int], eos_id: int) -> list[int]:
    """The original tokens from a span-corrupted example: each sentinel in the input replaced by its span."""
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for token in example.labels[:-1]:
        if token in sentinel_ids:
            current = spans.setdefault(token, [])
        elif current is not None:
            current.append(token)
    out: list[int] = []
    for token in example.input_ids[:-1]:
        out += spans[token] if token in spans else [token]
    return out


def text_infilling(tokens: Sequence[int], rng: np.random.Generator, *, mask_id: int, bos_id: int, eos_id: int,
                   mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                   original: Sequence[int] | None = None) -> Denoised:
    """BART's text infilling of one text.

    ``round(length x mask_ratio)`` tokens are masked, in spans of Poisson(``poisson_lambda``)
    lengths (the last one cut to fit); each span, zero-length ones included, becomes one mask
    token. The kept tokens are spread over the gaps between spans at random.

    ``original``: the text before sentence permutation, when ``tokens`` are of the permuted text;
    it becomes the target, and every target position counts as corrupted.

    Raises:
        ValueError: no tokens.
    """
    tokens = list(tokens)
    if not tokens:
        raise ValueError("text infilling needs at least 1 token")
    to_mask = round(len(tokens) * mask_ratio)
    lengths: list[int] = []
    while sum(lengths) < to_mask:
        lengths.append(int(rng.poisson(poisson_lambda)))
    if lengths:
        lengths[-1] -= sum(lengths) - to_mask
    elif mask_ratio > 0:
        lengths = [0]  # nothing to mask in so short a text: still one inserted mask to infill
    gaps = _random_partition(len(tokens) - to_mask, len(lengths) + 1, rng, minimum=0)
    inputs, masked = [], []
    position = 0
    for gap, span in zip(gaps, lengths):
        inputs += tokens[position : position + gap]
        masked += [False] * gap
        position += gap
        inputs.append(mask_id)
        masked += [True] * span
        position += span
    inputs += tokens[position:]
    masked += [False] * (len(tokens) - position)
    if original is not None:
        tokens, masked = list(original), [True] * len(original)
    return Denoised([bos_id, *inputs, eos_id], [bos_id, *tokens, eos_id], [False, *masked, False])


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def permute_sentences(text: str, rng: np.random.Generator) -> str:
    """BART's sentence permutation: the text's sentences (split after . ! ?) in a random order."""
    sentences = [s for s in _SENTENCE_END.split(text) if s]
    if len(sentences) < 2:
        return text
    return " ".join(sentences[i] for i in rng.permutation(len(sentences)))


# ------------------------------------------------------------------------ an arch's objective, batched
@dataclass(frozen=True)
class Corruptor:
    """One arch's denoising objective over a tokenizer's ids."""

    arch: str
    objective: ObjectiveConfig
    special_ids: dict[str, Any]

    @classmethod
    def build(cls, arch: str, objective: ObjectiveConfig | dict[str, Any], tokenizer: Any) -> Corruptor:
        objective = objective if isinstance(objective, ObjectiveConfig) else ObjectiveConfig(**objective)
        if arch == "t5":
            sentinels = tokenizer.convert_tokens_to_ids(sentinel_tokens(objective.num_sentinels))
            if tokenizer.unk_token_id in sentinels:
                raise DataError("the tokenizer has no T5 sentinel tokens (<extra_id_0>...): it was not built by "
                                "`forgetless pretrain`")
            ids = {"sentinels": sentinels, "eos": tokenizer.eos_token_id}
        elif arch == "bart":
            if tokenizer.mask_token_id is None:
                raise DataError("the tokenizer has no <mask> token: BART text infilling needs one")
            ids = {"mask": tokenizer.mask_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
        else:
            raise DataError(f"no pretraining objective for model.arch {arch!r}: pretrain a t5 or a bart")
        return cls(arch, objective, ids)

    def __call__(self, tokens: Sequence[int], rng: np.random.Generator,
                 original: Sequence[int] | None = None) -> Denoised:
        o, ids = self.objective, self.special_ids
        if self.arch == "t5":
            return span_corruption(tokens, rng, sentinel_ids=ids["sentinels"], eos_id=ids["eos"],
                                   noise_density=o.noise_density, mean_span_length=o.mean_span_length)
        return text_infilling(tokens, rng, mask_id=ids["mask"], bos_id=ids["bos"], eos_id=ids["eos"],
                              mask_ratio=o.mask_ratio, poisson_lambda=o.poisson_lambda, original=original)


def denoising_examples(texts: Sequence[str], tokenizer: Any, corruptor: Corruptor, *, seed: int,
                       max_tokens: int | None = None) -> list[Denoised]:
    """Held-out examples: each text corrupted with its own seeded draw, the same in every run."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    examples = []
    for i, ids in enumerate(encoded):
        ids = ids[:max_tokens] if max_tokens else ids
        if len(ids) >= 2:
            examples.append(corruptor(ids, np.random.default_rng([seed, i])))
    return examples


def collate_denoised(examples: Sequence[Denoised], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A padded batch: input_ids, attention_mask, labels (padding ignored), masked (corrupted label positions)."""
    width, label_width = max(len(e.input_ids) for e in examples), max(len(e.labels) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
    masked = torch.zeros((len(examples), label_width), dtype=torch.bool)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        masked[i, : len(e.masked)] = torch.tensor(e.masked)
    return {"input_ids": input_ids.to(device), "attention_mask": (input_ids != pad_id).to(device),
            "labels": labels.to(device), "masked": masked.to(device)}


@torch.no_grad()
def score_denoising(model: torch.nn.Module, examples: Sequence[Denoised], *, batch_size: int, pad_id: int,
                    device: torch.device, counted: int | None = None) -> torch.Tensor:
    """[masked tokens predicted right, masked tokens, summed label loss, label tokens], teacher-forced
    (argmax at each corrupted target position), on the device: the caller all-reduces.

    ``counted``: only the first ``counted`` examples count (the rest pad a rank's share so every
    rank runs as many forward passes: ZeRO-3 needs them in lockstep).
    """
    counted = len(examples) if counted is None else counted
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for start in range(0, len(examples), batch_size):
        batch = collate_denoised(examples[start : start + batch_size], pad_id, device)
        masked = batch.pop("masked")
        logits = model(**batch).logits.float()
        labels = batch["labels"]
        keep = (torch.arange(labels.shape[0], device=device) + start < counted)[:, None]
        scored = (labels != IGNORE_INDEX) & keep
        masked = masked & keep
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        totals += torch.stack([((logits.argmax(-1) == labels) & masked).sum().double(), masked.sum().double(),
                               (loss * scored).sum().double(), scored.sum().double()])
    return totals
