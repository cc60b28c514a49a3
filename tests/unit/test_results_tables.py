"""docs/results.md's headline tables are what docs/experiments/results_tables.py makes of the
committed comparison JSONs: a worked example of one table, and every table in the docs checked."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("results_tables", REPO / "docs" / "experiments" / "results_tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


def _stat(mean, ci95=None, n=2):
    return {"mean": mean, "std": None, "ci95": ci95, "n": n}


def _run(status="FINISHED"):
    return {"status": status, "seed": 0, "order": ["a", "b"]}


COMPARISON = {
    "tasks": ["a", "b"], "seeds": 2, "orders": [["a", "b"]],
    "protocol": {"tuned": {"naive": {"values": {"lr": 0.000312}}, "lwf": {"values": {"lr": 0.001, "lwf.alpha": 0.5}}}},
    "strategies": {
        "naive": {"avg_acc": _stat(0.5, 0.1), "forgetting": _stat(0.4, 0.05), "bwt": _stat(-0.4, 0.05),
                  "learning_acc": _stat(0.9, 0.01), "seconds": {"mean": 1234.4}, "runs": [_run(), _run()]},
        "lwf": {"avg_acc": _stat(0.75, None, 1), "forgetting": _stat(None), "bwt": _stat(-0.1, None, 1),
                "learning_acc": _stat(0.8, None, 1), "seconds": {"mean": None}, "runs": [_run(), _run("FAILED")]},
    },
    "pairs": [{"a": "naive", "b": "lwf", "metrics": {
        "avg_acc": {"diff": -0.25, "ci95": [-0.3, -0.2], "p": 0.001, "p_holm": 0.002, "significant": True, "n": 1,
                    "orders": 1},
        "forgetting": None, "bwt": None, "fwt": None, "learning_acc": None}}],
}


def test_a_table_is_each_strategys_tuned_values_intervals_and_seconds_then_its_holm_marked_pairs():
    lines = tables.headline(COMPARISON).splitlines()
    assert lines[0].startswith("a -> b (the config's order; 1 order(s) x 2 seed(s));")
    assert lines[2] == "| strategy | n | tuned values | avg_acc | forgetting | bwt | learning_acc | seconds |"
    # n counts the finished runs; forgetting and bwt signed; no interval where there is one run
    assert lines[4] == "| naive | 2 | lr 0.000312 | 0.500 ± 0.100 | +0.400 ± 0.050 | -0.400 ± 0.050 | 0.900 ± 0.010 | 1,234 |"
    assert lines[5] == "| lwf | 1 | lr 0.001, lwf.alpha 0.5 | 0.750 | n/a | -0.100 | 0.800 | n/a |"
    pair = next(line for line in lines if line.startswith("| naive - lwf |"))
    assert "-0.250 [-0.300, -0.200] p=0.002 *" in pair  # significant after Holm's correction: marked
    untuned = {**COMPARISON, "protocol": {"tuned": None}}
    assert "| naive | 2 | defaults |" in tables.headline(untuned)


def test_render_rewrites_only_what_lies_between_the_markers_and_names_each_stale_table(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(COMPARISON))
    fresh = tables.headline(COMPARISON)
    text = f"# Results\n\nbefore\n<!-- table: c.json -->\nstale\n<!-- /table -->\nafter\n"
    new, changed = tables.render(text, root=tmp_path)
    assert changed == ["c.json"]
    assert new == f"# Results\n\nbefore\n<!-- table: c.json -->\n{fresh}<!-- /table -->\nafter\n"
    assert tables.render(new, root=tmp_path) == (new, [])


BLOCKS = [m["path"] for m in tables.BLOCK.finditer(tables.RESULTS.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("path", BLOCKS)
def test_every_table_in_the_results_matches_its_json(path):
    text = tables.RESULTS.read_text(encoding="utf-8")
    _, changed = tables.render(text)
    assert path not in changed, f"docs/results.md's table of {path} is stale: run docs/experiments/results_tables.py"
