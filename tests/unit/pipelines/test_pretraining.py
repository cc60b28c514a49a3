"""Pretraining: the lossless tokenizer, the corpus split, the cache key, one rank's pretraining,
and the encoder-decoder warm start."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from pipelines.config import CorpusConfig, CorpusFileSource, ModelConfig, PretrainConfig, load_config
from pipelines.denoising import Corruptor, denoising_examples
from pipelines.errors import ConfigError, DataError
from pipelines.models import build_model, train_tokenizer
from pipelines.pretraining import (
    Pretrainer,
    chunk_tokens,
    chunk_texts,
    load_corpus,
    pack_chunks,
    pretrain_key,
    split_corpus,
)
from pipelines.tasks import BUILTIN_TASKS, load_builtin

CACHE = os.path.expanduser("~/.cache/forgetless")
ODD = ["", " leading space", "two  spaces\tand a tab\nand a newline", "trailing ", "\x00 a null byte",
       "emoji 😀 and 日本語, ﬁ ligature, full－width", "special strings </s> <pad> <unk> <mask> <extra_id_0> <s>",
       "\u2581 the metaspace mark", "Ġ byte-level marks Ċ", "<0x41> a byte token's name", "é" * 3000]


@pytest.fixture(scope="module")
def corpus_sample() -> list[str]:
    docs = load_corpus(CorpusConfig().source, CACHE)
    assert len(docs) == len(set(docs))  # repeats removed: held-out text must not be trained on
    return docs[:300]


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_a_corpus_tokenizer_encodes_every_builtin_task_and_any_utf8_without_loss(arch, corpus_sample):
    tokenizer = train_tokenizer(corpus_sample, arch=arch, vocab_size=800, lossless=True,
                                num_sentinels=8 if arch == "t5" else 0)
    texts = list(ODD)
    for name in BUILTIN_TASKS:
        table = load_builtin(name, CACHE)
        texts += table.column("source").to_pylist()[:4000] + table.column("target").to_pylist()[:4000]
    lost = []
    for start in range(0, len(texts), 5000):
        batch = texts[start : start + 5000]
        decoded = tokenizer.batch_decode(tokenizer(batch)["input_ids"], skip_special_tokens=True)
        lost += [(t, d) for t, d in zip(batch, decoded) if t != d]
    assert not lost, f"{len(lost)} of {len(texts)} texts changed, e.g. {lost[:3]}"
    if arch == "t5":  # sentinels exist as single ids, and a text never produces one
        ids = tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_7>"])
        assert tokenizer.unk_token_id not in ids
        assert not set(ids) & set(tokenizer("<extra_id_0> and <extra_id_7>")["input_ids"])


def test_the_corpus_split_holds_documents_out_and_is_seeded(corpus_sample):
    config = CorpusConfig(heldout_documents=50, max_documents=100)
    train, heldout = split_corpus(corpus_sample, config, seed=0)
    assert len(heldout) == 50 and len(train) == 100
    assert not set(train) & set(heldout)
    assert split_corpus(corpus_sample, config, seed=0) == (train, heldout)
    assert split_corpus(corpus_sample, config, seed=1)[1] != heldout
    with pytest.raises(DataError, match="heldout_documents"):
        split_corpus(corpus_sample[:10], config, seed=0)


def test_a_corpus_file_with_a_bad_row_is_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"corpus\.jsonl:2"):
        load_corpus(CorpusFileSource(kind="file", path=str(path)), tmp_path)
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"corpus\.jsonl:1"):
        load_corpus(CorpusFileSource(kind="file", path=str(path)), tmp_path)
    path.write_text("")
    with pytest.raises(DataError):
        load_corpus(CorpusFileSource(kind="file", path=str(path)), tmp_path)


def test_the_cache_key_follows_what_the_checkpoint_depends_on():
    base = PretrainConfig()
    key = pretrain_key(base)
    assert pretrain_key(base.model_copy(update={"output_dir": "/elsewhere", "cache_dir": "/c"})) == key
    assert pretrain_key(PretrainConfig(training={"max_steps": 1000, "log_every_n_steps": 3})) == key
    assert pretrain_key(PretrainConfig(training={"max_steps": 999})) != key
    assert pretrain_key(PretrainConfig(objective={"noise_density": 0.2})) != key
    assert pretrain_key(PretrainConfig(model={"arch": "bart", "preset": "tiny"})) != key


def test_pretrain_configs_refuse_what_cannot_be_pretrained():
    with pytest.raises(ValueError, match="T5 or BART from a preset"):
        PretrainConfig(model={"arch": "t5", "name_or_path": "/x"})
    with pytest.raises(ValueError, match="max_steps"):
        PretrainConfig(training={"max_steps": None})


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_one_rank_of_pretraining_lowers_the_heldout_loss(arch, corpus_sample, tmp_path):
    config = PretrainConfig(
        model={"arch": arch, "preset": "tiny", "tokenizer": {"vocab_size": 600}},
        objective={"num_sentinels": 8}, corpus={"seq_len": 32},
        training={"max_steps": 30, "micro_batch_size": 16, "lr": 3e-3, "zero_stage": 0, "log_every_n_steps": 10},
        eval_every_n_steps=30)
    train, heldout = split_corpus(corpus_sample, CorpusConfig(heldout_documents=30), seed=0)
    tokenizer = train_tokenizer(train, arch=arch, vocab_size=600, lossless=True, num_sentinels=8 if arch == "t5" else 0)
    tokenizer.save_pretrained(tmp_path / "tok")
    corruptor = Corruptor.build(arch, config.objective, tokenizer)
    examples = denoising_examples(chunk_texts(tokenizer, heldout, 32, 48), tokenizer, corruptor, seed=0)
    assert examples == denoising_examples(chunk_texts(tokenizer, heldout, 32, 48), tokenizer, corruptor, seed=0)
    pretrainer = Pretrainer(config, tmp_path / "tok")
    before = pretrainer.evaluate(examples)
    logged = []
    result = pretrainer.train(pack_chunks(chunk_tokens(tokenizer, train, 32)), examples,
                              on_log=lambda step, m: logged.append((step, m)))
    assert result["heldout_loss"] < before["heldout_loss"] - 0.5
    assert [s for s, m in logged if "train_loss" in m] == [10, 20, 30]
    assert result["tokens_seen"] > 30 * 16 * 8
    out = pretrainer.save(tmp_path / "ckpt", extra=lambda d: (d / "manifest.json").write_text("{}"))
    assert (out / "manifest.json").is_file() and (out / "config.json").is_file()


# ------------------------------------------------------------------------ the warm start
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small BERT written the way a hub checkpoint is (config, weights, WordPiece vocabulary)."""
    directory = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "positive", "negative", "neutral", "great", "bad",
             "movie", "sentiment", ":", "a", "the", "film", "was", "red", "blue", "green", "cat", "dog", "fish",
             "sun", "moon", "star", "color", "animal", "sky", "category", "first", "word", "_"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert len(tokenizer) == len(words)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, tokenizer


def test_an_encoder_decoder_warm_starts_both_stacks_from_the_encoder(tiny_bert):
    directory, tokenizer = tiny_bert
    bert = BertModel.from_pretrained(directory)
    model = build_model(ModelConfig(arch="encoder_decoder", encoder=str(directory)), tokenizer)
    embedding = bert.embeddings.word_embeddings.weight
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, embedding)
    assert torch.equal(model.decoder.bert.embeddings.word_embeddings.weight, embedding)
    assert model.config.decoder_start_token_id == tokenizer.cls_token_id
    assert model.generation_config.eos_token_id == tokenizer.sep_token_id
    batch = tokenizer(["sentiment: a great film"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3)
    assert out[0, 0].item() == tokenizer.cls_token_id

    random = build_model(ModelConfig(arch="encoder_decoder", encoder=str(directory), weights="random"), tokenizer)
    assert not torch.equal(random.encoder.embeddings.word_embeddings.weight, embedding)
    assert sum(p.numel() for p in random.parameters()) == sum(p.numel() for p in model.parameters())


def test_model_sources_are_one_of_four(tmp_path):
    with pytest.raises(ValueError, match="set one of model.preset"):
        ModelConfig(arch="t5", preset="tiny", pretrain="p.yaml")
    with pytest.raises(ValueError, match="encoder_decoder goes with model.encoder"):
        ModelConfig(arch="t5", encoder="minilm")
    with pytest.raises(ValueError, match="encoder_decoder goes with model.encoder"):
        ModelConfig(arch="encoder_decoder", name_or_path="/x")
    with pytest.raises(ValueError, match="a preset is random init already"):
        ModelConfig(arch="t5", preset="tiny", weights="random")
    assert ModelConfig(arch="t5", pretrain="p.yaml").preset is None
    config = tmp_path / "c.yaml"
    config.write_text("stream:\n  pretraining_task: true\n  tasks:\n    - {name: a, source: {kind: builtin, name: sms_spam}}\n")
    with pytest.raises(ConfigError, match="pretraining_task needs model.pretrain"):
        load_config(config)
    loaded = load_config(config, ["model.pretrain=p.yaml"])
    assert loaded.stream.has_pretraining_task and loaded.stream.pretraining_task.name == "pretraining"


def test_the_warm_start_trains_and_evaluates_through_the_learner(tiny_bert, toy_stream_config, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from pipelines.config import validate_config
    from pipelines.learner import Learner
    from pipelines.plan import EvalSet, build_plan
    from pipelines.tasks import load_stream

    directory, tokenizer = tiny_bert
    toy_stream_config["model"] = {"arch": "encoder_decoder", "encoder": str(directory)}
    toy_stream_config["training"].update(max_steps=40, lr=3e-3)
    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    learner = Learner(config, directory)
    plan = build_plan(config, stream, 0)
    batch = next(learner.batches(plan))
    assert (batch.inputs["labels"][:, 0] != tokenizer.cls_token_id).all()  # the decoder starts with [CLS] already
    losses = []
    learner.train_task(plan, on_step=lambda step, total, loss, metrics: losses.append(loss))
    assert losses[-1] < losses[0]
    task = stream[0]
    scores = learner.evaluate([EvalSet(task.name, task.metric, task.sources("train")[:32], task.targets("train")[:32])])
    assert scores[task.name] > 0.3  # the category of the first word, on rows it trained on
    saved = learner.save(tmp_path / "ckpt")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(saved)
    assert type(reloaded).__name__ == "EncoderDecoderModel"
    assert reloaded.generation_config.decoder_start_token_id == tokenizer.cls_token_id


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_a_label_at_the_start_of_a_text_gets_the_pieces_it_gets_inside_one(arch, corpus_sample):
    tokenizer = train_tokenizer(corpus_sample, arch=arch, vocab_size=1000, lossless=True)
    for word in ("neutral", "positive", "spam"):
        alone = tokenizer(word, add_special_tokens=False)["input_ids"]
        inside = tokenizer(f"it is {word}", add_special_tokens=False)["input_ids"]
        assert inside[-len(alone):] == alone
