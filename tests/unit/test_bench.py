"""What every bench shares: a Ray of its own, and ``--baseline REF`` (the same command on an older
ref's code, side by side, with the ratio of each figure)."""

import ast
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHES = sorted(p for p in (REPO / "bench").glob("*.py") if p.name not in ("common.py", "peer_runner.py", "replay_common.py"))


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every bench starts a Ray of its own, as `forgetless run` does: never one found through the address
# file a stopped `ray start --head` leaves behind (``ray.init()`` with no address follows it, and
# fails at once with "When connecting to an existing cluster, num_cpus and num_gpus must not be
# provided").


def ray_inits_without_an_address(source: str) -> list[int]:
    """Lines of ``ray.init(...)`` calls that name no address (``address="local"`` starts a new Ray;
    a cluster's own address joins that one)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"
                and not any(k.arg == "address" for k in node.keywords)):
            found.append(node.lineno)
    return found


def test_the_check_finds_a_bare_ray_init():
    assert ray_inits_without_an_address("import ray\nray.init(num_cpus=2)\n") == [2]
    assert ray_inits_without_an_address("ray.init(address='local', num_cpus=2)\nray.shutdown()\n") == []


def test_no_bench_joins_a_ray_it_did_not_start():
    found = [f"{path.relative_to(REPO)}:{line}" for path in sorted((REPO / "bench").glob("*.py"))
             for line in ray_inits_without_an_address(path.read_text())]
    assert found == [], "start a Ray of its own (actors.cluster.start_local_ray, or ray.init(address='local'))"


def test_every_bench_takes_a_baseline_ref():
    missing = [p.name for p in BENCHES if "add_baseline_options(parser)" not in p.read_text()]
    assert missing == []


def test_a_baseline_run_gets_the_bench_s_own_options_and_not_the_comparison_s(common):
    argv = ["--steps", "20", "--baseline", "v1", "--json", "out.json", "--rounds=5", "--plot", "p.png", "--fast"]
    assert common.forwarded_argv(argv) == ["--steps", "20", "--fast"]


def test_baseline_ratios_cover_every_figure_that_moves_and_only_those(common):
    runs = {"this": [{"steps": 40, "wall_s": 10.0, "by": {"4": {"p99_ms": 2.0}}, "trials": [1, 2], "ok": True},
                     {"steps": 40, "wall_s": 12.0, "by": {"4": {"p99_ms": 4.0}}, "trials": [3], "ok": True}],
            "v1": [{"steps": 40, "wall_s": 20.0, "by": {"4": {"p99_ms": 6.0}}, "extra": 1.0, "ok": True},
                   {"steps": 40, "wall_s": 24.0, "by": {"4": {"p99_ms": 6.0}}, "extra": 2.0, "ok": True}]}
    table = common.leaf_ratios(runs)
    # "steps" is the same everywhere, "extra" is one side's only, lists and flags are not figures
    assert sorted(table) == ["by.4.p99_ms", "wall_s"]
    assert table["wall_s"]["ratio"] == pytest.approx(11.0 / 22.0)
    assert table["by.4.p99_ms"] == {"this": {"median": 3.0, "trials": [2.0, 4.0]},
                                    "v1": {"median": 6.0, "trials": [6.0, 6.0]}, "ratio": 0.5}
    # named figures are compared as named, constant or not
    assert list(common.leaf_ratios(runs, ["steps", "wall_s"])) == ["steps", "wall_s"]
    assert common.leaf_ratios(runs, ["steps"])["steps"]["ratio"] == 1.0
