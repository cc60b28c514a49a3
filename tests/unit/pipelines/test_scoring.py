import pytest

from pipelines.scoring import exact_match, rouge_l


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [("spam", "spam", 1.0), ("  Spam\n", "spam", 1.0), ("spam", "ham", 0.0), ("", "ham", 0.0)],
    ids=["same", "case-and-space", "different", "empty"],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4
    p, r = 4 / 6, 4 / 6
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("AE1 D AH0", "AE1 D AH0") == 1.0
    assert rouge_l("x", "y z") == 0.0
    assert rouge_l("", "") == 1.0


def test_normalization_is_what_evaluation_normalize_lists():
    from pipelines.scoring import normalize, scorer

    assert normalize("  Mangeâmes\n") == "mangeâmes"  # the default: case and whitespace
    assert normalize("  Mangeâmes\n", ["case", "accents", "whitespace"]) == "mangeames"
    assert normalize(" Spam ", []) == " Spam "  # exact text
    assert scorer("exact_match", ["whitespace"])("spam", "Spam") == 0.0  # case now counts
    assert scorer("exact_match", ["case", "accents"])("Café", "cafe") == 1.0
    assert scorer("rouge_l", ["case", "accents", "whitespace"])("élan vital", "elan vital") == 1.0
