"""docs/experiments/paired_gap.py: runs kept beside a comparison, paired with its own by (order, seed), in
comparison.json's form; a worked example whose gaps are known, and the refusals."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gap = _load("paired_gap")
tables = _load("results_tables")

ORDERS = [["a", "b"], ["b", "a"]]


def _run(directory: Path, strategy: str, order: list[str], seed: int, first: float, last_row: list[float]) -> None:
    """A finished two-task run: acc[0] = [first, -], acc[1] = last_row (in the run's own order)."""
    directory.mkdir(parents=True)
    avg = sum(last_row) / 2
    report = {"tasks": order, "acc_matrix": [[first, None], last_row], "baseline": [0.1, 0.1],
              "metrics": {"avg_acc": avg, "forgetting": first - last_row[0], "bwt": last_row[0] - first,
                          "learning_acc": (first + last_row[1]) / 2},
              "strategy": strategy, "strategy_config": {}, "experiment": "x", "seed": seed, "status": "FINISHED",
              "finished_tasks": 2, "complete": True, "mlflow": {"tracking_uri": "file:///nowhere", "run_id": None},
              "output_dir": str(directory)}
    (directory / "report.json").write_text(json.dumps(report), encoding="utf-8")


def _comparison(directory: Path, orders: list[list[str]], tuned: dict[str, float]) -> None:
    """Each strategy's runs timed as a comparison times them: wall 100 + seed s, of which 10 s start-up."""
    directory.mkdir(parents=True, exist_ok=True)
    timed = {name: {"runs": [{"order": order, "seed": seed, "wall_s": 100.0 + seed, "startup_s": 10.0}
                             for order in orders for seed in (0, 1)]} for name in tuned}
    (directory / "comparison.json").write_text(json.dumps({
        "orders": orders, "protocol": {"tuned": {name: {"values": {"lr": lr}} for name, lr in tuned.items()}},
        "strategies": timed}))


@pytest.fixture
def results(tmp_path):
    """domain_incremental: naive and replay compared over 2 orders x 2 seeds; naive at replay's rate over the
    same; naive from random init in the first order. Every run of a side ends on the same last row, so each
    gap is known exactly: naive avg_acc 0.65, at replay's rate 0.725, replay 0.8; random init 0.5."""
    out = tmp_path / "results"
    _comparison(out / "domain_incremental-compare", ORDERS, {"naive": 1e-4, "replay": 2e-4})
    _comparison(out / "domain_incremental-rate", ORDERS, {"naive": 2e-4})
    _comparison(out / "domain_incremental-random", ORDERS[:1], {"naive": 1e-4})
    for k, order in enumerate(ORDERS):
        for seed in (0, 1):
            _run(out / "domain_incremental-compare" / "naive" / f"order-{k}" / f"seed-{seed}", "naive", order, seed,
                 0.8, [0.4, 0.9])
            _run(out / "domain_incremental-compare" / "replay" / f"order-{k}" / f"seed-{seed}", "replay", order,
                 seed, 0.8, [0.7, 0.9])
            _run(out / "domain_incremental-rate" / "naive" / f"order-{k}" / f"seed-{seed}", "naive", order, seed,
                 0.9, [0.5, 0.95])
            if k == 0:
                _run(out / "domain_incremental-random" / "naive" / f"seed-{seed}", "naive", order, seed, 0.6,
                     [0.3, 0.7])
    return out


def _pair(answer, a, b):
    return next(p["metrics"] for p in answer["pairs"] if (p["a"], p["b"]) == (a, b))


def test_rate_sets_naive_at_replays_rate_between_the_two_over_every_order_and_seed(results, tmp_path):
    assert gap.main(["rate", "domain_incremental", "--results", str(results), "--out", str(tmp_path)]) == 0
    answer = json.loads((tmp_path / "domain_incremental-rate.json").read_text())
    assert list(answer["strategies"]) == ["naive", "naive at replay's rate", "replay"]
    assert answer["orders"] == ORDERS and answer["seeds"] == 2
    assert [answer["strategies"][s]["avg_acc"]["mean"] for s in answer["strategies"]] == pytest.approx([0.65, 0.725, 0.8])
    assert answer["strategies"]["naive"]["avg_acc"]["n"] == 4  # 2 orders x 2 seeds
    assert len(answer["pairs"]) == 3
    assert _pair(answer, "naive", "replay")["avg_acc"]["diff"] == pytest.approx(-0.15)
    assert _pair(answer, "naive", "naive at replay's rate")["avg_acc"]["diff"] == pytest.approx(-0.075)
    assert _pair(answer, "naive at replay's rate", "replay")["forgetting"]["diff"] == pytest.approx(0.4 - 0.1)
    assert answer["protocol"]["tuned"] == {"naive": {"values": {"lr": 1e-4}},
                                           "naive at replay's rate": {"values": {"lr": 2e-4}},
                                           "replay": {"values": {"lr": 2e-4}}}
    # seconds as the comparison timed each run (wall - start-up), not the report's own: 90 and 91 s
    assert answer["strategies"]["naive at replay's rate"]["seconds"]["mean"] == pytest.approx(90.5)
    table = tables.headline(answer)  # results_tables.py renders it as it renders a comparison
    assert "| naive at replay's rate | 4 | lr 0.0002 | 0.725 ± 0.000 |" in table
    assert "| naive - replay | -0.150 [-0.150, -0.150]" in table


def test_start_pairs_the_warm_starts_first_order_with_random_init_kept_without_order_folders(results, tmp_path):
    gap.main(["start", "domain_incremental", "--results", str(results), "--out", str(tmp_path)])
    answer = json.loads((tmp_path / "domain_incremental-start.json").read_text())
    assert list(answer["strategies"]) == ["naive, warm start", "naive, random init"]
    assert answer["orders"] == ORDERS[:1] and answer["strategies"]["naive, warm start"]["avg_acc"]["n"] == 2
    assert _pair(answer, "naive, warm start", "naive, random init")["avg_acc"]["diff"] == pytest.approx(0.15)


def test_sides_that_did_not_finish_the_same_runs_are_refused_naming_them(results, tmp_path):
    (results / "domain_incremental-rate" / "naive" / "order-1" / "seed-1" / "report.json").unlink()
    with pytest.raises(SystemExit, match=r"the same \(order, seed\) runs.*naive at replay's rate"):
        gap.main(["rate", "domain_incremental", "--results", str(results), "--out", str(tmp_path)])
    assert not (tmp_path / "domain_incremental-rate.json").exists()


def test_a_run_kept_under_another_orders_folder_is_refused(results, tmp_path):
    moved = results / "domain_incremental-compare" / "replay" / "order-0" / "seed-0"
    report = json.loads((moved / "report.json").read_text())
    (moved / "report.json").write_text(json.dumps({**report, "tasks": ["b", "a"]}))
    with pytest.raises(SystemExit, match=r"replay/order-0/seed-0: its tasks \['b', 'a'\] are not in the order"):
        gap.main(["rate", "domain_incremental", "--results", str(results), "--out", str(tmp_path)])


def test_a_block_not_run_yet_is_named(results, tmp_path):
    (results / "domain_incremental-random" / "comparison.json").unlink()
    with pytest.raises(SystemExit, match=r"domain_incremental-random/comparison.json: not there"):
        gap.main(["start", "domain_incremental", "--results", str(results), "--out", str(tmp_path)])
