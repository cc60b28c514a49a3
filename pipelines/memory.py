"""Whether a run's training fits in memory, estimated before anything starts.

Model states (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", SC'20, §3.1 and Figure 1). Psi parameters trained with Adam hold parameters and
gradients of ``p`` bytes each (2 in bf16/fp16, 4 in fp32) and optimizer states of ``K`` bytes a
parameter (mixed precision: K = 12, an fp32 copy of the weights, momentum and variance; fp32: K = 8,
momentum and variance). Over N data-parallel workers, ZeRO stage 1 partitions the optimizer
states, stage 2 the gradients too, stage 3 the parameters too; per worker:

    stage 0: (2p + K) Psi            stage 2: p Psi + (p + K) Psi / N
    stage 1: 2p Psi + K Psi / N      stage 3: (2p + K) Psi / N

DeepSpeed's working copies come on top (measured, docs/benchmarks.md "Model size"): at stages 1-3
its optimizer keeps an fp32 copy of the worker's partition even when training in fp32 (4 Psi / N:
K is 12 there too); at stage 2 each parameter's whole gradient exists as the backward pass
computes it, before it is reduced and partitioned (p Psi); writing the task's model copies one
file of it at a time (at most 1 GB), which at stage 3 the writing worker first gathers (another
file's worth); its temporaries (the optimizer step, loading a saved state; fitted, not derived:
p Psi / N, six times that at stage 3, which puts the estimate 6-23% above every peak
bench/model_scale.py measured); and its buffers: at stages 1-2 the reduce and all-gather buckets
(``reduce_bucket_size`` and ``allgather_bucket_size`` elements), at stage 3 the reduce bucket and
the parameters it keeps gathered (up to ``stage3_max_live_parameters``, or any reused within
``stage3_max_reuse_distance``, plus the prefetch bucket: DeepSpeed's defaults of 1e9 keep a
smaller model whole on every worker). Offloading (``offload_optimizer`` / ``offload_param`` to the
CPU) moves the optimizer states and fp32 gradients (stages 1-3) and the parameters (stage 3) from
the accelerator to host memory: it relieves a GPU, and on a CPU run, where both are host memory,
it moves nothing.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", §4.1): a transformer layer keeps about ``s b h (34 + 5 a s / h)`` bytes in 16-bit for ``b``
sequences of ``s`` tokens, hidden size ``h`` and ``a`` heads (twice that in fp32). A decoder layer's
cross-attention is a second attention block (``11 s b h + 5 a b s_target s_source``). The output
layer adds the logits three times over (logits, their log-softmax, its gradient): ``3 b t V`` floats.

A process of ours (Python, torch, DeepSpeed, a Ray worker) is resident before any of that:
``PROCESS_BYTES``, measured (docs/benchmarks.md, model size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A trainer worker with torch, DeepSpeed and Ray imported, before its model: 0.34-0.38 GiB (the peaks
# at 60M, 140M and 223M less 20 bytes a parameter, the buckets and the activations), rounded up.
PROCESS_BYTES = 450_000_000
GIB = 1 << 30
# A setting fits when its estimate is at most this share of the memory: the estimate leaves out the
# allocator's fragmentation, temporaries of the optimizer step, and whatever else the machine runs.
HEADROOM = 0.9
# The largest file a saved model is written in (pipelines.models, both writers): safetensors builds
# each file whole in memory before writing it, so this bounds that copy (t5-large's 2.95 GB of fp32
# weights would otherwise be a second whole copy while written).
SHARD_BYTES = 10**9


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model."""

    parameters: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    vocab: int


@dataclass(frozen=True)
class Setting:
    """What a run chooses that moves its memory."""

    zero_stage: int
    workers: int
    micro_batch: int
    source_tokens: int
    target_tokens: int
    precision: str = "fp32"  # fp32, bf16 or fp16
    offload_optimizer: bool = False
    offload_params: bool = False
    on_cuda: bool = False
    # elements; None: what a run at this stage on this device gets (deepspeed_config.zero_setting)
    reduce_bucket: int | None = None
    allgather_bucket: int | None = None
    max_live_parameters: int | None = None
    max_reuse_distance: int | None = None
    prefetch_bucket: int | None = None

    def zero(self, key: str) -> int:
        from pipelines.deepspeed_config import zero_setting

        field = {"reduce_bucket_size": "reduce_bucket", "allgather_bucket_size": "allgather_bucket",
                 "stage3_max_live_parameters": "max_live_parameters",
                 "stage3_max_reuse_distance": "max_reuse_distance",
                 "stage3_prefetch_bucket_size": "prefetch_bucket"}[key]
        value = getattr(self, field)
        return value if value is not None else zero_setting(key, stage=self.zero_stage, on_cuda=self.on_cuda)

    def describe(self) -> str:
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params))
                   if on]
        return (f"training.zero_stage={self.zero_stage}, training.num_workers={self.workers}, "
                f"training.micro_batch_size={self.micro_batch}"
                + (f", offload of the {' and '.join(offload)} to the CPU" if offload else ""))


@dataclass(frozen=True)
class Estimate:
    """Bytes per worker: its parts, what sits on its accelerator (0 on a CPU run) and in host memory."""

    model_states: int  # ZeRO's formula
    working: int  # DeepSpeed's working copies: its fp32 partition, whole gradients, the model as written
    written: int  # of ``working``, what only the worker that writes the task's model holds
    buffers: int
    activations: int
    offloaded: int
    accelerator: int
    host: int

    def parts(self) -> str:
        return (f"model states {self.model_states / GIB:.1f} GiB, DeepSpeed's working copies "
                f"{self.working / GIB:.1f} GiB and buffers {self.buffers / GIB:.1f} GiB, activations "
                f"{self.activations / GIB:.1f} GiB, the process {PROCESS_BYTES / GIB:.1f} GiB")


def model_state_bytes(parameters: int, *, stage: int, workers: int, precision: str) -> tuple[int, int, int]:
    """Per worker: parameter, gradient and optimizer-state bytes at ZeRO ``stage`` (the module docstring)."""
    p = 4 if precision == "fp32" else 2
    k = 8 if precision == "fp32" else 12
    n = workers
    params = p * parameters / (n if stage >= 3 else 1)
    grads = p * parameters / (n if stage >= 2 else 1)
    optimizer = k * parameters / (n if stage >= 1 else 1)
    return round(params), round(grads), round(optimizer)


def activation_bytes(shape: Shape, *, micro_batch: int, source_tokens: int, target_tokens: int,
                     precision: str) -> int:
    """Activations kept for the backward pass of one micro-batch (Korthikanti et al. 2022, §4.1)."""
    scale = 2 if precision == "fp32" else 1
    b, h, a = micro_batch, shape.d_model, shape.heads
    s, t = source_tokens, target_tokens
    encoder = shape.encoder_layers * (s * b * h * 34 + 5 * a * s * s * b)
    decoder = shape.decoder_layers * (t * b * h * (34 + 11) + 5 * a * b * (t * t + t * s))
    logits = 3 * b * t * shape.vocab * 4
    return round(scale * (encoder + decoder) + logits)


def estimate(shape: Shape, setting: Setting) -> Estimate:
    """Bytes per worker of ``shape`` trained under ``setting`` (the module docstring); the worker
    that writes the task's model, the most loaded."""
    psi, n, stage = shape.parameters, setting.workers, setting.zero_stage
    params, grads, optimizer = model_state_bytes(psi, stage=stage, workers=n, precision=setting.precision)
    p = 4 if setting.precision == "fp32" else 2
    fp32_copy = round(4 * psi / n) if stage >= 1 and setting.precision == "fp32" else 0
    whole_grads = p * psi if stage == 2 else 0  # stages 0-1 count them whole already; stage 3 reduces by bucket
    # writing the task's model: safetensors builds each file (at most SHARD_BYTES) whole before writing
    # it; under ZeRO-3 the writing worker first gathers that file's weights, a module at a time
    written = min(p * psi, SHARD_BYTES) * (2 if stage == 3 else 1)
    # the optimizer step's and a state load's temporaries: a worker's partition of the weights again;
    # at stage 3 six times that (t5-base on two workers peaked at 6.09 GiB on each: measured, not derived)
    temporaries = round(p * psi / n) * (6 if stage == 3 else 1)
    working = fp32_copy + whole_grads + written + temporaries
    if stage in (1, 2):
        buffers = p * (setting.zero("reduce_bucket_size") + setting.zero("allgather_bucket_size"))
    elif stage == 3:  # the parameters kept gathered, and the reduce bucket
        live = max(setting.zero("stage3_max_live_parameters"), setting.zero("stage3_max_reuse_distance"))
        buffers = p * (min(psi, live + setting.zero("stage3_prefetch_bucket_size"))
                       + min(psi, setting.zero("reduce_bucket_size")))
    else:
        buffers = 0
    buffers = min(buffers, p * 2 * psi)
    activations = activation_bytes(shape, micro_batch=setting.micro_batch, source_tokens=setting.source_tokens,
                                   target_tokens=setting.target_tokens, precision=setting.precision)
    offloaded = 0
    if setting.on_cuda and setting.offload_optimizer and stage >= 1:
        offloaded += optimizer + grads
    if setting.on_cuda and setting.offload_params and stage == 3:
        offloaded += params
    states = params + grads + optimizer
    if setting.on_cuda:  # the model is written from host memory
        on_accelerator = states + working - written - offloaded + buffers + activations
        return Estimate(states, working, written, buffers, activations, offloaded, on_accelerator,
                        PROCESS_BYTES + offloaded + written)
    return Estimate(states, working, written, buffers, activations, 0, 0,
                    PROCESS_BYTES + states + working + buffers + activations)


def host_bytes_needed(e: Estimate, workers_per_host: int) -> int:
    """What ``workers_per_host`` workers on one machine hold together: each its share, and the one
    that writes the task's model its copy of it (``estimate`` is that worker's)."""
    return e.host * workers_per_host - (workers_per_host - 1) * e.written


def fits(shape: Shape, setting: Setting, *, host_bytes: int, accelerator_bytes: int | None,
         workers_per_host: int) -> bool:
    """Whether every worker's accelerator holds its part and the host holds its ``workers_per_host``
    workers' host parts, each within ``HEADROOM``."""
    e = estimate(shape, setting)
    if setting.on_cuda and accelerator_bytes is not None and e.accelerator > HEADROOM * accelerator_bytes:
        return False
    return host_bytes_needed(e, workers_per_host) <= HEADROOM * host_bytes


def setting_that_fits(shape: Shape, setting: Setting, *, host_bytes: int, accelerator_bytes: int | None,
                      max_workers: int, min_workers: int | None = None,
                      workers_per_host: Any = None) -> Setting | None:
    """The nearest setting to ``setting`` that fits, the least change first: a higher ZeRO stage,
    then (on a GPU) offload, then a smaller micro-batch, then more workers (up to ``max_workers``,
    where more machines bring their memory), then fewer (down to ``min_workers``: workers sharing
    one machine each hold DeepSpeed's working copies and a process). ``workers_per_host(setting)``:
    how many of its workers share a host (default all)."""
    per_host = workers_per_host or (lambda s: s.workers)
    offloads = [(False, False), (True, False), (True, True)] if setting.on_cuda else [(False, False)]
    batches = [setting.micro_batch >> i for i in range(setting.micro_batch.bit_length())]
    counts = [*range(setting.workers, max(max_workers, setting.workers) + 1),
              *range(setting.workers - 1, (min_workers or setting.workers) - 1, -1)]
    for workers in counts:
        for batch in batches:
            # with fewer workers any stage may do (one worker has nothing to partition: stage 0)
            for stage in range(setting.zero_stage if workers >= setting.workers else 0, 4):
                for optimizer, params in offloads:
                    if (optimizer and stage == 0) or (params and stage < 3):
                        continue
                    changes: dict[str, Any] = {"zero_stage": stage, "workers": workers, "micro_batch": batch,
                                               "offload_optimizer": optimizer or setting.offload_optimizer,
                                               "offload_params": params or setting.offload_params}
                    if stage != setting.zero_stage:  # that stage's own buckets, not this one's
                        changes.update(reduce_bucket=None, allgather_bucket=None, max_live_parameters=None,
                                       max_reuse_distance=None, prefetch_bucket=None)
                    candidate = Setting(**{**setting.__dict__, **changes})
                    if fits(shape, candidate, host_bytes=host_bytes, accelerator_bytes=accelerator_bytes,
                            workers_per_host=per_host(candidate)):
                        return candidate
    return None


def shape_of(model_config: Any, parameters: int) -> Shape:
    """A ``Shape`` from a Hugging Face config (T5, BART or an encoder-decoder of BERT-style stacks)."""
    c = model_config
    if getattr(c, "model_type", "") == "encoder-decoder":
        enc, dec = c.encoder, c.decoder
        return Shape(parameters, enc.hidden_size, enc.num_hidden_layers, dec.num_hidden_layers,
                     enc.num_attention_heads, dec.vocab_size)
    if hasattr(c, "num_decoder_layers"):  # T5
        return Shape(parameters, c.d_model, c.num_layers, c.num_decoder_layers, c.num_heads, c.vocab_size)
    return Shape(parameters, c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.vocab_size)


def run_setting(config: Any, ds_config: dict[str, Any], *, on_cuda: bool, precision: str) -> Setting:
    """The ``Setting`` of a run config and the DeepSpeed config its workers build."""
    zero = ds_config.get("zero_optimization", {})
    training, stream = config.training, config.stream

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")

    def number(key: str) -> int | None:
        value = zero.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return Setting(
        zero_stage=int(zero.get("stage", 0)), workers=training.num_workers, micro_batch=training.micro_batch_size,
        source_tokens=stream.max_source_tokens, target_tokens=stream.max_target_tokens, precision=precision,
        offload_optimizer=offloaded("offload_optimizer"), offload_params=offloaded("offload_param"), on_cuda=on_cuda,
        reduce_bucket=number("reduce_bucket_size"), allgather_bucket=number("allgather_bucket_size"),
        max_live_parameters=number("stage3_max_live_parameters"),
        max_reuse_distance=number("stage3_max_reuse_distance"), prefetch_bucket=number("stage3_prefetch_bucket_size"))


def refuse_unless_it_fits(shape: Shape, setting: Setting, *, host_bytes: int, accelerator_bytes: int | None,
                          where: str) -> Estimate:
    """The estimate of ``setting`` when it fits a machine of ``host_bytes`` (its workers all on it)
    and, on a GPU, ``accelerator_bytes`` a worker; else a ``ConfigError`` with the estimate and the
    nearest setting that fits on that machine (``setting_that_fits``, as few as one worker), or none."""
    from pipelines.errors import ConfigError

    e = estimate(shape, setting)
    if fits(shape, setting, host_bytes=host_bytes, accelerator_bytes=accelerator_bytes,
            workers_per_host=setting.workers):
        return e
    need = (f"{e.accelerator / GIB:.1f} GiB of accelerator memory a worker (it has "
            f"{(accelerator_bytes or 0) / GIB:.1f} GiB)" if setting.on_cuda and accelerator_bytes is not None
            and e.accelerator > HEADROOM * accelerator_bytes else
            f"{host_bytes_needed(e, setting.workers) / GIB:.1f} GiB of host memory for its {setting.workers} "
            f"worker(s) (up to {e.host / GIB:.1f} GiB each; {host_bytes / GIB:.1f} GiB available, of which "
            f"{HEADROOM:.0%} is planned on)")
    better = setting_that_fits(shape, setting, host_bytes=host_bytes, accelerator_bytes=accelerator_bytes,
                               max_workers=setting.workers, min_workers=1)
    advice = (f"this would fit: {better.describe()} (estimated "
              f"{host_bytes_needed(estimate(shape, better), better.workers) / GIB:.1f} GiB of host memory)"
              if better is not None else
              "no stage, offload or micro-batch fits on this machine: use machines with more memory "
              "(a cluster's workers each hold 1/N of the model under ZeRO-3), or a smaller model")
    raise ConfigError(
        f"{where}: a {shape.parameters / 1e6:,.0f}M-parameter model under {setting.describe()} would need {need}: "
        f"{e.parts()} (ZeRO's per-worker formula, pipelines/memory.py); {advice}")
