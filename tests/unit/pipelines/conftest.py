"""A Learner over a config dict's stream, as the driver would build it (tokenizer, per-task slots)."""

import pytest

from pipelines.config import validate_config
from pipelines.learner import Learner
from pipelines.models import load_tokenizer, stream_tokenizer
from pipelines.paradigms import task_slots
from pipelines.tasks import load_stream


@pytest.fixture
def make_learner(tmp_path):
    """config dict -> (Learner, stream, config), the tokenizer trained and saved under tmp_path."""

    def make(config_dict):
        config = validate_config(config_dict)
        stream = load_stream(config)
        tokenizer_dir = tmp_path / "tokenizer"
        stream_tokenizer(config.model, stream).save_pretrained(tokenizer_dir)
        slots = task_slots(config, stream, load_tokenizer(tokenizer_dir))
        return Learner(config, tokenizer_dir, slots=slots), stream, config

    return make
