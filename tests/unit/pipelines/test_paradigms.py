"""The paradigms of Table 1 in the Learner, with a real DeepSpeed engine (one process, gloo, tiny T5):
what trains, what stays bit for bit, where prompts start, and the errors before any step."""

import dataclasses

import pytest
import pyarrow as pa
import torch
from transformers import AutoModelForSeq2SeqLM

from pipelines.config import validate_config
from pipelines.errors import ConfigError, DataError
from pipelines.learner import Learner, silence_library_noise
from pipelines.models import stream_tokenizer
from pipelines.paradigm_model import PARADIGM_STEM, ParadigmModel
from pipelines.state_files import load_tree
from pipelines.paradigms import (
    check_prompt_lengths,
    eval_sets,
    few_shot_sources,
    task_slots,
)
from pipelines.plan import build_plan
from pipelines.tasks import Task, load_stream

silence_library_noise()


def _paradigm(config_dict, name, **settings):
    config_dict["paradigm"] = {"name": name, **settings}
    return config_dict


def _frozen_and_own(learner):
    """(the body's weights, each slot's tensors), cloned whole (ZeRO-3 gathers its partitions)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(learner.model.parameters()), enabled=learner.zero_stage == 3):
        body = {k: v.detach().clone() for k, v in learner.body.named_parameters()}
        slots = [[p.detach().clone() for p in params] for params in learner.model.slot_parameters()]
    assert all(v.numel() for v in body.values())
    return body, slots


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["feature_extraction", "prompt_tuning"])
def test_only_the_tasks_own_parameters_require_grad_and_reach_the_optimizer(make_learner, name, toy_stream_config, tmp_path):
    learner, _, _ = make_learner(_paradigm(toy_stream_config, name))
    model = learner.model
    assert isinstance(model, ParadigmModel)
    own = {id(p) for params in model.slot_parameters() for p in params}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == own and own
    assert not any(p.requires_grad for p in learner.body.parameters())
    optimized = sum(p.numel() for g in learner.engine.optimizer.param_groups for p in g["params"])
    assert optimized == sum(p.numel() for params in model.slot_parameters() for p in params)
    assert len(learner.engine.optimizer.param_groups) == 2  # one group per task


def test_fine_tuning_trains_everything(make_learner, toy_stream_config, tmp_path):
    learner, _, _ = make_learner(toy_stream_config)
    assert not isinstance(learner.model, ParadigmModel)
    assert all(p.requires_grad for p in learner.model.parameters())


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
@pytest.mark.parametrize("name", ["feature_extraction", "prompt_tuning"])
def test_frozen_weights_and_finished_tasks_stay_bit_for_bit(make_learner, name, stage, toy_stream_config, tmp_path):
    toy_stream_config["training"].update(zero_stage=stage, max_steps=8, weight_decay=0.1,
                                         single_worker_zero_as_stage0=False)
    learner, stream, config = make_learner(_paradigm(toy_stream_config, name, prompt_length=4))
    body0, slots0 = _frozen_and_own(learner)
    learner.train_task(build_plan(config, stream, 0))
    body1, slots1 = _frozen_and_own(learner)
    assert all(torch.equal(body0[k], body1[k]) for k in body0)
    assert not _same(slots0[0], slots1[0])  # task 0's own parameters trained
    assert _same(slots0[1], slots1[1])  # task 1's waited
    learner.train_task(build_plan(config, stream, 1))
    body2, slots2 = _frozen_and_own(learner)
    assert all(torch.equal(body0[k], body2[k]) for k in body0)
    assert _same(slots1[0], slots2[0])  # task 0's untouched while task 1 trained (weight decay included)
    assert not _same(slots1[1], slots2[1])


@pytest.mark.parametrize("name", ["feature_extraction", "prompt_tuning"])
def test_a_frozen_model_paradigm_learns_its_task(make_learner, name, toy_stream_config, tmp_path):
    # A random-init body: its features still tell the first word apart (a head learns the category);
    # its decoder knows no words, so a prompt can only move the output distribution towards the labels
    # (Lester et al.'s learning rate, 0.3).
    toy_stream_config["training"].update(max_steps=40, lr=3e-2 if name == "feature_extraction" else 0.3,
                                         log_every_n_steps=1)
    learner, stream, config = make_learner(_paradigm(toy_stream_config, name, prompt_length=8))
    losses = []
    learner.train_task(build_plan(config, stream, 0), on_step=lambda step, total, loss, metrics: losses.append(loss))
    assert sum(losses[-5:]) / 5 < (0.8 if name == "feature_extraction" else 0.9) * sum(losses[:5]) / 5


def test_the_heads_take_their_own_learning_rate_and_the_waiting_ones_none(make_learner, toy_stream_config, tmp_path):
    toy_stream_config["training"].update(max_steps=2, lr=1e-3, lr_schedule="constant")
    learner, stream, config = make_learner(_paradigm(toy_stream_config, "feature_extraction", lr=0.05))
    learner.train_task(build_plan(config, stream, 1))
    assert [g["lr"] for g in learner.engine.optimizer.param_groups] == [0.0, 0.05]


def test_the_soft_prompt_starts_from_the_english_prompts_embeddings(make_learner, toy_stream_config, tmp_path):
    learner, stream, _ = make_learner(_paradigm(toy_stream_config, "prompt_tuning", prompt_length=7,
                                            prompt_init="red cat"))
    ids = learner.tokenizer("red cat", add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) < 7
    cycled = [ids[k % len(ids)] for k in range(7)]
    expected = learner.body.get_input_embeddings().weight[cycled]
    for prompt in learner.model.slot_parameters():
        assert torch.equal(prompt[0].detach(), expected.detach())


def test_the_default_prompt_is_the_tasks_name_in_words(make_learner, toy_stream_config, tmp_path):
    learner, _, _ = make_learner(_paradigm(toy_stream_config, "prompt_tuning", prompt_length=3))
    slots = learner.model.slots
    assert [s.name for s in slots] == ["category", "first_word"]
    assert slots[1].prompt_ids == tuple(learner.tokenizer("first word", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("stage", [0, 3], ids=["zero0", "zero3"])
@pytest.mark.parametrize("name", ["feature_extraction", "prompt_tuning"])
def test_evaluation_uses_each_tasks_own_head_or_prompt(make_learner, name, stage, toy_stream_config, tmp_path):
    toy_stream_config["training"].update(max_steps=30, lr=3e-2, zero_stage=stage, single_worker_zero_as_stage0=False)
    learner, stream, config = make_learner(_paradigm(toy_stream_config, name, prompt_length=4))
    sets = eval_sets(config, stream)
    learner.train_task(build_plan(config, stream, 0))
    after_first = learner.evaluate(sets)
    learner.train_task(build_plan(config, stream, 1))
    after_second = learner.evaluate(sets)
    assert after_second["category"] == after_first["category"]  # nothing of task 0's changed: no forgetting
    if name == "feature_extraction":  # answers are label strings of the task's own label set
        answers = learner.evaluation.generate(sets[0].sources[:8], task="category")
        assert set(answers) <= set(stream[0].targets("train"))


def test_a_checkpoint_keeps_the_body_as_it_was_and_the_heads_beside_it(make_learner, toy_stream_config, tmp_path):
    learner, stream, config = make_learner(_paradigm(toy_stream_config, "feature_extraction"))
    before = {k: v.clone() for k, v in learner.body.state_dict().items()}
    learner.train_task(build_plan(config, stream, 0))
    directory = learner.save(tmp_path / "ckpt")
    reopened = AutoModelForSeq2SeqLM.from_pretrained(directory)
    assert all(torch.equal(before[k], v) for k, v in reopened.state_dict().items() if k in before)
    extra = load_tree(directory, PARADIGM_STEM)
    assert extra["paradigm"]["name"] == "feature_extraction"
    assert [s["name"] for s in extra["slots"]] == ["category", "first_word"]
    assert torch.equal(extra["state"]["heads.heads.0.weight"], learner.model.heads.heads[0].weight.detach())


def test_a_resumed_learner_continues_with_the_trained_prompts(make_learner, toy_stream_config, tmp_path):
    toy_stream_config["training"].update(max_steps=5, lr=0.3)
    learner, stream, config = make_learner(_paradigm(toy_stream_config, "prompt_tuning", prompt_length=4))
    stats = learner.train_task(build_plan(config, stream, 0))
    assert stats["trainable_params"] == 4 * learner.body.config.d_model
    learner.save_state(tmp_path / "state")
    _, trained = _frozen_and_own(learner)
    fresh = Learner(config, tmp_path / "tokenizer", slots=learner.model.slots)
    _, untrained = _frozen_and_own(fresh)
    assert not _same(trained[0], untrained[0])
    fresh.load_state(tmp_path / "state")
    _, resumed = _frozen_and_own(fresh)
    assert all(_same(a, b) for a, b in zip(trained, resumed))


def test_prompt_engineering_takes_no_step(toy_stream_config, tmp_path):
    config = validate_config(_paradigm(toy_stream_config, "prompt_engineering", shots=2))
    stream = load_stream(config)
    plan = build_plan(config, stream, 0)
    assert plan.examples is None and plan.num_steps == 0


# ------------------------------------------------------------------------ k-shot prompts
def _task(train_sources, eval_sources, name="t"):
    return Task(name=name, prefix="t: ", metric="exact_match",
                train=pa.table({"source": train_sources, "target": [s.upper() for s in train_sources]}),
                eval=pa.table({"source": eval_sources, "target": [s.upper() for s in eval_sources]}))


def _paradigm_config(**settings):
    return validate_config({"stream": {"tasks": [{"name": "t", "source": {"kind": "builtin", "name": "sms_spam"}}]},
                            "paradigm": {"name": "prompt_engineering", **settings}}).paradigm


def test_k_shot_prompts_are_seeded_and_never_show_the_evaluated_example():
    pool = [f"w{k}" for k in range(12)]
    task = _task(pool, ["w3", "w7", "new"])  # two eval inputs repeat training inputs
    paradigm = _paradigm_config(shots=11)
    first = few_shot_sources(paradigm, task, seed=5, index=0)
    assert first == few_shot_sources(paradigm, task, seed=5, index=0)
    assert first != few_shot_sources(paradigm, task, seed=6, index=0)
    for prompt, query in zip(first, ["w3", "w7", "new"]):
        shots, asked = prompt.split(" | ")[:-1], prompt.split(" | ")[-1]
        assert asked == f"t: {query} =>"
        assert len(shots) == 11 and f"t: {query} => {query.upper()}" not in shots
        assert len(set(shots)) == 11


def test_zero_shot_is_the_input_as_it_is():
    task = _task(["a", "b"], ["c"])
    assert few_shot_sources(_paradigm_config(shots=0), task, seed=0, index=0) == ["t: c"]


def test_more_shots_than_training_examples_is_refused_by_name():
    with pytest.raises(DataError, match=r"paradigm.shots=5.*task 't' has 3 training"):
        few_shot_sources(_paradigm_config(shots=5), _task(["a", "b", "c"], ["d"]), seed=0, index=0)
    with pytest.raises(DataError, match=r"eval example 0 leaves 2 other"):  # the evaluated input is excluded
        few_shot_sources(_paradigm_config(shots=3), _task(["a", "b", "c"], ["a"]), seed=0, index=0)


def test_a_prompt_over_the_source_limit_is_refused_before_training(toy_stream_config, tmp_path):
    config = validate_config(_paradigm(toy_stream_config, "prompt_engineering", shots=4))
    stream = load_stream(config)
    tokenizer = stream_tokenizer(config.model, stream)
    with pytest.raises(DataError, match=r"task 'category': the 4-shot prompt of eval example \d+ is \d+ tokens, "
                                        r"over stream.max_source_tokens=16"):
        check_prompt_lengths(config, eval_sets(config, stream), tokenizer)
    roomy = config.model_copy(update={"stream": config.stream.model_copy(update={"max_source_tokens": 512})})
    check_prompt_lengths(roomy, eval_sets(roomy, stream), tokenizer)


def test_feature_extraction_on_a_generation_task_is_refused_by_name(toy_stream_config, tmp_path):
    config = validate_config(_paradigm(toy_stream_config, "feature_extraction", max_labels=5))
    stream = load_stream(config)
    with pytest.raises(DataError, match=r"task 'first_word' has 9 distinct targets .* generation task"):
        task_slots(config, stream, stream_tokenizer(config.model, stream))


@pytest.mark.parametrize("setting, message", [
    ({"strategy": {"name": "ewc"}}, "strategy ewc has nothing to protect"),
    ({"recovery": {"enabled": True}}, "recovery probe"),
    ({"replay": {"enabled": True}}, "does not replay"),
])
def test_frozen_paradigms_refuse_what_cannot_apply(setting, message, toy_stream_config):
    with pytest.raises(ConfigError, match=message):
        validate_config({**_paradigm(toy_stream_config, "prompt_tuning"), **setting})


def test_a_paradigm_block_written_as_a_bare_name_is_refused_by_key(toy_stream_config):
    toy_stream_config["paradigm"] = "prompt_tuning"
    with pytest.raises(ConfigError, match="paradigm"):
        validate_config(toy_stream_config)


def _bart(config_dict, max_source_tokens=None):
    """The config on a tiny BART (512 learned positions), its source limit set where given."""
    config_dict["model"] = {"arch": "bart", "preset": "tiny", "tokenizer": {"vocab_size": 300}}
    if max_source_tokens is not None:
        config_dict["stream"]["max_source_tokens"] = max_source_tokens
    return config_dict


def test_a_prompt_that_fills_the_encoders_positions_is_refused(make_learner, toy_stream_config, tmp_path):
    with pytest.raises(DataError, match=r"prompt_length=\d+ fills the encoder's \d+ positions"):
        make_learner(_paradigm(_bart(toy_stream_config), "prompt_tuning", prompt_length=100_000))


def test_prompt_tuning_on_learned_positions_cuts_sources_to_what_the_prompt_leaves(make_learner, toy_stream_config,
                                                                                 tmp_path):
    # BART's 512 positions: a 512-token source behind a 20-vector prompt would index position 531
    learner, stream, _ = make_learner(_paradigm(_bart(toy_stream_config, 512), "prompt_tuning", prompt_length=20))
    assert learner.source_tokens == 492
    long = " ".join(stream[0].sources("train")) * 20
    inputs, labels = learner.batching.encode([long], [stream[0].targets("train")[0]])
    assert len(inputs[0]) == 492
    assert torch.isfinite(learner.model(**learner.batching.collate(inputs, labels)).loss)
    assert len(learner.evaluation.generate([long], task="category")) == 1  # evaluation cuts the same way
    assert len(learner.batching.views([long], dataclasses.replace(build_plan(learner.config, stream, 1),
                                                          distill_prefixes=("x: ",)))[0][0]) == 492


def test_a_source_limit_beyond_the_encoders_positions_is_refused_under_any_paradigm(make_learner, toy_stream_config,
                                                                                   tmp_path):
    with pytest.raises(DataError, match=r"stream.max_source_tokens=600 is more than the 512 positions of the "
                                        r"encoder \(model.arch=bart\); set it to 512 or less"):
        make_learner(_bart(toy_stream_config, 600))


def test_relative_positions_leave_the_source_limit_as_set(make_learner, toy_stream_config, tmp_path):
    toy_stream_config["stream"]["max_source_tokens"] = 4096  # T5: no position table to run past
    learner, _, _ = make_learner(_paradigm(toy_stream_config, "prompt_tuning", prompt_length=20))
    assert learner.source_tokens == 4096
