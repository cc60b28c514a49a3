"""One error root: every error class the project defines derives from ``ForgetlessError``, which the
CLI prints as one line with exit status 2."""

import importlib
import inspect
import pkgutil

import pytest

import actors
import pipelines
import storage
from actors.cli import main
from storage.errors import ForgetlessError


def _error_classes():
    for package in (storage, pipelines, actors):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and issubclass(cls, BaseException):
                    yield cls


def test_every_project_error_shares_the_root_and_a_builtin():
    classes = list(_error_classes())
    assert len(classes) >= 15
    strays = [f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, ForgetlessError)]
    assert strays == []
    only_root = [c.__name__ for c in classes if c is not ForgetlessError and not any(
        issubclass(c, b) and b is not Exception for b in (ValueError, OSError, LookupError, RuntimeError, TypeError,
                                                          ArithmeticError, ConnectionError))]
    assert only_root == ["StorageError"]  # the storage package's own root; its errors add a builtin


def test_a_storage_error_reaches_the_user_as_one_line(tmp_path, toy_stream_config, capsys):
    """A task file with a line that is not JSON: the storage layer's error, printed by the CLI."""
    import yaml

    bad = tmp_path / "data" / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": \n')
    toy_stream_config["stream"]["tasks"][0]["source"]["path"] = str(bad)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(toy_stream_config))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.jsonl" in err[0] and ":2" in err[0]


@pytest.mark.parametrize("module", ["storage.errors", "pipelines.errors"])
def test_the_root_is_one_class(module):
    assert importlib.import_module(module).ForgetlessError is ForgetlessError
