"""ZeRO's memory estimate, the presets' parameter counts, and the refusal of a model that cannot fit."""

import pytest
import torch

from pipelines.config import ModelConfig
from pipelines.errors import ConfigError
from pipelines.memory import (GIB, HEADROOM, PROCESS_BYTES, SHARD_BYTES, Setting, Shape, estimate, fits,
                              host_bytes_needed, model_state_bytes, refuse_unless_it_fits, setting_that_fits)
from pipelines.models import PRESETS, build_model, count_parameters, hf_config, preset_config, train_tokenizer

TEXTS = ["question type: How far is it from Denver to Aspen ?", "NUM", "spam or ham: Ok lar joking wif u", "ham"] * 30


def test_model_states_are_the_zero_papers_worked_example():
    # Rajbhandari et al. 2020, Figure 1: a 7.5B-parameter model, mixed-precision Adam (K = 12),
    # 64 data-parallel workers: 120 GB a worker unpartitioned, 31.4 GB (P_os), 16.6 GB (P_os+g), 1.9 GB (P_os+g+p)
    per_stage = [sum(model_state_bytes(int(7.5e9), stage=stage, workers=64, precision="bf16")) / 1e9
                 for stage in range(4)]
    assert [round(gb, 1) for gb in per_stage] == [120.0, 31.4, 16.6, 1.9]


def test_fp32_training_keeps_four_bytes_a_weight_and_a_gradient_and_eight_of_adam():
    assert model_state_bytes(1000, stage=0, workers=2, precision="fp32") == (4000, 4000, 8000)
    assert model_state_bytes(1000, stage=1, workers=2, precision="fp32") == (4000, 4000, 4000)
    assert model_state_bytes(1000, stage=2, workers=2, precision="fp32") == (4000, 2000, 4000)
    assert model_state_bytes(1000, stage=3, workers=2, precision="fp32") == (2000, 2000, 4000)


def test_deepspeed_holds_22_bytes_a_parameter_at_stage_2_on_two_fp32_workers():
    # ZeRO's 4 (weights) + 2 (half the reduced gradients) + 4 (half of Adam's 8), and DeepSpeed's
    # working copies: 2 (its fp32 copy of the partition), 4 (whole gradients as computed), 4 (the
    # model as written), 2 (temporaries: the partition again). bench/model_scale.py measured
    # 19.9-20.4 bytes a parameter between sizes: the estimate is on the safe side.
    shape = Shape(10**6, d_model=8, encoder_layers=1, decoder_layers=1, heads=1, vocab=8)
    e = estimate(shape, Setting(zero_stage=2, workers=2, micro_batch=1, source_tokens=1, target_tokens=1,
                                reduce_bucket=0, allgather_bucket=0))
    assert (e.model_states, e.working, e.buffers) == (10 * 10**6, 12 * 10**6, 0)
    stage_3 = estimate(shape, Setting(zero_stage=3, workers=2, micro_batch=1, source_tokens=1, target_tokens=1,
                                      reduce_bucket=0, prefetch_bucket=0))
    # no whole gradients at stage 3; the writing worker gathers the model (4) and writes it (4), a
    # file of at most a gigabyte at a time; temporaries of six partitions (12), as measured
    assert (stage_3.model_states, stage_3.working, stage_3.written) == (8 * 10**6, 22 * 10**6, 8 * 10**6)
    assert host_bytes_needed(stage_3, 2) == 2 * stage_3.host - 8 * 10**6  # only one of the two writes


def test_a_model_is_written_a_file_of_at_most_a_gigabyte_at_a_time():
    big = Shape(10**9, d_model=8, encoder_layers=1, decoder_layers=1, heads=1, vocab=8)
    e = estimate(big, Setting(zero_stage=0, workers=1, micro_batch=1, source_tokens=1, target_tokens=1))
    assert e.written == SHARD_BYTES == 10**9  # not the 4 GB of the whole model


PUBLISHED = {("t5", "t5-small"): 60_506_624, ("t5", "t5-base"): 222_903_552, ("t5", "t5-large"): 737_668_096,
             ("bart", "bart-base"): 139_420_416, ("bart", "bart-large"): 406_291_456}


@pytest.mark.parametrize("arch,preset", [(arch, preset) for arch in PRESETS for preset in PRESETS[arch]])
def test_every_preset_is_counted_from_its_config_as_built_and_the_published_ones_as_published(arch, preset):
    tokenizer = train_tokenizer(TEXTS, arch=arch, vocab_size=300)
    config = ModelConfig(arch=arch, preset=preset)
    with torch.device("meta"):  # the architecture without its memory
        built = sum(p.numel() for p in build_model(config, tokenizer).parameters())
    full = hf_config(config, tokenizer)
    assert count_parameters(full) == built
    assert count_parameters(preset_config(config, len(tokenizer))) == built  # what the driver counts: no torch
    stand_in = vars(preset_config(config, len(tokenizer)))
    assert {key: getattr(full, key) for key in stand_in} == stand_in  # every field as transformers has it
    if (arch, preset) in PUBLISHED:
        assert built == PUBLISHED[arch, preset]


def test_a_bert2bert_encoder_decoder_is_counted_from_its_config_as_built(tmp_path):
    from transformers import BertConfig, EncoderDecoderModel

    from pipelines.models import encoder_decoder_config

    BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128).save_pretrained(tmp_path / "encoder")
    config = encoder_decoder_config(str(tmp_path / "encoder"))  # the pretrained encoder, twice
    with torch.device("meta"):
        model = EncoderDecoderModel(config=config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters()) == 370_920
    config.save_pretrained(tmp_path / "saved")  # an earlier run's checkpoint: its own config
    assert count_parameters(encoder_decoder_config(str(tmp_path / "saved"))) == 370_920


def test_a_preset_of_the_other_architecture_is_refused_naming_the_arch_to_set():
    with pytest.raises(ValueError, match="model.preset bart-base is a bart shape; model.arch is t5: set model.arch=bart"):
        ModelConfig(arch="t5", preset="bart-base")


T5_LARGE = Shape(737_668_096, d_model=1024, encoder_layers=24, decoder_layers=24, heads=16, vocab=32128)
TWO_CPU_WORKERS = Setting(zero_stage=0, workers=2, micro_batch=16, source_tokens=128, target_tokens=16)


def test_t5_large_on_two_cpu_workers_at_stage_0_is_refused_on_24_gib_with_the_estimate_and_what_fits():
    e = estimate(T5_LARGE, TWO_CPU_WORKERS)
    assert e.model_states == 16 * 737_668_096  # fp32 weights, gradients, Adam's two moments: all on each worker
    assert e.written == SHARD_BYTES  # stage 0: a file of the model as it is written...
    assert e.working == SHARD_BYTES + 4 * 737_668_096 // 2  # ...and the temporaries: a worker's half again
    assert e.host == PROCESS_BYTES + e.model_states + e.working + e.buffers + e.activations
    assert host_bytes_needed(e, 2) == 2 * e.host - e.written  # one of the two writes the model
    with pytest.raises(ConfigError) as refused:
        refuse_unless_it_fits(T5_LARGE, TWO_CPU_WORKERS, host_bytes=24 * GIB, accelerator_bytes=None, where="training")
    message = str(refused.value)
    assert "a 738M-parameter model under training.zero_stage=0, training.num_workers=2" in message
    assert f"{host_bytes_needed(e, 2) / GIB:.1f} GiB of host memory for its 2 worker(s)" in message
    fitting = setting_that_fits(T5_LARGE, TWO_CPU_WORKERS, host_bytes=24 * GIB, accelerator_bytes=None, max_workers=2,
                                min_workers=1)
    assert f"this would fit: {fitting.describe()}" in message
    assert host_bytes_needed(estimate(T5_LARGE, fitting), fitting.workers) <= HEADROOM * 24 * GIB


def test_a_setting_that_fits_changes_the_stage_before_the_micro_batch():
    eight = Setting(zero_stage=0, workers=8, micro_batch=16, source_tokens=128, target_tokens=16)
    assert refuse_unless_it_fits(T5_LARGE, eight, host_bytes=10**15, accelerator_bytes=None, where="x")

    def host(stage, batch):  # what the 8 workers need, and the memory that makes exactly that fit
        need = host_bytes_needed(estimate(T5_LARGE, Setting(**{**eight.__dict__, "zero_stage": stage,
                                                               "micro_batch": batch})), 8)
        return need, int(need / HEADROOM) + 1

    needs = {stage: host(stage, 16) for stage in (1, 2, 3)}
    least = min(needs, key=lambda stage: needs[stage][0])
    assert needs[least][0] < host(0, 1)[0]  # over 8 workers a stage saves more than any micro-batch
    fitting = setting_that_fits(T5_LARGE, eight, host_bytes=needs[least][1], accelerator_bytes=None, max_workers=8)
    assert (fitting.zero_stage, fitting.micro_batch) == (least, 16)
    fitting = setting_that_fits(T5_LARGE, eight, host_bytes=needs[least][1] - 2, accelerator_bytes=None,
                                max_workers=8)
    assert fitting.micro_batch == 8  # no stage fits at 16 any more: the micro-batch halves
    assert fits(T5_LARGE, fitting, host_bytes=needs[least][1] - 2, accelerator_bytes=None, workers_per_host=8)


def test_on_a_gpu_offload_moves_the_optimizer_to_the_host_and_is_what_fits_a_small_gpu():
    gpu = Setting(zero_stage=2, workers=1, micro_batch=4, source_tokens=512, target_tokens=64, precision="bf16",
                  on_cuda=True)
    kept, offloaded = estimate(T5_LARGE, gpu), estimate(T5_LARGE, Setting(**{**gpu.__dict__, "offload_optimizer": True}))
    assert kept.accelerator - offloaded.accelerator == offloaded.offloaded == (12 + 2) * 737_668_096
    assert offloaded.host == PROCESS_BYTES + offloaded.offloaded + offloaded.written  # written from the host
    fitting = setting_that_fits(T5_LARGE, gpu, host_bytes=200 * GIB,
                                accelerator_bytes=int(kept.accelerator * 0.6 / HEADROOM), max_workers=1)
    assert fitting is not None and fitting.offload_optimizer and fitting.micro_batch == 4


def test_the_preflight_refuses_t5_large_on_two_workers_on_24_gib_before_anything_starts(toy_stream_config):
    from actors.preflight import ModelStart, check_memory
    from pipelines.config import RunConfig
    from pipelines.report import ModelInit

    toy_stream_config["model"].update(preset="t5-large")
    toy_stream_config["training"].update(num_workers=2, zero_stage=0)
    config = RunConfig.model_validate(toy_stream_config)
    tokenizer = train_tokenizer(TEXTS, arch="t5", vocab_size=300)
    start = ModelStart(ModelInit(kind="random", source="preset t5/t5-large"))
    with pytest.raises(ConfigError, match=r"training \(training.check_memory=false skips this check\): a 738M-parameter "
                                          r"model under training.zero_stage=0, training.num_workers=2, .* this would fit: "
                                          r"training.zero_stage=0, training.num_workers=1"):
        check_memory(config, tokenizer, start, host_bytes=24 * GIB)
    toy_stream_config["training"].update(num_workers=1)
    check_memory(RunConfig.model_validate(toy_stream_config), tokenizer, start, host_bytes=24 * GIB)


def test_where_no_stage_fits_two_workers_on_one_machine_fewer_workers_is_the_setting_named():
    # measured on 23.5 GiB: t5-large at ZeRO-3 on two workers ran out of memory, on one worker it finished
    two = Setting(zero_stage=3, workers=2, micro_batch=2, source_tokens=64, target_tokens=8)
    with pytest.raises(ConfigError, match=r"this would fit: training.zero_stage=0, training.num_workers=1, "
                                          r"training.micro_batch_size=2"):
        refuse_unless_it_fits(T5_LARGE, two, host_bytes=int(21.5 * GIB), accelerator_bytes=None, where="training")
    one = Setting(zero_stage=0, workers=1, micro_batch=2, source_tokens=64, target_tokens=8)
    assert refuse_unless_it_fits(T5_LARGE, one, host_bytes=int(21.5 * GIB), accelerator_bytes=None, where="x")
