"""T5 and BART models and their tokenizers, built offline.

A model is built from a size preset (random init, vocabulary from the tokenizer) or loaded from a
local ``save_pretrained`` directory or a hub name. A tokenizer is loaded from a directory, or
trained on the run's text with the ``tokenizers`` library. Everything written here reopens with
plain ``transformers`` (``AutoModelForSeq2SeqLM`` / ``AutoTokenizer``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from pipelines.config import ModelConfig
from pipelines.errors import ConfigError

# Size presets. t5/base is the t5-small architecture (60M with a 32k vocabulary).
PRESETS: dict[str, dict[str, dict[str, int]]] = {
    "t5": {
        "tiny": dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16),
        "small": dict(d_model=128, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32),
        "base": dict(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64),
    },
    "bart": {
        "tiny": dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4),
        "small": dict(d_model=128, encoder_ffn_dim=512, decoder_ffn_dim=512, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4),
        "base": dict(d_model=768, encoder_ffn_dim=3072, decoder_ffn_dim=3072, encoder_layers=6, decoder_layers=6,
                     encoder_attention_heads=12, decoder_attention_heads=12),
    },
}

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4 as in BART
_BYTE_ALPHABET = 256


def train_tokenizer(
    texts: Iterable[str], *, arch: str, vocab_size: int, algorithm: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``texts``: Unigram + Metaspace for T5, byte-level BPE for BART.

    The post-processor appends ``</s>`` (T5) or wraps in ``<s> ... </s>`` (BART), as the
    original tokenizers do, so a reloaded ``AutoTokenizer`` encodes identically.
    """
    algorithm = algorithm or ("unigram" if arch == "t5" else "bpe")
    specials = T5_SPECIALS if arch == "t5" else BART_SPECIALS
    if algorithm == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()  # without it batch_decode returns garbled text
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    else:
        if vocab_size < _BYTE_ALPHABET + len(specials):
            raise ConfigError(
                f"model.tokenizer.vocab_size ({vocab_size}) is too small for byte-level BPE; "
                f"use at least {_BYTE_ALPHABET + len(specials)}"
            )
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    tok.train_from_iterator(texts, trainer=trainer)
    if algorithm == "unigram":
        _canonicalize_unigram(tok)
    if arch == "t5":
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>",
    )


def _canonicalize_unigram(tok: Tokenizer) -> None:
    """Make the trained vocabulary reproducible.

    The Unigram trainer sums scores in a thread-dependent order and appends the rare characters
    it must keep in hash order, so scores and ids shift from run to run. Rounding scores to 0.01
    (far below what changes a segmentation in practice) and ordering ties by the piece makes the
    same text give the same vocabulary, hence the same model init for the same seed.
    """
    state = json.loads(tok.to_str())["model"]
    vocab = state["vocab"]
    num_special = sum(1 for piece, _ in vocab if piece in T5_SPECIALS + BART_SPECIALS)
    specials, pieces = vocab[:num_special], vocab[num_special:]
    pieces = sorted(((p, round(score, 2)) for p, score in pieces), key=lambda item: (-item[1], item[0]))
    tok.model = models.Unigram([tuple(v) for v in specials] + pieces, unk_id=state["unk_id"], byte_fallback=False)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own bare Exception for a damaged file
        raise ConfigError(f"cannot load a tokenizer from {name_or_path!r}: {type(exc).__name__}: {exc}") from None


def build_tokenizer(config: ModelConfig, texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """The run's tokenizer: loaded when a path is given (or the model is loaded), else trained."""
    source = config.tokenizer.name_or_path or config.name_or_path
    if source:
        return load_tokenizer(source)
    return train_tokenizer(
        texts, arch=config.arch, vocab_size=config.tokenizer.vocab_size, algorithm=config.tokenizer.algorithm
    )


def build_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A seq2seq model from a preset (random init) or a ``save_pretrained`` directory / hub name.

    Raises:
        ConfigError: the directory holds another architecture than ``model.arch``, or cannot be read.
    """
    if config.name_or_path:
        try:
            loaded_type = AutoConfig.from_pretrained(config.name_or_path).model_type
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.name_or_path: cannot load {config.name_or_path!r}: {exc}") from None
        if loaded_type != config.arch:
            raise ConfigError(
                f"model.arch is {config.arch!r} but {config.name_or_path!r} holds a {loaded_type!r} model; "
                f"set model.arch={loaded_type}"
            )
        model = AutoModelForSeq2SeqLM.from_pretrained(config.name_or_path)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    preset = PRESETS[config.arch][config.preset]
    if config.arch == "t5":
        model_config = T5Config(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id, feed_forward_proj="relu", tie_word_embeddings=True,
            **preset,
        )
        return T5ForConditionalGeneration(model_config)
    model_config = BartConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=512, **preset,
    )
    return BartForConditionalGeneration(model_config)


def check_precision(arch: str, precision: str) -> None:
    """Refuse fp16 for T5: its activations overflow fp16's range (transformers #5651, #11461)."""
    if precision == "fp16" and arch == "t5":
        raise ConfigError(
            "training.precision: fp16 is refused for T5 — its feed-forward activations overflow fp16 "
            "and the loss turns NaN (transformers issues #5651, #11461); use bf16 (GPU) or fp32"
        )


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Write model and tokenizer so ``AutoModelForSeq2SeqLM``/``AutoTokenizer`` reopen them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
