"""Facts about the library's imports anyone can check: no cycle, no private name taken from
another module (what import-linter's layers do not see)."""

import ast
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "pipelines", "actors")


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_no_module_of_the_library_imports_itself_through_others():
    """Imports inside functions count (a lazy import that hides a cycle is still one); imports made
    only for type checking do not (they never run)."""
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    modules = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(modules) == []


def test_no_private_name_is_imported_from_another_module():
    found = []
    for package in (*PACKAGES, "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                    found += [f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {alias.name}"
                              for alias in node.names if alias.name.startswith("_")]
    assert found == []


def printed_by(script: str) -> str:
    """What ``script`` prints, run in a fresh interpreter (nothing imported yet)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def loaded_by(imports: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after ``import {imports}``."""
    script = f"import sys\nimport {imports}\nprint(sorted(m for m in {watched!r} if m in sys.modules))"
    return ast.literal_eval(printed_by(script).strip())


def test_a_refusal_and_the_ray_train_controller_import_no_model_library():
    # `forgetless run` checks the tracking store, precision and output directory before importing
    # what trains (actors.launch), and Ray Train's controller imports the module of the function it
    # runs on the workers (actors.trainer_group): neither pays for transformers or DeepSpeed.
    assert loaded_by("actors.launch, actors.trainer_group", ("transformers", "deepspeed", "pipelines.learner")) == []


def test_the_scheduler_and_the_run_queue_start_without_torch():
    # Each Ray actor's process imports the module its class is in: the scheduler (MLflow, metrics,
    # plots) and a worker group's queue of runs never touch a tensor, and torch costs seconds of CPU
    # in every run's start-up. The driver's checks (data, tokenizer, paradigm) are in the same case.
    assert loaded_by("actors.scheduler, actors.run_queue, pipelines.paradigms, pipelines.models",
                     ("torch", "transformers.models.t5", "deepspeed")) == []


def test_a_process_holding_the_scheduler_s_handle_loads_neither_mlflow_nor_matplotlib():
    # Ray imports an actor's module wherever its handle is unpickled: in each trainer worker and in
    # the run queue. Only the scheduler itself writes to MLflow and draws.
    assert loaded_by("actors.scheduler", ("mlflow", "matplotlib", "scipy")) == []


def test_the_driver_of_a_run_does_without_mlflow():
    # `forgetless run` checks the store by itself (a /health call, a writable directory) and only
    # its scheduler writes to it, so the driver skips MLflow's ~1 s of imports.
    assert loaded_by("actors.cli, actors.launch, actors.preflight, actors.trainer_group", ("mlflow",)) == []


def test_deepspeed_comes_without_mlflow_and_mlflow_still_imports_after():
    # DeepSpeed's autotuner imports mlflow when installed; a trainer worker never calls it.
    script = ("import sys\nfrom pipelines.distributed import deepspeed_module\n"
              "deepspeed = deepspeed_module()\nprint('mlflow' in sys.modules, deepspeed.initialize is not None)\n"
              "import mlflow\nprint(mlflow.MlflowClient is not None)")
    assert printed_by(script).split()[-3:] == ["False", "True", "True"]  # (after DeepSpeed's accelerator line)
