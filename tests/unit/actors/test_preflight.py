"""What the driver resolves before any worker starts, in one process (no Ray)."""

import json

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from actors.preflight import resolve_run
from actors.scheduler import Scheduler
from pipelines.config import resolve_paths, validate_config
from pipelines.rundir import OutputDir


@pytest.fixture
def uncased_encoder(tmp_path):
    """A small BERT whose WordPiece vocabulary is uncased and strips accents, as MiniLM's (the
    warm start's) is."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "conjugate", ":", "nous", "manger", "finir", "parler",
             "mange", "##ames", "fin", "##imes", "parlons", "parlez", "passe", "present", "simple", "conjugation"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, strip_accents=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_a_task_whose_targets_the_tokenizer_cannot_give_back_is_warned_and_its_ceiling_reported(
        uncased_encoder, toy_stream_config, tmp_path, capsys):
    verbs = (("manger", "mangeâmes"), ("finir", "finîmes"), ("parler", "parlons"))
    rows = [{"source": f"nous {verb} passe simple {i}", "target": target} for i in range(30) for verb, target in verbs]
    (tmp_path / "conjugation.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")
    toy_stream_config["model"] = {"arch": "encoder_decoder", "encoder": str(uncased_encoder)}
    toy_stream_config["stream"]["tasks"] = [{"name": "conjugation",
                                             "source": {"kind": "file", "path": str(tmp_path / "conjugation.jsonl")}}]
    config = resolve_paths(validate_config(toy_stream_config))
    output = OutputDir(config.output_dir)
    output.claim(resume=False, overwrite=False)
    try:
        run = resolve_run(config, output, resuming=False, progress=False)
    finally:
        output.unlock()
    # two verbs of three lose their accents on the way back: no model can score on those examples
    targets = run.stream.tasks[0].targets("eval")
    ceiling = run.ceilings["conjugation"]
    assert len(set(targets)) == 3 and ceiling == pytest.approx(targets.count("parlons") / len(targets))
    err = capsys.readouterr().err
    assert "warning: task 'conjugation':" in err and "cannot come back through the tokenizer whole" in err
    assert f"cannot pass {ceiling:.3f}" in err

    scheduler = Scheduler(config, run.stream, ceilings=run.ceilings)
    report = scheduler.finish()
    assert report.ceilings == {"conjugation": pytest.approx(ceiling)}
    saved = json.loads((output.path / "report.json").read_text())
    assert saved["ceilings"] == {"conjugation": pytest.approx(ceiling)}
    # a resumed run keeps them
    assert Scheduler(config, run.stream, previous=report).report().ceilings == report.ceilings
