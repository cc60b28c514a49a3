"""The pretraining objectives: T5 span corruption and BART text infilling, on token ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.denoising import (
    permute_sentences,
    restore_span_corruption,
    span_corruption,
    span_corruption_counts,
    text_infilling,
)

BOX4 = "Thank you for inviting me to your party last week ."
WORDS = BOX4.split()
VOCAB = {w: i + 10 for i, w in enumerate(WORDS)}
TOKENS = [VOCAB[w] for w in WORDS]  # 11 tokens, ids 10..20
SENTINELS = list(range(900, 1000))  # <extra_id_0> ... as ids
EOS, BOS, MASK = 1, 0, 4
ID_TO_WORD = {**{i: w for w, i in VOCAB.items()}, **{s: f"<X{k}>" for k, s in enumerate(SENTINELS)}, EOS: "</s>",
              BOS: "<s>", MASK: "<mask>"}


def words(ids):
    return " ".join(ID_TO_WORD[i] for i in ids)


def test_t5_span_corruption_of_the_lectures_sentence():
    example = span_corruption(TOKENS, np.random.default_rng(3), sentinel_ids=SENTINELS, eos_id=EOS)
    # 11 tokens x 0.15 -> 2 corrupted tokens in round(2 / 3) = 1 span
    assert example.num_masked == 2
    assert example.input_ids.count(SENTINELS[0]) == 1 and SENTINELS[1] not in example.input_ids
    assert example.labels[0] == SENTINELS[0] and example.labels[-1] == EOS
    assert example.input_ids[-1] == EOS
    assert restore_span_corruption(example, SENTINELS, EOS) == TOKENS
    # e.g. "Thank you <X0> me to your party last week . </s>" -> "<X0> for inviting </s>"
    assert words(example.input_ids).replace("<X0>", words(example.labels[1:-1])).replace(" </s>", "") == BOX4


def test_bart_text_infilling_of_the_lectures_sentence():
    example = text_infilling(TOKENS, np.random.default_rng(0), mask_id=MASK, bos_id=BOS, eos_id=EOS)
    assert example.labels == [BOS, *TOKENS, EOS]  # the target is the original text
    assert example.num_masked == round(11 * 0.3)
    kept = [t for t in example.input_ids[1:-1] if t != MASK]
    assert len(kept) == 11 - example.num_masked
    assert MASK in example.input_ids
    # the kept tokens appear in order: the input is the text with spans replaced by one mask each
    it = iter(TOKENS)
    assert all(any(t == u for u in it) for t in kept)


token_lists = st.lists(st.integers(min_value=10, max_value=800), min_size=2, max_size=300)


@settings(max_examples=200, deadline=None)
@given(tokens=token_lists, seed=st.integers(0, 2**32 - 1), density=st.floats(0.05, 0.5), span=st.floats(1.0, 8.0))
def test_t5_input_and_target_reconstruct_the_text(tokens, seed, density, span):
    example = span_corruption(tokens, np.random.default_rng(seed), sentinel_ids=SENTINELS, eos_id=EOS,
                              noise_density=density, mean_span_length=span)
    assert restore_span_corruption(example, SENTINELS, EOS) == tokens
    noise, spans = span_corruption_counts(len(tokens), density, span, len(SENTINELS))
    assert example.num_masked == noise
    assert sum(t in SENTINELS for t in example.input_ids) == spans
    assert len(example.input_ids) == len(tokens) - noise + spans + 1


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(10, 800), min_size=1, max_size=300), seed=st.integers(0, 2**32 - 1),
       ratio=st.floats(0.05, 0.6), lam=st.floats(0.5, 6.0))
def test_bart_target_is_the_input_text(tokens, seed, ratio, lam):
    example = text_infilling(tokens, np.random.default_rng(seed), mask_id=MASK, bos_id=BOS, eos_id=EOS,
                             mask_ratio=ratio, poisson_lambda=lam)
    assert example.labels[1:-1] == tokens
    assert example.num_masked == round(len(tokens) * ratio)
    kept = [t for t in example.input_ids[1:-1] if t != MASK]
    assert kept == [t for t, m in zip(tokens, example.masked[1:-1]) if not m]


def test_realised_noise_density_and_span_lengths_over_many_draws():
    rng = np.random.default_rng(0)
    texts = [list(range(10, 10 + int(n))) for n in rng.integers(40, 200, size=400)]
    t5 = [span_corruption(t, rng, sentinel_ids=SENTINELS, eos_id=EOS) for t in texts]
    density = sum(e.num_masked for e in t5) / sum(map(len, texts))
    spans = sum(sum(x in SENTINELS for x in e.input_ids) for e in t5)
    assert density == pytest.approx(0.15, abs=0.005)
    assert sum(e.num_masked for e in t5) / spans == pytest.approx(3.0, abs=0.15)

    bart = [text_infilling(t, rng, mask_id=MASK, bos_id=BOS, eos_id=EOS) for t in texts]
    ratio = sum(e.num_masked for e in bart) / sum(map(len, texts))
    assert ratio == pytest.approx(0.3, abs=0.005)
    masks = sum(e.input_ids.count(MASK) for e in bart)
    # Poisson(3) spans, the last one of each text cut to fit: the mean is a little under 3
    assert 2.4 < sum(e.num_masked for e in bart) / masks < 3.1


def test_zero_length_spans_insert_a_mask():
    rng = np.random.default_rng(0)
    inserted = 0
    for _ in range(300):
        e = text_infilling(list(range(10, 60)), rng, mask_id=MASK, bos_id=BOS, eos_id=EOS)
        inserted += e.input_ids.count(MASK) - _runs(e.masked)
    assert inserted > 0  # P(span = 0) = e^-3: about 5% of spans


def _runs(flags):
    return sum(1 for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1]))


def test_span_corruption_refuses_a_one_token_text():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        span_corruption([5], np.random.default_rng(0), sentinel_ids=SENTINELS, eos_id=EOS)


def test_sentence_permutation_keeps_every_sentence():
    text = "I came. I saw! Did I conquer? Yes."
    shuffled = [permute_sentences(text, np.random.default_rng(seed)) for seed in range(20)]
    assert all(sorted(s.split(" ")) == sorted(text.split(" ")) for s in shuffled)
    assert len(set(shuffled)) > 5
    assert permute_sentences("no end mark", np.random.default_rng(0)) == "no end mark"
