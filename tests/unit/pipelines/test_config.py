import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines.config import check_precision, flatten, load_config, load_pretrain_config, resolve_paths, validate_config
from pipelines.deepspeed_config import build_deepspeed_config, resolve_precision
from pipelines.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
EXPERIMENT_FILES = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name not in ("deepspeed", "pretrain"))
PRETRAIN_FILES = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
DEEPSPEED_FILES = sorted((REPO / "configs" / "deepspeed").glob("*.yaml"))


def test_there_are_experiment_files():
    assert {"demo.yaml", "naive.yaml"} <= {p.name for p in EXPERIMENT_FILES}


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=[str(p.relative_to(REPO)) for p in EXPERIMENT_FILES])
def test_every_config_file_validates(path):
    config = load_config(path)
    assert config.stream.tasks


@pytest.mark.parametrize("path", PRETRAIN_FILES, ids=[p.name for p in PRETRAIN_FILES])
def test_every_pretrain_config_validates(path):
    config = load_pretrain_config(path)
    assert config.model.arch in ("t5", "bart") and config.training.max_steps


@pytest.mark.parametrize("path", DEEPSPEED_FILES, ids=[p.name for p in DEEPSPEED_FILES])
def test_every_deepspeed_file_merges_with_the_run_config(path, toy_stream_config):
    stage = int(path.stem.split("_")[0].removeprefix("zero"))
    training = _training(toy_stream_config, deepspeed_config=str(path), zero_stage=stage)
    ds = build_deepspeed_config(training, world_size=2, precision="bf16", on_cuda=True)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["bf16"]["enabled"] is True


def test_every_problem_reported_at_once_with_dotted_paths_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "stream:\n  tasks:\n    - name: a\n      source: {kind: builtin, name: sms_spam}\n"
        "training:\n  lr: -1\n  zero_stag: 2\nmodel:\n  arch: gpt\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "3 problems" in message
    assert "training.lr: Input should be greater than 0" in message
    assert "training.zero_stag: Extra inputs are not permitted" in message
    assert "model.arch:" in message


def test_unknown_strategy_lists_the_choices(toy_stream_config):
    toy_stream_config["strategy"] = {"name": "replya"}
    with pytest.raises(ConfigError, match=r"unknown strategy 'replya'; choose one of \['agem', 'cumulative', 'derpp', 'ewc', 'joint', 'lwf', 'naive', 'replay'\]"):
        validate_config(toy_stream_config)


def test_task_source_kind_is_checked(toy_stream_config):
    toy_stream_config["stream"]["tasks"][0]["source"] = {"kind": "ftp", "path": "x"}
    with pytest.raises(ConfigError, match=r"stream\.tasks\.0\.source"):
        validate_config(toy_stream_config)


def test_duplicate_task_names_are_rejected(toy_stream_config):
    tasks = toy_stream_config["stream"]["tasks"]
    tasks[1]["name"] = tasks[0]["name"]
    with pytest.raises(ConfigError, match="repeated: \\['category'\\]"):
        validate_config(toy_stream_config)


def test_overrides_parse_yaml_values_and_reach_list_items():
    config = load_config(
        REPO / "configs/tiny/naive.yaml",
        ["training.lr=1e-4", "stream.tasks.1.max_train_examples=7", "mlflow.run_name=x", "training.max_steps=null"],
    )
    assert config.training.lr == pytest.approx(1e-4)
    assert config.stream.tasks[1].max_train_examples == 7
    assert config.training.max_steps is None
    assert config.mlflow.run_name == "x"


def test_override_of_an_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="training.lrr: Extra inputs are not permitted"):
        load_config(REPO / "configs/tiny/naive.yaml", ["training.lrr=1"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(REPO / "configs/tiny/naive.yaml", ["training.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(REPO / "configs/nope.yaml")


def test_config_is_frozen(toy_stream_config):
    config = validate_config(toy_stream_config)
    with pytest.raises(Exception):
        config.training.lr = 1.0  # type: ignore[misc]


def test_resolve_paths_makes_paths_absolute_and_fills_the_tracking_uri(tmp_path):
    config = load_config(REPO / "configs/tiny/naive.yaml", ["mlflow.tracking_uri=null"])
    resolved = resolve_paths(config, cwd=tmp_path)
    assert resolved.output_dir == str(tmp_path / "runs/tiny-naive")
    assert resolved.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_flatten_gives_dotted_params(toy_stream_config):
    flat = flatten(validate_config(toy_stream_config))
    assert flat["training.lr"] == pytest.approx(3e-3)
    assert flat["stream.tasks.0.name"] == "category"


def test_precision_rules():
    cfg = validate_config({"stream": {"tasks": [{"name": "a", "source": {"kind": "builtin", "name": "x"}}]}})
    assert resolve_precision(cfg.training, on_cuda=False) == "fp32"
    assert resolve_precision(cfg.training, on_cuda=True) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_precision(cfg.training.model_copy(update={"precision": "fp16"}), on_cuda=False)
    with pytest.raises(ConfigError, match="fp16 is refused for T5.*overflow"):
        check_precision("t5", "fp16")
    check_precision("bart", "fp16")


def _training(toy_stream_config, **overrides):
    toy_stream_config["training"].update(overrides)
    return validate_config(toy_stream_config).training


def test_deepspeed_config_from_run_config(toy_stream_config):
    training = _training(toy_stream_config, zero_stage=2, grad_accum_steps=2)
    ds = build_deepspeed_config(training, world_size=2, precision="fp32", on_cuda=False)
    assert ds["train_batch_size"] == 8 * 2 * 2
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["overlap_comm"] is False  # CPU tuning
    assert ds["bf16"] == {"enabled": False}


def test_deepspeed_file_auto_keys_are_filled(tmp_path, toy_stream_config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": "auto",
                                "reduce_scatter": True}, "gradient_clipping": "auto"}))
    training = _training(toy_stream_config, deepspeed_config=str(path))
    ds = build_deepspeed_config(training, world_size=1, precision="fp32", on_cuda=False)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["zero_optimization"]["reduce_scatter"] is True


def test_deepspeed_file_conflicts_are_listed_together(tmp_path, toy_stream_config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 3},
                                "optimizer": {"type": "Adam"}}))
    training = _training(toy_stream_config, deepspeed_config=str(path))
    with pytest.raises(ConfigError) as info:
        build_deepspeed_config(training, world_size=1, precision="fp32", on_cuda=False)
    problems = info.value.problems
    assert len(problems) == 3
    assert any(p.startswith("train_micro_batch_size_per_gpu: file has 32") for p in problems)
    assert any(p.startswith("zero_optimization.stage: file has 3") for p in problems)
    assert any(p.startswith("optimizer:") for p in problems)


def test_deepspeed_file_bad_json_names_line(tmp_path, toy_stream_config):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "a": 1,\n  oops\n}')
    training = _training(toy_stream_config, deepspeed_config=str(path))
    with pytest.raises(ConfigError, match="line 3"):
        build_deepspeed_config(training, world_size=1, precision="fp32", on_cuda=False)


@pytest.mark.parametrize(
    ("stage", "world_size", "switch", "expected"),
    [(2, 1, True, 0), (1, 1, True, 0), (2, 1, False, 2), (2, 2, True, 2), (3, 1, True, 3)],
    ids=["zero2-one-worker", "zero1-one-worker", "switched-off", "two-workers", "zero3-kept"],
)
def test_zero_1_2_with_one_worker_run_as_stage_0(toy_stream_config, stage, world_size, switch, expected):
    training = _training(toy_stream_config, zero_stage=stage, single_worker_zero_as_stage0=switch)
    ds = build_deepspeed_config(training, world_size=world_size, precision="fp32", on_cuda=False)
    assert ds["zero_optimization"]["stage"] == expected


def test_offloading_stage_is_kept_with_one_worker(tmp_path, toy_stream_config):
    path = tmp_path / "ds.yaml"
    path.write_text("zero_optimization: {stage: auto, offload_optimizer: {device: cpu}}\n")
    training = _training(toy_stream_config, zero_stage=2, deepspeed_config=str(path))
    ds = build_deepspeed_config(training, world_size=1, precision="fp32", on_cuda=False)
    assert ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"experiment: caf\xe9\n", r"bad\.yaml:1: not UTF-8 \(byte 0xe9\)"),
     (b"experiment: a\nstream:\n  tasks: [\n", r"(?s)bad\.yaml is not valid YAML: .*line \d"),
     (b"- a\n- b\n", r"must hold a mapping at the top level, not a list"),
     (b"\x00\x01", r"bad\.yaml is not valid YAML")],
    ids=["latin1", "unclosed", "list", "nul-bytes"],
)
def test_a_config_file_that_is_not_yaml_text_names_the_file(tmp_path, data, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_tiny_comparison_s_naive_run_is_the_tiny_naive_config():
    """tests/integration checks configs/tiny/naive.yaml's stream end to end through the naive run of
    `forgetless compare configs/tiny/compare.yaml`: the two must train the same thing."""
    naive = load_config(REPO / "configs/tiny/naive.yaml").model_dump()
    compared = load_config(REPO / "configs/tiny/compare.yaml").with_strategy("naive").model_dump()
    differ = sorted(key for key in naive if naive[key] != compared[key])
    assert differ == ["experiment", "output_dir", "replay", "strategies"]
    assert not compared["replay"]["enabled"]  # naive keeps no store: its settings go unused


@pytest.mark.parametrize("where, value", [
    ("output_dir", "/tmp/${oc.env:HOME}"), ("mlflow.run_name", "${oc.env:SECRET,x}"),
    ("experiment", "${oc.decode:'1'}"), ("output_dir", "runs/${training.${x}}"), ("output_dir", "${env:HOME}")])
def test_a_resolver_in_any_value_is_refused_by_key_and_the_environment_never_read(where, value, tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET", "s3cr3t")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"experiment": "x", "stream": {"tasks": [
        {"name": "a", "source": {"kind": "file", "path": "a.jsonl"}}]}}))
    with pytest.raises(ConfigError, match=rf"cfg\.yaml: {re.escape(where)} = .*resolvers such as .* are off") as exc:
        load_config(path, [f"{where}={value}"])
    assert "s3cr3t" not in str(exc.value) and str(Path.home()) not in str(exc.value).replace("oc.env:HOME", "")


def test_references_to_other_keys_still_interpolate(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"experiment": "exp", "output_dir": "runs/${experiment}-${stream.tasks[0].name}",
                                    "stream": {"tasks": [{"name": "a", "source": {"kind": "file", "path": "a.jsonl"}}]}}))
    assert load_config(path).output_dir == "runs/exp-a"
