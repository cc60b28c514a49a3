"""Per-example scores of generated text against a reference, in [0, 1].

Both texts are normalized first, as ``evaluation.normalize`` lists: ``case`` (case-folded),
``whitespace`` (runs of whitespace collapsed, ends stripped) — the default, both — and ``accents``
(letters stripped of their combining marks after Unicode NFKD: 'mangeâmes' scores as 'mangeames').
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable

_SPACES = re.compile(r"\s+")
FORMS = ("case", "accents", "whitespace")
DEFAULT_FORMS = ("case", "whitespace")


def normalize(text: str, forms: Iterable[str] = DEFAULT_FORMS) -> str:
    """``text`` under the normalizations ``forms`` names (default: case-folded, whitespace collapsed
    and stripped: "  Spam\\n" and "spam" match)."""
    forms = set(forms)
    if "whitespace" in forms:
        text = _SPACES.sub(" ", text).strip()
    if "accents" in forms:
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    if "case" in forms:
        text = text.casefold()
    return text


def exact_match(prediction: str, reference: str, forms: Iterable[str] = DEFAULT_FORMS) -> float:
    return float(normalize(prediction, forms) == normalize(reference, forms))


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str, forms: Iterable[str] = DEFAULT_FORMS) -> float:
    """ROUGE-L F1 over whitespace tokens of the normalized strings (Lin 2004, beta = 1)."""
    pred, ref = normalize(prediction, forms).split(), normalize(reference, forms).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "rouge_l": rouge_l}


def scorer(metric: str, forms: Iterable[str] = DEFAULT_FORMS) -> Callable[[str, str], float]:
    """(prediction, reference) -> score under ``metric``, texts normalized as ``forms`` says."""
    return functools.partial(METRICS[metric], forms=tuple(forms))
