"""Pretraining our own T5 / BART: the corpus, its held-out split, the denoising batches, the
``Pretrainer`` (one rank of ``forgetless pretrain``), and where a pretrained checkpoint is cached.

The corpus is real text fetched offline (the chitchat conversation corpus by default) or a user's
file. Documents are split into training and held-out sets once, by a seeded shuffle; nothing of the
held-out split is trained on. The tokenizer is trained on the training documents alone, so a stream
that starts from the checkpoint has never seen its tasks' text, and it is lossless, so it still
encodes every later task exactly.

A pretrained checkpoint is a ``save_pretrained`` directory (model + tokenizer) plus
``manifest.json``: the corpus and its size, steps, tokens seen, held-out loss and masked-token
accuracy, the objective, the code version. A pretrain config named by a stream is built once into
``<cache_dir>/pretrained/<arch>-<preset>-<digest>``, the digest taken over what the checkpoint
depends on (not where it is written or how it is watched).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.config import (
    PRETRAIN_PLACEMENT,
    CorpusBuiltinSource,
    CorpusConfig,
    CorpusFileSource,
    PretrainConfig,
    PretrainingTaskConfig,
)
from pipelines.denoising import MASKED_TOKEN_ACCURACY, Corruptor, Denoised, collate_denoised, permute_sentences, score_denoising
from pipelines.errors import DataError
from pipelines.learner import Engine, lr_at
from pipelines.tasks import Task, fetch_wheel
from storage.tables import ExampleFileError, read_examples, write_parquet_atomic

CHITCHAT = "chitchat-dataset==0.9.0"
CHITCHAT_MEMBER = "chitchat_dataset/dataset.json"
# Bumped whenever the code changes what a checkpoint is (the objective, the tokenizer): part of the
# cache key, so a checkpoint built by older code is not reused.
OBJECTIVE_VERSION = 2
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------ the corpus
def _read_chitchat(data: bytes) -> list[str]:
    """One document per conversation: its messages in order, joined by spaces."""
    conversations = json.loads(data.decode("utf-8"))
    documents = []
    for key in sorted(conversations):
        texts = [m["text"].strip() for turn in conversations[key]["messages"] for m in turn if m.get("text")]
        if texts:
            documents.append(" ".join(t for t in texts if t))
    return documents


def load_corpus(source: CorpusBuiltinSource | CorpusFileSource, cache_dir: str | Path) -> list[str]:
    """Every document of the corpus, in a fixed order (fetched once and cached as Parquet).

    Raises:
        DataError: the corpus cannot be fetched or read, or holds no text (naming the file and row).
    """
    if isinstance(source, CorpusFileSource):
        try:
            table = read_examples(source.path, source_column=source.text_column, target_column=source.text_column)
        except ExampleFileError as exc:
            raise DataError(f"corpus: {exc}") from None
        documents = [t for t in table.column("source").to_pylist() if t.strip()]
    else:
        cache_dir = Path(cache_dir).expanduser()
        cached = cache_dir / "builtin" / f"corpus-{source.name}.parquet"
        if cached.is_file():
            documents = pq.read_table(cached).column("text").to_pylist()
        else:
            with zipfile.ZipFile(fetch_wheel(CHITCHAT, cache_dir)) as wheel:
                documents = _read_chitchat(wheel.read(CHITCHAT_MEMBER))
            write_parquet_atomic(pa.table({"text": documents}), cached)
    if not documents:
        where = source.path if isinstance(source, CorpusFileSource) else source.name
        raise DataError(f"corpus {where!r} holds no text (corpus.source)")
    # Exact repeats (the chitchat corpus has some) would put held-out text into training: keep the first.
    return list(dict.fromkeys(documents))


def split_corpus(documents: list[str], corpus: CorpusConfig, *, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: a seeded shuffle, the held-out split cut first.

    Raises:
        DataError: too few documents to hold some out and train on the rest.
    """
    if len(documents) <= corpus.heldout_documents:
        raise DataError(f"corpus.heldout_documents ({corpus.heldout_documents}) leaves nothing to train on: the "
                        f"corpus has {len(documents)} document(s); lower it")
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(documents))
    heldout = [documents[i] for i in order[: corpus.heldout_documents]]
    train = [documents[i] for i in order[corpus.heldout_documents :]]
    if corpus.max_documents:
        train = train[: corpus.max_documents]
    return train, heldout


def chunk_tokens(tokenizer: Any, documents: Sequence[str], seq_len: int, *, min_len: int = 4) -> list[list[int]]:
    """Each document's tokens (no special tokens) cut into pieces of ``seq_len``; pieces shorter than
    ``min_len`` are dropped."""
    chunks = []
    for start in range(0, len(documents), 1000):
        encoded = tokenizer(list(documents[start : start + 1000]), add_special_tokens=False)["input_ids"]
        for ids in encoded:
            chunks += [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) >= min_len]
    return chunks


def chunk_texts(tokenizer: Any, documents: Sequence[str], seq_len: int, count: int) -> list[str]:
    """The first ``count`` chunks of ``documents`` as text (the held-out evaluation texts, when the
    documents are the held-out ones)."""
    chunks = chunk_tokens(tokenizer, documents, seq_len)[:count]
    return tokenizer.batch_decode(chunks, skip_special_tokens=False)


def pretraining_task(spec: PretrainingTaskConfig, pretrain: PretrainConfig, tokenizer: Any) -> Task:
    """The pretraining objective as a stream's task 0: held-out texts to evaluate on (masked-token
    accuracy), and training chunks (for the recovery probe; never trained on by the stream)."""
    documents = load_corpus(pretrain.corpus.source, pretrain.cache_dir)
    train, heldout = split_corpus(documents, pretrain.corpus, seed=pretrain.seed)
    seq_len = pretrain.corpus.seq_len
    eval_texts = chunk_texts(tokenizer, heldout, seq_len, spec.max_eval_examples)
    train_texts = chunk_texts(tokenizer, train[:2000], seq_len, 4000)
    table = lambda texts: pa.table({"source": texts, "target": [""] * len(texts)})  # noqa: E731
    return Task(name=spec.name, prefix="", metric=MASKED_TOKEN_ACCURACY, train=table(train_texts),
                eval=table(eval_texts), max_steps=0, trainable=False)


# ------------------------------------------------------------------------ the cache
def pretrain_key(config: PretrainConfig) -> str:
    """A digest of what a checkpoint depends on: model, corpus, objective, training, seed, code version."""
    data = config.model_dump(mode="json", exclude=set(PRETRAIN_PLACEMENT))
    data["training"].pop("log_every_n_steps", None)
    data["objective_version"] = OBJECTIVE_VERSION
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def default_output_dir(config: PretrainConfig) -> Path:
    return (Path(config.cache_dir).expanduser() / "pretrained"
            / f"{config.model.arch}-{config.model.preset}-{pretrain_key(config)}")


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of a finished pretraining in ``directory``, or None (absent, unreadable)."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------ one rank's pretraining
TokenChunks = tuple[np.ndarray, np.ndarray]  # (flat int32 token ids, start offsets with a final end)


def pack_chunks(chunks: Sequence[Sequence[int]]) -> TokenChunks:
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.fromiter((t for c in chunks for t in c), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


class Pretrainer(Engine):
    """One rank of ``forgetless pretrain``: denoising steps on its share of the chunks, held-out
    evaluation at intervals (one all-reduce), the checkpoint written at the end."""

    def __init__(self, config: PretrainConfig, tokenizer_dir: str | Path, *, rank: int = 0, world_size: int = 1):
        super().__init__(config.model, config.training, tokenizer_dir, seed=config.seed, rank=rank,
                         world_size=world_size)
        self.config = config
        self.corruptor = Corruptor.build(config.model.arch, config.objective, self.tokenizer)

    def _batches(self, chunks: TokenChunks) -> Iterator[tuple[list[Denoised], int]]:
        flat, offsets = chunks
        count, size = len(offsets) - 1, self.training.micro_batch_size
        if count <= self.rank:
            raise DataError(f"the corpus gives {count} training chunk(s) for {self.world_size} workers")
        permute = self.config.model.arch == "bart" and self.config.objective.permute_sentences
        for epoch in range(10**9):
            order = np.random.default_rng([self.config.seed, epoch]).permutation(count)[self.rank :: self.world_size]
            rng = np.random.default_rng([self.config.seed, epoch, self.rank, 1])
            for start in range(0, len(order), size):
                examples, tokens = [], 0
                for i in order[start : start + size]:
                    ids = flat[offsets[i] : offsets[i + 1]].tolist()
                    tokens += len(ids)
                    if permute:
                        text = self.tokenizer.decode(ids)
                        shuffled = self.tokenizer(permute_sentences(text, rng), add_special_tokens=False)["input_ids"]
                        examples.append(self.corruptor(shuffled, rng, original=ids))
                    else:
                        examples.append(self.corruptor(ids, rng))
                yield examples, tokens

    def evaluate(self, examples: Sequence[Denoised]) -> dict[str, float]:
        """Held-out denoising loss (per label token) and masked-token accuracy, over every rank's share."""
        per_rank = -(-len(examples) // self.world_size)
        indices = [self.rank + self.world_size * k for k in range(per_rank)]  # >= len(examples): padding
        real = sum(1 for i in indices if i < len(examples))
        mine = [examples[min(i, len(examples) - 1)] for i in indices]
        self.engine.eval()
        try:
            totals = score_denoising(self.model, mine, batch_size=64, pad_id=self.tokenizer.pad_token_id,
                                     device=self.device, counted=real)
        finally:
            self.engine.train()
        correct, masked, loss, labels = self.comm.all_reduce_sum(totals).tolist()
        return {"heldout_loss": loss / max(labels, 1), "heldout_masked_token_accuracy": correct / max(masked, 1)}

    def train(self, chunks: TokenChunks, heldout: Sequence[Denoised], *,
              on_log: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """``training.max_steps`` optimizer steps; ``on_log(step, metrics)`` on every logging and
        evaluation step (train_loss; heldout_loss, heldout_masked_token_accuracy). Returns totals."""
        training, total = self.training, self.training.max_steps
        every, eval_every = training.log_every_n_steps, self.config.eval_every_n_steps
        batches = self._batches(chunks)
        pad = self.tokenizer.pad_token_id
        window = torch.zeros((), device=self.device)  # summed losses: stays on the device between syncs
        window_tokens, tokens_seen, last_eval = 0, 0.0, {}
        self.engine.train()
        for step in range(total):
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr_at(step, total, training)
            for _ in range(training.grad_accum_steps):
                examples, tokens = next(batches)
                batch = collate_denoised(examples, pad, self.device)
                batch.pop("masked")
                loss = self.engine(**batch).loss
                window += loss.detach().float() / training.grad_accum_steps
                window_tokens += tokens
                self.engine.backward(loss)
                self.engine.step()
            logged: dict[str, float] = {}
            if (step + 1) % every == 0 or step + 1 == total:
                both = torch.stack([window, torch.tensor(float(window_tokens), device=self.device)])
                summed, tokens = self.comm.all_reduce_sum(both).tolist()  # the loop's one host sync
                steps_in_window = every if (step + 1) % every == 0 else (step + 1) % every
                logged["train_loss"] = summed / (steps_in_window * self.world_size)
                if not np.isfinite(logged["train_loss"]):
                    raise DataError(f"pretraining loss is {logged['train_loss']} at step {step}: lower training.lr")
                tokens_seen += tokens
                logged["tokens_seen"] = tokens_seen
                window.zero_()
                window_tokens = 0
            if (step + 1) % eval_every == 0 or step + 1 == total:
                last_eval = self.evaluate(heldout)
                logged.update(last_eval)
            if logged and on_log is not None:
                on_log(step + 1, logged)
        return {"steps": total, "tokens_seen": int(tokens_seen), **last_eval}
