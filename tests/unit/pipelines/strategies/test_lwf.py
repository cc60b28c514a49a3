"""LwF: the old heads are the earlier prefixes; the teacher is frozen; the distillation terms."""

import math

import pytest
import torch

from pipelines.plan import build_plan
from pipelines.strategies.base import load_frozen
from pipelines.strategies.lwf import LwF, LwfStrategyConfig, answer_labels, distillation_loss


def test_kl_distillation_hand_computed_with_temperature_squared_and_padding_mask():
    # one sequence, two positions, vocabulary of 2; the second position is padding (-100)
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[2.0, 0.0], [-5.0, 5.0]]])
    labels = torch.tensor([[1, -100]])
    t = 2.0
    p = torch.softmax(torch.tensor([2.0, 0.0]) / t, dim=0)  # teacher softened: [0.731, 0.269]
    q = torch.tensor([0.5, 0.5])  # student softened
    # KL = 0.7311 ln(0.7311 / 0.5) + 0.2689 ln(0.2689 / 0.5) = 0.2777 - 0.1667 = 0.1110; x T^2 = 0.4438
    expected = float((p * (p / q).log()).sum()) * t**2
    got = distillation_loss(student, teacher, labels, variant="kl", temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.4438, abs=1e-3)


def test_mse_distillation_sums_over_the_vocabulary_and_masks_padding():
    student = torch.tensor([[[1.0, 3.0], [100.0, 100.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([[4, -100]])
    # (1 - 0)^2 + (3 - 1)^2 = 5, summed over the vocabulary (a mean would give 2.5); the padded token counts nothing
    assert distillation_loss(student, teacher, labels, variant="mse", temperature=1.0).item() == pytest.approx(5.0)


def test_distillation_of_identical_logits_is_zero():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    assert distillation_loss(logits, logits, labels, variant="kl", temperature=2.0).item() == pytest.approx(0, abs=1e-6)


def test_lwf_teacher_is_frozen_and_never_changes(make_learner, make_plan, tmp_path):
    learner, stream = make_learner({"name": "lwf", "alpha": 0.5}, max_steps=10)
    learner.train_task(make_plan(learner, stream, 0))
    teacher_dir = learner.save(tmp_path / "after-0")
    plan = make_plan(learner, stream, 1, teacher_dir=str(teacher_dir))
    lwf = learner.strategy.parts[0]
    lwf.before_task(learner.context(plan), plan)
    teacher = lwf.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    lwf.after_task = lambda *a: None  # keep the teacher to inspect it afterwards
    lwf.before_task = lambda *a: None
    losses = []
    learner.train_task(plan, on_step=lambda s, n, loss, metrics: losses.append(loss))
    assert losses
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    student = learner.model.state_dict()
    assert any(not torch.equal(student[k], before[k]) for k in before)  # the student did move
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("variant", ["mse", "pseudo_labels"])
def test_lwf_variants_train(variant, make_learner, make_plan, tmp_path):
    learner, stream = make_learner({"name": "lwf", "variant": variant}, max_steps=4)
    learner.train_task(make_plan(learner, stream, 0))
    teacher_dir = learner.save(tmp_path / "after-0")
    stats = learner.train_task(make_plan(learner, stream, 1, teacher_dir=str(teacher_dir)))
    assert stats["steps"] == 4 and math.isfinite(stats["mean_loss"])


def test_lwf_views_put_the_new_inputs_under_each_earlier_prefix(toy_stream_config, make_learner, make_plan):
    toy_stream_config["stream"]["max_source_tokens"] = 64  # no truncation: prefixes of other lengths
    learner, stream = make_learner({"name": "lwf"})
    plan = make_plan(learner, stream, 1)
    assert plan.distill_prefixes == (stream[0].prefix,) and plan.prefix == stream[1].prefix
    batch = next(learner.batches(plan))
    new = learner.tokenizer.batch_decode(batch.inputs["input_ids"], skip_special_tokens=True)
    old = learner.tokenizer.batch_decode(batch.extras["views"][0]["input_ids"], skip_special_tokens=True)
    assert [o.removeprefix(stream[0].prefix.strip()).strip() for o in old] == \
           [n.removeprefix(stream[1].prefix.strip()).strip() for n in new]
    assert all(o.startswith(stream[0].prefix.strip()) for o in old)
    assert build_plan(learner.config, stream, 0).distill_prefixes == ()  # nothing to keep on the first task


def test_answer_labels_keep_the_end_token_and_mask_what_follows():
    sequences = torch.tensor([[0, 5, 6, 1, 0, 0], [0, 7, 1, 9, 1, 0], [0, 3, 4, 5, 6, 7]])  # start, ..., eos = 1
    assert answer_labels(sequences, eos_id=1).tolist() == [[5, 6, 1, -100, -100], [7, 1, -100, -100, -100],
                                                           [3, 4, 5, 6, 7]]


def _old_head_divergence(learner, teacher, sources):
    """Mean KL(teacher || student) per answer token on ``sources`` (already under the old prefix),
    teacher-forced on the teacher's own greedy answers: how far the old head has moved."""
    lwf = LwF(LwfStrategyConfig(), learner.config)
    lwf.teacher = teacher
    view = learner.batching.collate_inputs(learner.tokenizer(sources)["input_ids"])
    labels, teacher_logits = lwf.teacher_answers(view)
    learner.model.eval()
    with torch.no_grad():
        student = learner.model(**view, labels=labels).logits
    learner.model.train()
    return distillation_loss(student, teacher_logits, labels, variant="kl", temperature=1.0).item()


def test_lwf_keeps_the_old_heads_answers_close_to_the_teachers_where_naive_does_not(make_learner, make_plan, tmp_path):
    """Two tasks on a tiny T5: after the second, the first task's prefix on the second task's
    inputs must still give (nearly) the teacher's distribution under LwF, and much less so under
    plain fine-tuning from the same start."""
    results = {}
    for name in ("naive", "lwf"):
        (tmp_path / name).mkdir()
        learner, stream = make_learner({"name": name, "alpha": 0.8} if name == "lwf" else {"name": name},
                                       directory=tmp_path / name, max_steps=40, lr=3e-3)
        learner.train_task(make_plan(learner, stream, 0))
        teacher_dir = learner.save(tmp_path / name / "after-0")
        learner.train_task(make_plan(learner, stream, 1, teacher_dir=str(teacher_dir)))
        teacher = load_frozen(teacher_dir, device=learner.device, dtype=torch.float32)
        bare = [s.removeprefix(stream[1].prefix) for s in stream[1].sources("eval")]
        results[name] = _old_head_divergence(learner, teacher, [stream[0].prefix + s for s in bare])
    assert results["lwf"] < 0.5 * results["naive"], results


def test_the_old_heads_terms_are_averaged_or_summed_as_configured(toy_stream_config):
    from types import SimpleNamespace

    from pipelines.config import validate_config
    from pipelines.strategies.base import StepBatch
    from pipelines.strategies.lwf import LwF, LwfStrategyConfig

    run = validate_config(toy_stream_config)
    results = {}
    for heads in ("mean", "sum"):
        lwf = LwF(LwfStrategyConfig(alpha=1.0, variant="pseudo_labels", old_heads=heads), run)
        lwf.teacher = object()
        lwf.teacher_answers = lambda view: (view["labels"], None)
        # the student's loss on a view is its number: two old heads at 1 and 3
        student = lambda **view: SimpleNamespace(loss=view["input_ids"].float().sum(), logits=None)  # noqa: E731
        lwf.per_example = False
        views = [{"input_ids": torch.tensor([[1.0]]), "attention_mask": None, "labels": None},
                 {"input_ids": torch.tensor([[3.0]]), "attention_mask": None, "labels": None}]
        results[heads] = lwf.loss(student, StepBatch({}, {"views": views}), lambda m: torch.tensor(0.0)).item()
    assert results == {"mean": 2.0, "sum": 4.0}
