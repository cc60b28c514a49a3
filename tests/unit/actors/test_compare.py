"""The comparison's aggregation and pictures, from hand-made run reports (no training)."""

import math

import numpy as np
import pytest

from actors.compare import aggregate, comparison_matrices, format_table, task_orders
from pipelines.errors import ConfigError
from pipelines.plots import plot_comparison
from pipelines.report import RunReport

TASKS = ["a", "b"]


def _report(seed, acc, metrics, status="FINISHED", tasks=TASKS):
    return RunReport(tasks=tasks, seed=seed, status=status, acc_matrix=acc, baseline=[0.0, 0.0], metrics=metrics,
                     mlflow={"tracking_uri": "sqlite:///x.db", "run_id": f"run-{seed}"}, strategy="naive",
                     strategy_config={}, experiment="e", output_dir="/x", finished_tasks=len(acc))


@pytest.fixture
def summary():
    naive = [_report(0, [[0.8, 0.0], [0.2, 0.9]], {"avg_acc": 0.55, "forgetting": 0.6, "bwt": -0.6, "fwt": 0.0}),
             _report(1, [[0.6, 0.0], [0.4, 0.7]], {"avg_acc": 0.55, "forgetting": 0.2, "bwt": -0.2, "fwt": 0.0}),
             _report(2, [[0.0, 0.0], [0.0, 0.0]], {}, status="FAILED")]
    joint = [_report(0, [[0.0, 0.0], [0.7, 0.8]], {"avg_acc": 0.75, "forgetting": -0.7, "bwt": 0.7, "fwt": 0.0})]
    return aggregate({"naive": naive, "joint": joint})


def test_aggregate_takes_mean_and_sample_std_over_finished_seeds(summary):
    naive = summary["naive"]
    assert naive["seeds"] == [0, 1]  # the failed seed is listed under runs, not averaged
    assert naive["forgetting"]["mean"] == pytest.approx(0.4)
    assert naive["forgetting"]["std"] == pytest.approx(math.sqrt(0.08))  # ddof=1 over 0.6 and 0.2
    assert naive["acc_matrix_mean"] == pytest.approx(np.array([[0.7, 0.0], [0.3, 0.8]]))
    assert [r["status"] for r in naive["runs"]] == ["FINISHED", "FINISHED", "FAILED"]


def test_joint_reports_only_avg_acc(summary):
    joint = summary["joint"]
    assert joint["avg_acc"]["mean"] == pytest.approx(0.75)
    assert all(joint[m]["mean"] is None for m in ("forgetting", "bwt", "fwt"))
    row = next(line for line in format_table(TASKS, summary, seeds=1).splitlines() if line.startswith("| joint"))
    assert row.count("n/a") == 5 and "0.750" in row  # forgetting, bwt, fwt, learning_acc, gap_to_joint


def test_joint_earlier_rows_are_blank_in_the_pictures_not_zero(summary, tmp_path):
    matrices = comparison_matrices(TASKS, summary)
    assert np.isnan(matrices["joint"].acc[0]).all()  # the untrained model, not forgetting
    assert matrices["joint"].acc[1] == pytest.approx([0.7, 0.8])
    assert not np.isnan(matrices["naive"].acc).any()
    paths = plot_comparison(matrices, tmp_path)
    assert [p.name for p in paths] == ["first_task_accuracy.png", "heatmaps.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_intervals_are_student_t_over_the_runs(summary):
    naive = summary["naive"]["forgetting"]
    # two runs: t(0.975, 1) = 12.706; half-width = t * std / sqrt(2)
    assert naive["ci95"] == pytest.approx(12.706 * math.sqrt(0.08) / math.sqrt(2))
    assert summary["joint"]["avg_acc"]["ci95"] is None  # one run: no interval


def test_a_run_continued_after_an_interruption_is_left_out_of_the_seconds_it_timed_in_part():
    from pipelines.report import Resumption

    whole = [_report(seed, [[0.8, 0.0], [0.2, 0.9]], {"avg_acc": 0.55}) for seed in (0, 1, 2)]
    whole[2].resumes = [Resumption(at=1.0, finished_tasks=1, previous_status="RUNNING")]
    timings = [{"wall_s": 100.0, "startup_s": 10.0}, {"wall_s": 120.0, "startup_s": 0.0},
               {"wall_s": 30.0, "startup_s": 0.0}]  # seed 2's second attempt only
    entry = aggregate({"naive": whole}, {"naive": timings})["naive"]
    assert [run["continued"] for run in entry["runs"]] == [False, False, True]
    assert [run["seconds"] for run in entry["runs"]] == [90.0, 120.0, 30.0]  # each run's own, kept
    assert entry["seconds"]["mean"] == pytest.approx(105.0) and entry["seconds"]["n"] == 2


def test_the_gap_to_joint_is_measured_against_joint_of_the_same_seed_and_order(summary):
    naive = summary["naive"]
    # seed 0: joint's final row [0.7, 0.8] - diagonal [0.8, 0.9] = -0.1; seed 1 has no joint run
    assert naive["gap_to_joint"]["mean"] == pytest.approx(-0.1) and naive["gap_to_joint"]["n"] == 1
    alone = aggregate({"naive": [_report(0, [[0.8, 0.0], [0.2, 0.9]], {"avg_acc": 0.55})]})
    assert alone["naive"]["gap_to_joint"]["mean"] is None


def test_the_mean_matrix_is_over_the_first_order_only_while_metrics_pool_every_order():
    runs = [_report(0, [[0.8, 0.0], [0.2, 0.9]], {"avg_acc": 0.55, "forgetting": 0.6}),
            _report(0, [[0.5, 0.1], [0.3, 0.7]], {"avg_acc": 0.5, "forgetting": 0.2}, tasks=["b", "a"])]
    entry = aggregate({"naive": runs})["naive"]
    assert entry["forgetting"]["mean"] == pytest.approx(0.4) and entry["forgetting"]["n"] == 2
    assert entry["acc_matrix_mean"] == pytest.approx(np.array([[0.8, 0.0], [0.2, 0.9]]))
    assert [r["order"] for r in entry["runs"]] == [["a", "b"], ["b", "a"]]


def test_per_metric_averages_are_aggregated_when_runs_report_them():
    runs = [_report(s, [[0.8, 0.0], [0.2, 0.9]], {"avg_acc": 0.55, "avg_acc/rouge_l": 0.9 - s / 10,
                                                   "avg_acc/exact_match": 0.2}) for s in (0, 1)]
    entry = aggregate({"naive": runs})["naive"]
    assert entry["avg_acc/rouge_l"]["mean"] == pytest.approx(0.85)
    assert "avg_acc/rouge_l" in format_table(TASKS, {"naive": entry}, seeds=2)


def test_each_task_s_forgetting_is_aggregated_but_not_tabled_as_a_scoring_metric():
    runs = [_report(s, [[0.8, 0.0], [0.2 + s / 10, 0.9]], {"avg_acc": 0.55, "forgetting": 0.6 - s / 10,
                                                           "forgetting/a": 0.6 - s / 10}) for s in (0, 1)]
    entry = aggregate({"naive": runs})["naive"]
    assert entry["forgetting/a"]["mean"] == pytest.approx(0.55) and entry["forgetting/a"]["n"] == 2
    assert "Per scoring metric" not in format_table(TASKS, {"naive": entry}, seeds=2)


def _config(orders=None, names=("a", "b", "c")):
    from pipelines.config import validate_config

    stream = {"tasks": [{"name": n, "source": {"kind": "file", "path": "/x"}} for n in names]}
    if orders is not None:
        stream["orders"] = orders
    return validate_config({"stream": stream})


def test_task_orders_start_with_the_configs_then_listed_then_seeded_and_never_repeat():
    orders = task_orders(_config(), 4)
    assert orders[0] == ["a", "b", "c"] and len({tuple(o) for o in orders}) == 4
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)
    assert task_orders(_config(), 4) == orders  # seeded: the same every time
    assert task_orders(_config([["c", "b", "a"]]), 2) == [["a", "b", "c"], ["c", "b", "a"]]


def test_bad_orders_are_refused_before_anything_runs():
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match="only 6 order"):
        task_orders(_config(), 7)
    with pytest.raises(ConfigError, match=r"orders\[0\] must list every task once"):
        _config([["a", "b"]])


def test_strategies_to_compare_may_be_combinations_and_are_checked_before_any_run():
    from actors.compare import _trains_only_at_end, parse_strategies

    assert parse_strategies("naive, replay,replay+lwf ,joint") == ["naive", "replay", "replay+lwf", "joint"]
    assert _trains_only_at_end("joint") and not _trains_only_at_end("replay+lwf")
    with pytest.raises(ConfigError, match=r"--strategies: unknown \['lwff'\]"):
        parse_strategies("naive,replay+lwff")
    with pytest.raises(ConfigError, match="replay and derpp do not combine"):
        parse_strategies("naive,replay+derpp")
    with pytest.raises(ConfigError, match="names a strategy twice"):
        parse_strategies("replay,replay")


def test_replay_based_strategies_are_compared_only_under_one_memory_and_one_rate():
    from pathlib import Path

    from actors.compare import check_protocol, protocol
    from pipelines.config import load_config

    config = load_config(Path(__file__).resolve().parents[3] / "configs/tiny/compare.yaml")
    check_protocol(config, ["naive", "replay", "derpp", "agem"])  # the shipped config sets both
    unset = load_config(Path(__file__).resolve().parents[3] / "configs/tiny/compare.yaml",
                        ["replay.memory_rows=null", "replay.rows_per_batch=null"])
    check_protocol(unset, ["naive", "lwf", "ewc"])  # nothing replays: nothing to share
    with pytest.raises(ConfigError, match=r"compare: replay, derpp replay rows.*set replay.memory_rows and "
                                          r"replay.rows_per_batch"):
        check_protocol(unset, ["naive", "replay", "derpp"])
    shared = protocol(config, ["naive", "derpp"], {"path": "t", "digest": "d", "source": "s"})
    assert (shared["replay_memory_rows"], shared["replay_rows_per_batch"], shared["loss_mean"]) == (384, 8, "per_example")
    assert list(shared["deviations"]) == ["naive", "derpp"] and shared["deviations"]["naive"] == {}
    assert "end-of-task logits" in shared["deviations"]["derpp"]["derpp"][0]


def test_each_run_is_paired_by_its_order_and_seed_also_behind_a_pretraining_task(tmp_path):
    from actors.compare import run_cells

    def report(seed, tasks):
        acc = [[0.5, 0.1, 0.0], [0.5, 0.2, 0.3], [0.5, 0.2, 0.3]]
        return RunReport(tasks=tasks, seed=seed, status="FINISHED", acc_matrix=acc, baseline=[0.5, 0.0, 0.0],
                         metrics={}, mlflow={"tracking_uri": "sqlite:///x.db", "run_id": "r"}, strategy="naive",
                         strategy_config={}, experiment="e", output_dir="/x", finished_tasks=3)

    orders = [["a", "b"], ["b", "a"]]
    runs = [report(0, ["pretraining", "a", "b"]), report(0, ["pretraining", "b", "a"]), report(1, ["pretraining", "a", "b"])]
    cells = run_cells({"naive": runs}, {"naive": [tmp_path / str(k) for k in range(3)]}, orders)
    assert sorted(cells["naive"]) == [(0, 0), (0, 1), (1, 0)]  # no two runs on one key


def test_the_pairs_table_marks_significant_gaps_and_says_what_one_run_cannot_cover():
    from actors.compare import format_pairs

    def result(p_holm, n=1, orders=1):
        return {"diff": 0.2, "ci95": [0.1, 0.3], "p": p_holm, "p_holm": p_holm, "significant": p_holm < 0.05,
                "n": n, "orders": orders}

    pairs = [{"a": "naive", "b": "replay", "metrics": {"avg_acc": result(0.002), "forgetting": result(0.4),
                                                         "bwt": None, "fwt": None, "learning_acc": None}}]
    text = "\n".join(format_pairs(pairs))
    assert "| naive - replay | +0.200 [+0.100, +0.300] p=0.002 * | +0.200 [+0.100, +0.300] p=0.400 | n/a" in text
    assert "One run per strategy: these intervals cover the eval examples only" in text
    pairs[0]["metrics"]["avg_acc"] = result(0.002, n=3, orders=1)
    assert "One task order" in "\n".join(format_pairs(pairs))
    pairs[0]["metrics"] = {m: result(0.01, n=9, orders=3) for m in ("avg_acc", "forgetting")}
    assert "cover" not in "\n".join(format_pairs(pairs))


class _Groups:
    """Stands in for a command's WorkerGroups: counts the calls that end them."""

    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


def test_work_before_a_sweep_that_fails_ends_the_groups_it_may_have_started(toy_stream_config):
    from actors.sweep import preparing
    from pipelines.config import validate_config

    config, groups = validate_config(toy_stream_config, origin="test"), _Groups()
    with preparing(config, groups) as workers:  # what a pretrained start is built in
        assert workers._groups is groups
    assert groups.closed == 0  # handed on to the sweep, which ends them
    with pytest.raises(ConfigError, match="bad prompt"), preparing(config, groups):
        raise ConfigError("bad prompt")
    assert groups.closed == 1  # no sweep begins to end them
    with pytest.raises(KeyboardInterrupt), preparing(config, groups):
        raise KeyboardInterrupt  # the process ends, and its workers with it
    assert groups.closed == 1


# ------------------------------------------------------------------ resume=true: what is continued, what is refused
def _interrupted(base, toy_stream_config, *, strategies=("naive", "lwf")):
    """A comparison in ``base`` as an interrupted `compare` leaves it: its state, its tokenizer, the
    first run finished and the second stopped after its first task."""
    from actors.compare import resumable, run_dir
    from pipelines.config import experiment_dict, resolve_paths, validate_config
    from pipelines.models import directory_digest
    from pipelines.sweep_state import RunTiming, SweepState, setup_record

    config = resolve_paths(validate_config({**toy_stream_config, "output_dir": str(base)}, origin="test"))
    orders = [["category", "first_word"]]
    setup = setup_record(experiment_dict(config), list(strategies), 1, orders, None)
    (base / "tokenizer").mkdir(parents=True)
    (base / "tokenizer" / "tokenizer.json").write_text("{}")
    planned = [run_dir(base, name, 0, 0, 1) for name in strategies]
    for where, status, finished in zip(planned, ("FINISHED", "RUNNING"), (2, 1)):
        where.mkdir(parents=True)
        report = _report(0, [[0.5, 0.1], [0.4, 0.6]][:finished], {}, status=status)
        (where / "report.json").write_text(report.model_copy(update={"finished_tasks": finished}).to_json())
    SweepState(setup=setup, tokenizer={"path": str(base / "tokenizer"), "digest": directory_digest(base / "tokenizer"),
                                       "source": "trained"}, parent_run_id="parent",
               runs={"naive/seed-0": RunTiming(wall_s=9.0, startup_s=5.0, train_eval_s=3.0, overhead_s=1.0)}).write(base)
    return config, setup, planned, resumable


def test_resume_continues_an_unchanged_comparison_and_refuses_a_changed_one_naming_each_change(tmp_path,
                                                                                               toy_stream_config):
    base = tmp_path / "cmp"
    config, setup, planned, resumable = _interrupted(base, toy_stream_config)
    with pytest.raises(ConfigError, match=r"already holds a comparison \(1 run\(s\) finished\)\. Continue it with "
                                          r"resume=true"):
        resumable(base, config, setup, planned)
    assert resumable(base, config.model_copy(update={"overwrite": True}), setup, planned) is None  # starts over
    resume = config.model_copy(update={"resume": True})
    state = resumable(base, resume, setup, planned)
    assert state.parent_run_id == "parent" and state.runs["naive/seed-0"].wall_s == 9.0
    moved = tmp_path / "moved"  # a moved comparison is the same comparison: output_dir is not part of its setup
    base.rename(moved)
    from pipelines.config import experiment_dict

    assert resumable(moved, resume.model_copy(update={"output_dir": str(moved)}),
                     {**setup, "config": {k: v for k, v in experiment_dict(resume).items() if k != "output_dir"}},
                     [moved / p.relative_to(base) for p in planned]) is not None
    changed = {**setup, "seeds": 3, "config": {**setup["config"], "training": {**setup["config"]["training"], "lr": 0.01}}}
    with pytest.raises(ConfigError, match=r"2 change\(s\): config\.training\.lr: 0\.003 -> 0\.01; seeds: 1 -> 3\. "):
        resumable(moved, resume, changed, planned)


@pytest.mark.parametrize("damage, message", [
    (lambda base: (base / "tokenizer" / "tokenizer.json").write_text('{"changed": 1}'), "shared tokenizer is changed"),
    (lambda base: __import__("shutil").rmtree(base / "tokenizer"), "shared tokenizer is gone"),
    (lambda base: (base / "compare-state.json").write_bytes(b""), "not a readable comparison state"),
    (lambda base: (base / "compare-state.json").write_bytes(b"\xff\xfe\x00{"), "not a readable comparison state"),
    (lambda base: (base / "compare-state.json").write_text('{"setup": {}, "tokenizer": {"path": "t", "digest": "d", '
                                                           '"source": "s"}, "parent_run_id": "p", '
                                                           '"runs": {"../../elsewhere": {"wall_s": 1, "startup_s": 0, '
                                                           '"train_eval_s": 1, "overhead_s": 0}}}'),
     "'../../elsewhere' is not a run directory inside the comparison"),
    (lambda base: (base / "compare-state.json").write_text('{"setup": {}, "tokenizer": {}, "parent_run_id": "p"}'),
     "tokenizer: Value error, tokenizer lacks digest, path, source"),
    (lambda base: (base / "naive" / "seed-0" / "report.json").write_text("{not json"), "not a readable run report"),
    (lambda base: ((base / "compare-state.json").unlink(), (base / "compare-state.json").symlink_to(base / "x.json")),
     "a symbolic link, which is never followed"),
])
def test_resume_refuses_a_comparison_it_cannot_continue_as_one_naming_the_file(tmp_path, toy_stream_config, damage,
                                                                              message):
    base = tmp_path / "cmp"
    config, setup, planned, resumable = _interrupted(base, toy_stream_config)
    damage(base)
    with pytest.raises(ConfigError, match=message) as refused:
        resumable(base, config.model_copy(update={"resume": True}), setup, planned)
    assert str(base) in str(refused.value)
    assert resumable(base, config.model_copy(update={"overwrite": True}), setup, planned) is None  # starts over


def test_runs_without_a_comparison_state_are_not_continued_as_one(tmp_path, toy_stream_config):
    base = tmp_path / "cmp"
    config, setup, planned, resumable = _interrupted(base, toy_stream_config)
    (base / "compare-state.json").unlink()  # an older version's comparison: which tokenizer its runs read is unknown
    for control in ({}, {"resume": True}):
        with pytest.raises(ConfigError, match="holds runs but no compare-state.json"):
            resumable(base, config.model_copy(update=control), setup, planned)
    for where in planned:
        __import__("shutil").rmtree(where)
    assert resumable(base, config.model_copy(update={"resume": True}), setup, planned) is None  # nothing to continue


def test_the_curve_after_each_task_is_each_metric_over_the_runs_at_that_task(tmp_path):
    from actors.compare import after_each_task
    from pipelines.plots import plot_curves

    tasks = ["a", "b", "c"]

    def run(seed, avg, forgetting):
        rows = [{"task_index": t, "task": tasks[t], "avg_acc": a, "forgetting": f} for t, (a, f) in
                enumerate(zip(avg, forgetting))]
        return _report(seed, [[0.0] * 3] * 3, {}, tasks=tasks).model_copy(update={"metrics_per_task": rows})

    runs = [run(0, [0.9, 0.6, 0.5], [None, 0.3, 0.35]), run(1, [0.8, 0.5, 0.4], [None, 0.2, 0.25])]
    curve = after_each_task(runs, only_at_end=False)
    # point t: after task t (t + 1 tasks seen), over both runs
    assert [p["mean"] for p in curve["avg_acc"]] == pytest.approx([0.85, 0.55, 0.45])
    assert [p["mean"] for p in curve["forgetting"]] == [None, pytest.approx(0.25), pytest.approx(0.30)]
    assert [p["n"] for p in curve["forgetting"]] == [0, 2, 2]
    assert curve["avg_acc"][0]["ci95"] == pytest.approx(12.706 * np.std([0.9, 0.8], ddof=1) / math.sqrt(2), rel=1e-3)
    joint = after_each_task(runs, only_at_end=True)  # trained once, at the end: its last avg_acc only
    assert [p["mean"] for p in joint["avg_acc"]] == [None, None, pytest.approx(0.45)]
    assert all(p["mean"] is None for p in joint["forgetting"])
    png = plot_curves({"naive": curve, "joint": joint}, tmp_path / "after_each_task.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
