"""The registry: one file per strategy, found by name; the config's union and settings come from it;
no module outside pipelines/strategies names a strategy."""

import ast
import io
import tokenize
from pathlib import Path

import pytest

from pipelines.config import STRATEGY_CONFIGS, validate_config
from pipelines.errors import ConfigError
from pipelines.strategies import STRATEGIES, StrategyDef

REPO = Path(__file__).resolve().parents[4]


def test_every_file_in_the_package_is_a_strategy_named_as_its_file():
    files = sorted(p.stem for p in (REPO / "pipelines/strategies").glob("*.py") if p.stem not in ("__init__", "base"))
    assert files == sorted(STRATEGIES) == sorted(STRATEGY_CONFIGS)
    for name, definition in STRATEGIES.items():
        assert isinstance(definition, StrategyDef) and definition.name == name
        assert definition.config.__module__ == f"pipelines.strategies.{name}"


def test_no_module_outside_the_strategies_names_a_strategy():
    """A string that is a strategy's name (or a list of them) in library code outside
    pipelines/strategies is a decision made in another room: the strategy's file should hold it."""
    # "replay" also names the replay store's directory, config block and command: not the strategy
    store = ('"replay": replay', '"state", "replay"', 'self.path / "replay"', 'data["replay"]', 'add_parser("replay"')
    found = []
    for package in ("pipelines", "actors", "storage"):
        for path in sorted((REPO / package).rglob("*.py")):
            if "strategies" in path.relative_to(REPO).parts:
                continue
            for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
                if token.type != tokenize.STRING:
                    continue
                try:
                    value = ast.literal_eval(token.string)
                except (ValueError, SyntaxError):
                    continue
                words = value.replace("+", ",").split(",") if isinstance(value, str) and value else []
                if words and all(w in STRATEGIES for w in words) and not any(s in token.line for s in store):
                    found.append(f"{path.relative_to(REPO)}:{token.start[0]}: {token.line.strip()}")
    assert found == []


def test_bad_strategy_settings_are_all_reported_before_training(toy_stream_config):
    toy_stream_config["strategies"] = {"replay": {"replay_ratio": 1.0}, "lwf": {"temperature": 0, "alpha": 1.5},
                                       "ewc": {"lambda": -1}}
    with pytest.raises(ConfigError) as info:
        validate_config(toy_stream_config)
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4
    for path in ("strategies.replay.replay_ratio", "strategies.lwf.temperature", "strategies.lwf.alpha",
                 "strategies.ewc.lambda"):
        assert path in problems
    toy_stream_config.pop("strategies")
    toy_stream_config["strategy"] = {"name": "replay", "replay_ratio": 0}
    with pytest.raises(ConfigError, match="strategy.replay_ratio: Input should be greater than 0"):
        validate_config(toy_stream_config)
    toy_stream_config["strategy"] = ["ewc", {"name": "lwf", "alpha": 2}]
    with pytest.raises(ConfigError, match=r"strategy\.1\.alpha: Input should be less than or equal to 1"):
        validate_config(toy_stream_config)


def test_an_unknown_strategy_is_named_with_the_choices(toy_stream_config):
    for strategy in ({"name": "replya"}, "replya", ["replay", "replya"]):
        with pytest.raises(ConfigError, match=r"unknown strategy 'replya'; choose one of \['agem', "):
            validate_config({**toy_stream_config, "strategy": strategy})


@pytest.mark.parametrize("strategy", [["ewc"], "ewc", ["replay", "ewc"], ["lwf", "agem"]],
                         ids=["list", "name", "replay+ewc", "lwf+agem"])
def test_strategies_that_read_every_parameter_refuse_zero3(toy_stream_config, strategy):
    toy_stream_config["strategy"] = strategy
    toy_stream_config["training"]["zero_stage"] = 3
    with pytest.raises(ConfigError, match=r"(ewc|agem) needs full parameters on every worker"):
        validate_config(toy_stream_config)


def test_with_strategy_takes_the_settings_from_strategies(toy_stream_config):
    toy_stream_config["strategies"] = {"replay": {"replay_ratio": 0.25}, "ewc": {"lambda": 7}}
    config = validate_config(toy_stream_config)
    replay = STRATEGY_CONFIGS["replay"](replay_ratio=0.25)
    assert config.with_strategy("replay", seed=3).strategy == replay
    assert config.with_strategy("replay", seed=3).seed == 3
    assert config.with_strategy("ewc").strategy.ewc_lambda == 7
    both = config.with_strategy("replay+ewc")
    assert both.strategy_name == "replay+ewc" and both.strategy_parts[0] == replay
    assert both.strategy_parts[1].ewc_lambda == 7
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        config.with_strategy("nope")


def test_a_strategy_named_takes_its_settings_from_strategies(toy_stream_config):
    config = validate_config({**toy_stream_config, "strategy": "replay", "strategies": {"replay": {"replay_ratio": 0.5}}})
    assert config.strategy == STRATEGY_CONFIGS["replay"](replay_ratio=0.5)
    single = validate_config({**toy_stream_config, "strategy": ["lwf"]})
    assert single.strategy == STRATEGY_CONFIGS["lwf"]() and single.strategy_name == "lwf"


def test_a_strategys_settings_have_one_home(toy_stream_config):
    """What a run trains with is what ``strategies`` holds: a block under ``strategy`` writes its
    settings there, and a block that contradicts ``strategies`` is refused, naming both keys."""
    config = validate_config({**toy_stream_config, "strategy": {"name": "lwf", "alpha": 0.8},
                              "strategies": {"lwf": {"temperature": 3.0}}})
    assert config.strategy == config.strategies.lwf == STRATEGY_CONFIGS["lwf"](alpha=0.8, temperature=3.0)
    assert config.with_strategy("lwf").strategy == config.strategy  # compare runs what run runs
    with pytest.raises(ConfigError, match=r"strategy lwf: alpha=0\.8 here and strategies\.lwf\.alpha=0\.3 disagree"):
        validate_config({**toy_stream_config, "strategy": {"name": "lwf", "alpha": 0.8},
                         "strategies": {"lwf": {"alpha": 0.3}}})
