"""The Learner with a real DeepSpeed engine, one process (gloo), tiny T5/BART."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import dataclasses

from pipelines.config import validate_config
from pipelines.distributed import deepspeed_module
from pipelines.errors import ConfigError, NonFiniteLossError
from pipelines.evaluation import label_log_likelihoods
from pipelines.learner import lr_at, silence_library_noise
from pipelines.paradigms import eval_sets
from pipelines.plan import EvalSet, build_plan, num_steps
from pipelines.table1 import run_config
from pipelines.tasks import load_stream

silence_library_noise()


def _plan(stream, config, index, **changes):
    return dataclasses.replace(build_plan(config, stream, index), **changes)


@pytest.mark.parametrize("stage", [0, 1, 2, 3], ids=["zero0", "zero1", "zero2", "zero3"])
def test_training_lowers_the_loss_at_every_zero_stage(make_learner, stage, toy_stream_config, tmp_path):
    toy_stream_config["training"].update(zero_stage=stage, max_steps=30, single_worker_zero_as_stage0=False,
                                         log_every_n_steps=1)
    learner, stream, config = make_learner(toy_stream_config)
    assert learner.engine.zero_optimization_stage() == stage
    losses = []
    learner.train_task(_plan(stream, config, 0), on_step=lambda step, total, loss, metrics: losses.append(loss))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_learns_a_task_then_forgets_it(make_learner, toy_stream_config, tmp_path):
    # Measured on the tasks' own training texts: what a model this small learns in 60 steps of 64
    # examples is those (held-out accuracy is near chance for either task, and varies with the split).
    toy_stream_config["training"].update(max_steps=60)
    learner, stream, config = make_learner(toy_stream_config)
    evals = [EvalSet(t.name, t.metric, t.sources("train"), t.targets("train")) for t in stream]
    learner.train_task(_plan(stream, config, 0))
    after_first = learner.evaluate(evals)
    learner.train_task(_plan(stream, config, 1))
    after_second = learner.evaluate(evals)
    examples = learner.example_scores  # each example's score, in the eval set's order: their mean is the accuracy
    assert {name: len(scores) for name, scores in examples.items()} == {e.name: len(e.sources) for e in evals}
    assert {name: sum(scores) / len(scores) for name, scores in examples.items()} == pytest.approx(after_second)
    assert after_first["category"] >= 0.5  # three labels, given by the first word
    assert after_second["category"] < after_first["category"] - 0.2
    assert after_second["first_word"] > after_first["first_word"] + 0.2


def test_non_finite_loss_names_task_and_step(make_learner, toy_stream_config, tmp_path):
    toy_stream_config["training"].update(lr=1e30, grad_clip=None, max_steps=20)
    learner, stream, config = make_learner(toy_stream_config)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* in task 'category' at step \d+") as info:
        learner.train_task(_plan(stream, config, 0))
    assert info.value.task == "category" and 0 < info.value.step < 20


@pytest.mark.parametrize(("arch", "stage"), [("t5", 3), ("bart", 2)], ids=["t5-zero3", "bart-zero2"])
def test_saved_checkpoint_reopens_with_plain_transformers(make_learner, arch, stage, toy_stream_config, tmp_path,
                                                          monkeypatch):
    toy_stream_config["model"] = {"arch": arch, "preset": "tiny", "tokenizer": {"vocab_size": 300}}
    toy_stream_config["training"].update(zero_stage=stage, max_steps=3)
    learner, stream, config = make_learner(toy_stream_config)
    learner.train_task(_plan(stream, config, 0))
    # files of this size at most: under ZeRO-3 written as gathered, a file at a time, laid out as
    # save_pretrained (stage 2) lays out its shards
    monkeypatch.setattr("pipelines.models.SHARD_BYTES", 40_000)
    directory = learner.save(tmp_path / "ckpt")
    files = sorted(p.name for p in directory.glob("model*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    model = AutoModelForSeq2SeqLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.model_type == arch
    assert sum(p.numel() for p in model.parameters()) == learner.num_parameters
    with deepspeed_module().zero.GatheredParameters(list(learner.body.parameters()), enabled=stage == 3):
        trained = {name: p.detach().clone() for name, p in learner.body.named_parameters()}
    saved = dict(model.named_parameters())
    assert trained.keys() == saved.keys()  # under ZeRO-3 gathered a module at a time: every weight, as trained
    for name, weight in trained.items():
        torch.testing.assert_close(saved[name], weight, rtol=0, atol=0)
    batch = tokenizer(stream[0].sources("eval")[:2], return_tensors="pt", padding=True)
    assert model.generate(**batch, max_new_tokens=2).shape[0] == 2


def test_num_steps():
    assert num_steps(100, epochs=1, max_steps=None, global_batch=16) == 7
    assert num_steps(100, epochs=2.5, max_steps=None, global_batch=16) == 16
    assert num_steps(100, epochs=1, max_steps=3, global_batch=16) == 3
    assert num_steps(1, epochs=0.1, max_steps=None, global_batch=16) == 1


def test_learning_rate_schedules(toy_stream_config):
    toy_stream_config["training"].update(lr=1.0, warmup_steps=2)
    for schedule, at_mid in (("constant", 1.0), ("linear", 0.5), ("cosine", 0.5)):
        toy_stream_config["training"]["lr_schedule"] = schedule
        training = validate_config(toy_stream_config).training
        assert lr_at(0, 12, training) == pytest.approx(0.5)  # warmup
        assert lr_at(1, 12, training) == pytest.approx(1.0)
        assert lr_at(7, 12, training) == pytest.approx(at_mid)
        assert 0 <= lr_at(11, 12, training) <= 1.0 and math.isfinite(lr_at(11, 12, training))


def test_gradient_accumulation_and_per_task_epochs(make_learner, toy_stream_config, tmp_path):
    toy_stream_config["training"].update(grad_accum_steps=2, max_steps=None, epochs=1.0)
    learner, stream, config = make_learner(toy_stream_config)
    assert learner.engine.gradient_accumulation_steps() == 2
    examples = build_plan(config, stream, 0).examples
    one_epoch = learner.train_task(build_plan(config, stream, 0))
    assert one_epoch["steps"] == math.ceil(examples.num_rows / (8 * 2))
    # a task's own epochs win over the run's: the plan carries the steps
    toy_stream_config["stream"]["tasks"][0]["epochs"] = 2.0
    per_task = validate_config(toy_stream_config)
    two_epochs = build_plan(per_task, load_stream(per_task), 0)
    assert two_epochs.num_steps == math.ceil(2 * examples.num_rows / (8 * 2))
    assert learner.train_task(two_epochs)["steps"] == two_epochs.num_steps
    assert learner.train_task(_plan(stream, config, 0, num_steps=3))["steps"] == 3


def test_by_class_order_feeds_a_task_class_by_class(make_learner, toy_stream_config, tmp_path):
    toy_stream_config["stream"]["tasks"][0]["order"] = "by_class"
    learner, stream, config = make_learner(toy_stream_config)
    plan = build_plan(config, stream, 0)
    assert plan.order == "by_class" and build_plan(config, stream, 1).order == "shuffled"
    pad = learner.tokenizer.pad_token_id
    decode = lambda batch: learner.tokenizer.batch_decode(batch.inputs["labels"].clamp(min=pad), skip_special_tokens=True)  # noqa: E731
    batches = learner.batches(plan)
    seen = [t for _ in range(-(-plan.examples.num_rows // 8)) for t in decode(next(batches))]
    assert seen == sorted(plan.examples.column("target").to_pylist())
    shuffled = learner.batches(dataclasses.replace(plan, order="shuffled"))
    assert [t for _ in range(3) for t in decode(next(shuffled))] != seen[:24]


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_the_recovery_probe_retrains_a_copy_of_the_head_and_leaves_the_model_alone(make_learner, arch, toy_stream_config,
                                                                                   tmp_path):
    import torch

    from pipelines.learner import last_decoder_block
    from pipelines.plan import recovery_plan

    toy_stream_config["model"] = {"arch": arch, "preset": "tiny", "tokenizer": {"vocab_size": 300}}
    toy_stream_config["recovery"] = {"enabled": True, "steps": 15, "lr": 1e-2}
    learner, stream, config = make_learner(toy_stream_config)
    learner.train_task(_plan(stream, config, 0))
    saved = learner.save(tmp_path / "final")
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    eval_sets = [EvalSet(t.name, t.metric, t.sources("eval"), t.targets("eval")) for t in stream]
    plan = recovery_plan(config, stream, eval_sets, str(saved))
    assert [t.name for t in plan.tasks] == [stream[0].name]  # every task but the last
    after = learner.recovery_probe(plan)
    assert set(after) == {stream[0].name} and 0 <= after[stream[0].name] <= 1
    assert all(torch.equal(v, learner.model.state_dict()[k]) for k, v in before.items())
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(saved)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in learner.model.state_dict().items()
               if k in reloaded.state_dict())
    block = last_decoder_block(reloaded)
    stack = reloaded.get_decoder().block if arch == "t5" else reloaded.get_decoder().layers
    assert block is stack[-1]


def _brute_force_ranking(body, encoder_inputs, label_ids):
    """One input and one label at a time, through the model's plain forward: the sum of the label's
    token log-probabilities."""
    scores = []
    for b in range(encoder_inputs["attention_mask"].shape[0]):
        single = {k: v[b : b + 1] for k, v in encoder_inputs.items()}
        row = []
        for ids in label_ids:
            labels = torch.tensor([ids])
            logits = body(**single, labels=labels).logits.float().log_softmax(-1)
            row.append(float(logits[0, torch.arange(len(ids)), labels[0]].sum()))
        scores.append(row)
    return torch.tensor(scores)


@pytest.mark.parametrize(("paradigm", "stage"), [("fine_tuning", 0), ("fine_tuning", 3), ("prompt_tuning", 0)],
                         ids=["fine_tuning", "fine_tuning-zero3", "prompt_tuning"])
def test_likelihood_scoring_picks_the_label_the_model_finds_likeliest(make_learner, paradigm, stage,
                                                                      toy_stream_config):
    toy_stream_config["evaluation"].update(scoring="likelihood")
    toy_stream_config["paradigm"] = {"name": paradigm}
    toy_stream_config["training"].update(max_steps=15, lr=1e-2, zero_stage=stage, single_worker_zero_as_stage0=False)
    learner, stream, config = make_learner(toy_stream_config)
    learner.train_task(_plan(stream, config, 0))  # a model that prefers some labels
    sets = eval_sets(config, stream)
    assert [s.labels for s in sets] == [("animal", "color", "sky"), tuple(sorted(set(stream[1].targets("train"))))]

    task = sets[0]
    enc = learner.tokenizer(task.sources, truncation=True, max_length=config.stream.max_source_tokens, padding=True,
                            return_tensors="pt")
    if paradigm == "prompt_tuning":
        body, inputs = learner.model.body, learner.model.encoder_inputs(enc["input_ids"], enc["attention_mask"],
                                                                         task.name)
    else:
        body, inputs = learner.model, dict(enc)
    label_ids = learner.batching.encode_targets(list(task.labels))
    learner.engine.eval()  # no dropout, as in evaluate()
    with torch.no_grad():
        expected = _brute_force_ranking(body, inputs, label_ids)
        grouped = label_log_likelihoods(body, inputs, label_ids)
        one_at_a_time = label_log_likelihoods(body, inputs, label_ids, budget=1)
    assert torch.allclose(grouped, expected, atol=1e-4) and torch.allclose(one_at_a_time, expected, atol=1e-4)
    assert expected.std() > 1e-3  # the labels are told apart, not tied

    picked = [task.labels[k] for k in expected.argmax(-1).tolist()]
    accuracy = sum(p == t for p, t in zip(picked, task.targets)) / len(task.targets)
    learner.engine.train()
    assert learner.evaluate([task])[task.name] == pytest.approx(accuracy)


def test_likelihood_scoring_only_ranks_classification_tasks(toy_stream_config):
    toy_stream_config["evaluation"].update(scoring="likelihood", max_labels=5)
    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    # category has 3 labels; first_word 9, more than max_labels: it generates
    assert [s.labels for s in eval_sets(config, stream)] == [("animal", "color", "sky"), ()]
    toy_stream_config["evaluation"].update(scoring="generate")
    assert all(s.labels == () for s in eval_sets(validate_config(toy_stream_config), stream))
    toy_stream_config["evaluation"].update(scoring="likelihood", max_labels=20)
    toy_stream_config["paradigm"] = {"name": "feature_extraction"}  # its heads classify over the label set already
    assert all(s.labels == () for s in eval_sets(validate_config(toy_stream_config), stream))


def test_mixed_task_batches_score_each_task_as_one_task_at_a_time_does(make_learner, toy_stream_config):
    # evaluation.mix_tasks: one shared model answers batches that hold both tasks; each task's score
    # must be what scoring it alone gives, whichever rank's share of the pooled examples it falls in.
    toy_stream_config["evaluation"].update(mix_tasks=True, batch_size=7)
    toy_stream_config["training"].update(max_steps=40)
    learner, stream, config = make_learner(toy_stream_config)
    learner.train_task(_plan(stream, config, 0))
    sets = [EvalSet(t.name, t.metric, t.sources("train")[:40], t.targets("train")[:40]) for t in stream]
    sets[1] = dataclasses.replace(sets[1], sources=sets[1].sources[:22], targets=sets[1].targets[:22])  # unequal; 62 = 3 x 21 - 1

    evaluation = learner.evaluation
    batches = []
    generate = evaluation.generate
    evaluation.generate = lambda sources, *a, **k: batches.append(sources) or generate(sources, *a, **k)
    learner.engine.eval()
    alone = [evaluation.score(s) for s in sets]
    batches.clear()
    pooled = evaluation.score_sets(sets)
    assert any(set(b) & set(sets[0].sources) and set(b) & set(sets[1].sources) for b in batches)
    assert [count for _, count in pooled] == [40, 22]
    assert [v for pair in pooled for v in pair] == pytest.approx([v for pair in alone for v in pair])
    assert alone[0][0] > alone[1][0] + 5  # the tasks' scores differ: a swap would show

    evaluation.world_size = 3  # three ranks' shares (stage 0: no collective in generation) add up to the whole
    shares = []
    for rank in range(3):
        evaluation.rank = rank
        shares.append(evaluation.score_sets(sets))
    evaluation.world_size, evaluation.rank = 1, 0
    summed = [sum(share[j][k] for share in shares) for j in range(2) for k in range(2)]
    assert summed == pytest.approx([v for pair in alone for v in pair])
    learner.engine.train()
    assert learner.evaluate(sets) == pytest.approx({s.name: total / count for s, (total, count) in zip(sets, alone)})


def test_mixed_task_batches_need_a_model_every_task_shares(toy_stream_config):
    toy_stream_config["evaluation"].update(mix_tasks=True)
    for paradigm, what in (("prompt_tuning", "prompt"), ("feature_extraction", "head")):
        toy_stream_config["paradigm"] = {"name": paradigm}
        with pytest.raises(ConfigError, match=rf"evaluation.mix_tasks: .* its own {what}"):
            validate_config(toy_stream_config)
    toy_stream_config["paradigm"] = {"name": "prompt_engineering", "shots": 1}
    config = validate_config(toy_stream_config)
    assert config.evaluation.mix_tasks
    # table1 runs every paradigm from one config: the per-task ones evaluate one task a batch
    assert not run_config(config, "prompt_tuning", 8, output_dir="x", parent_run_id=None).evaluation.mix_tasks
    assert run_config(config, "fine_tuning", 8, output_dir="x", parent_run_id=None).evaluation.mix_tasks
