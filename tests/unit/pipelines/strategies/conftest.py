"""Helpers for the strategies' tests: a one-process learner on the toy stream, and its plans."""

import dataclasses

import pytest

from pipelines.config import validate_config
from pipelines.learner import Learner, silence_library_noise
from pipelines.models import stream_tokenizer
from pipelines.plan import build_plan
from pipelines.tasks import load_stream

silence_library_noise()


@pytest.fixture
def make_learner(toy_stream_config, tmp_path):
    """(learner, stream) for the toy stream under ``strategy`` (a block, a name or a list)."""

    def make(strategy, *, directory=None, **training):
        directory = directory or tmp_path
        config = validate_config({**toy_stream_config, "strategy": strategy,
                                  "training": {**toy_stream_config["training"], **training}})
        stream = load_stream(config)
        tokenizer_dir = directory / "tokenizer"
        stream_tokenizer(config.model, stream).save_pretrained(tokenizer_dir)
        return Learner(config, tokenizer_dir), stream

    return make


def plan_of(learner, stream, index, **kwargs):
    """The scheduler's plan of task ``index``, with no teacher unless given one."""
    return dataclasses.replace(build_plan(learner.config, stream, index), **{"teacher_dir": None, **kwargs})


@pytest.fixture
def make_plan():
    return plan_of
