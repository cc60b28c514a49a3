import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from pipelines.config import ModelConfig
from pipelines.errors import ConfigError
from pipelines.models import build_model, load_tokenizer, save_pretrained, train_tokenizer

TEXTS = ["question type: How far is it from Denver to Aspen ?", "NUM", "spam or ham: Ok lar joking wif u", "ham",
         "sentiment: a gorgeous, witty, seductive movie", "positive"] * 30


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_trained_tokenizer_and_model_reopen_with_plain_transformers(arch, tmp_path):
    tokenizer = train_tokenizer(TEXTS, arch=arch, vocab_size=300)
    model = build_model(ModelConfig(arch=arch, preset="tiny"), tokenizer)
    assert model.config.model_type == arch
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    save_pretrained(model, tokenizer, tmp_path)

    reopened_tok = AutoTokenizer.from_pretrained(tmp_path)
    reopened = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    text = "How far is Denver ?"
    assert reopened_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reopened_tok(text)["input_ids"][-1] == tokenizer.eos_token_id  # post-processor survives
    assert reopened_tok.decode(reopened_tok(text)["input_ids"], skip_special_tokens=True).strip() == text
    for a, b in zip(model.state_dict().values(), reopened.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_t5_tokenizer_training_is_reproducible():
    a = train_tokenizer(TEXTS * 3, arch="t5", vocab_size=200)
    b = train_tokenizer(TEXTS * 3, arch="t5", vocab_size=200)
    assert a.get_vocab() == b.get_vocab()


def test_bpe_vocabulary_too_small_for_bytes():
    with pytest.raises(ConfigError, match="vocab_size \\(100\\) is too small for a byte-level vocabulary"):
        train_tokenizer(TEXTS, arch="bart", vocab_size=100)


def test_loading_a_directory_of_another_architecture_is_refused(tmp_path):
    tokenizer = train_tokenizer(TEXTS, arch="bart", vocab_size=300)
    save_pretrained(build_model(ModelConfig(arch="bart", preset="tiny"), tokenizer), tokenizer, tmp_path)
    with pytest.raises(ConfigError, match=r"model.arch is 't5' but .* holds a 'bart' model \(.*config.json\)"):
        build_model(ModelConfig(arch="t5", preset=None, name_or_path=str(tmp_path)), tokenizer)
    loaded = build_model(ModelConfig(arch="bart", preset=None, name_or_path=str(tmp_path)), tokenizer)
    assert loaded.config.model_type == "bart"


def test_a_model_directory_without_a_tokenizer_is_refused_naming_the_directory(tmp_path):
    tokenizer = train_tokenizer(TEXTS, arch="t5", vocab_size=300)
    build_model(ModelConfig(arch="t5", preset="tiny"), tokenizer).save_pretrained(tmp_path)  # the weights alone
    with pytest.raises(ConfigError, match=f"{tmp_path} holds no tokenizer \\(none of tokenizer.json, "):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("other", ["larger vocabulary", "other special ids"])
def test_a_tokenizer_that_is_not_the_models_is_refused_naming_config_json_and_each_difference(other, tmp_path):
    tokenizer = train_tokenizer(TEXTS, arch="t5", vocab_size=300)
    save_pretrained(build_model(ModelConfig(arch="t5", preset="tiny"), tokenizer), tokenizer, tmp_path / "model")
    wrong = (train_tokenizer(TEXTS * 4 + [f"word{i}" for i in range(400)], arch="t5", vocab_size=600)
             if other == "larger vocabulary" else train_tokenizer(TEXTS, arch="bart", vocab_size=300))
    wrong.save_pretrained(tmp_path / "tokenizer")
    config = ModelConfig(arch="t5", preset=None, name_or_path=str(tmp_path / "model"))
    expected = (rf"the tokenizer has {len(wrong)} tokens, the model's embedding {len(tokenizer)} rows "
                rf"\(vocab_size in {tmp_path / 'model' / 'config.json'}\)" if other == "larger vocabulary" else
                rf".*pad_token_id is 1 in the tokenizer, 0 in {tmp_path / 'model' / 'config.json'}; eos_token_id is 2 in the "
                rf"tokenizer, 1 in")
    with pytest.raises(ConfigError, match=rf"model.name_or_path {tmp_path / 'model'}: the tokenizer "
                                          rf"\({tmp_path / 'tokenizer'}\) is not the model's: {expected}"):
        build_model(config, load_tokenizer(tmp_path / "tokenizer"))
    assert build_model(config, load_tokenizer(tmp_path / "model")).config.vocab_size == len(tokenizer)  # its own: fine
    random = config.model_copy(update={"weights": "random"})  # the architecture alone takes any tokenizer
    assert build_model(random, load_tokenizer(tmp_path / "tokenizer")).get_input_embeddings().num_embeddings >= len(wrong)


def test_missing_model_directory_is_a_config_error(tmp_path):
    tokenizer = train_tokenizer(TEXTS, arch="t5", vocab_size=100)
    with pytest.raises(ConfigError, match="model.name_or_path: cannot load"):
        build_model(ModelConfig(arch="t5", preset=None, name_or_path=str(tmp_path / "nope")), tokenizer)


def test_preset_and_path_are_exclusive():
    with pytest.raises(ValueError, match="either model.preset"):
        ModelConfig(arch="t5", preset="tiny", name_or_path="x")


def test_targets_longer_than_the_limit_are_named_with_the_length_they_need(toy_stream_config):
    from pipelines.config import validate_config
    from pipelines.models import stream_tokenizer, long_targets
    from pipelines.tasks import load_stream

    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    tokenizer = stream_tokenizer(config.model, stream)
    longest = max(len(tokenizer(text_target=t)["input_ids"]) for task in stream for t in task.targets("train"))
    assert long_targets(tokenizer, stream, longest) == []
    problems = long_targets(tokenizer, stream, 1)
    assert len(problems) == 2 and all("stream.max_target_tokens=1" in p and "raise it to" in p for p in problems)


def test_a_byte_level_unigram_vocabulary_is_the_same_every_time_and_keeps_every_byte():
    """The trainer scores characters the text never uses by noise and drops some of them when the
    vocabulary is small: the same text must still give the same ids, and every byte a piece."""
    texts = [f"category: {w} {v}" for w in ("red", "dog", "sun", "moon") for v in ("fish", "star", "cat")]
    tokenizers = [train_tokenizer(texts, arch="t5", vocab_size=300, lossless=True) for _ in range(5)]
    assert all(t.get_vocab() == tokenizers[0].get_vocab() for t in tokenizers)
    weird = "Ωmega \x00 zebra ü 🙂"
    assert tokenizers[0].decode(tokenizers[0](weird)["input_ids"], skip_special_tokens=True) == weird
    assert tokenizers[0].unk_token_id not in tokenizers[0](weird)["input_ids"]


def _task(name, targets, metric="exact_match"):
    import pyarrow as pa

    from pipelines.tasks import Task

    table = pa.table({"source": [f"conjugate {i}" for i in range(len(targets))], "target": targets})
    return Task(name=name, prefix=f"{name}: ", metric=metric, train=table, eval=table)


def test_targets_a_tokenizer_cannot_give_back_cap_the_task_and_are_named():
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    from pipelines.models import target_ceilings
    from pipelines.tasks import TaskStream

    # an uncased WordPiece vocabulary that strips accents, as MiniLM's (the warm start's) does
    words = ["mangeâmes", "mangeames", "finîmes", "parlons", "parlez", "Spam", "ham"]
    wordpiece = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    wordpiece.train_from_iterator(words * 20, vocab_size=200, min_frequency=1)
    uncased = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    stream = TaskStream((_task("conjugation", ["mangeâmes", "parlons", "finîmes", "parlez", "parlons"]),
                         _task("spam", ["Spam", "ham", "ham", "Spam"])))
    ceilings, problems = target_ceilings(uncased, stream, max_target_tokens=16)
    # two of five targets lose their accents; case alone is forgiven (exact match is case-folded)
    assert ceilings == {"conjugation": pytest.approx(3 / 5), "spam": 1.0}
    assert len(problems) == 1 and "task 'conjugation': 2 of 5 evaluation targets (40%)" in problems[0]
    assert "decodes as 'mangeames'" in problems[0] and "cannot pass 0.600" in problems[0]
    assert "evaluation.normalize=[case,accents,whitespace]" in problems[0]  # the accents alone are lost
    # scored without accents (the config asks for it), nothing is out of reach
    ceilings, problems = target_ceilings(uncased, stream, max_target_tokens=16,
                                         normalize=["case", "accents", "whitespace"])
    assert ceilings == {"conjugation": 1.0, "spam": 1.0} and problems == []

    # a cut at max_target_tokens loses targets too; ROUGE-L keeps the words that do come back
    words_task = _task("summary", ["parlons parlez parlons parlez"], metric="rouge_l")
    ceilings, _ = target_ceilings(uncased, TaskStream((words_task,)), max_target_tokens=3)
    assert 0 < ceilings["summary"] < 1


def test_our_own_tokenizer_gives_every_target_back(toy_stream_config):
    from pipelines.config import validate_config
    from pipelines.models import stream_tokenizer, target_ceilings
    from pipelines.tasks import load_stream

    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    ceilings, problems = target_ceilings(stream_tokenizer(config.model, stream), stream, max_target_tokens=8)
    assert ceilings == {"category": 1.0, "first_word": 1.0} and problems == []
