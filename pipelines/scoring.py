"""Per-example scores of generated text against a reference, in [0, 1]."""

from __future__ import annotations

import re

_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case-folded, whitespace collapsed and stripped: "  Spam\\n" and "spam" match."""
    return _SPACES.sub(" ", text).strip().casefold()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens of the normalized strings (Lin 2004, beta = 1)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "rouge_l": rouge_l}
