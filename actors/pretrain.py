"""``forgetless pretrain``: our own T5 / BART, pretrained on real text through the same DeepSpeed-on-Ray
worker group as a stream, written as a ``save_pretrained`` directory with a manifest.

The driver loads the corpus, cuts the held-out split, trains the tokenizer on the training documents
alone, and packs the training chunks; the Ray Train workers run ``pipelines.pretraining.Pretrainer``;
rank 0 logs the loss curve and the held-out metrics to MLflow and writes the checkpoint. A stream
whose ``model.pretrain`` names a pretrain config calls ``ensure_pretrained``: built once, then
reused from the cache.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
from ray.train import FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from tqdm.auto import tqdm

from actors.cluster import connect_ray, cpus_per_worker
from actors.trainer_group import LoopbackTorchConfig
from actors.tracking import MlflowSink, check_tracking
from pipelines.config import PretrainConfig, experiment_dict, flatten, load_pretrain_config
from pipelines.errors import ConfigError, ForgetlessError
from pipelines.redaction import redact
from pipelines.rundir import open_lock_file
from pipelines.learner import silence_library_noise
from pipelines.models import train_tokenizer
from pipelines.denoising import Corruptor, denoising_examples
from pipelines.pretraining import (
    MANIFEST,
    OBJECTIVE_VERSION,
    Pretrainer,
    chunk_tokens,
    default_output_dir,
    chunk_texts,
    load_corpus,
    pack_chunks,
    pretrain_key,
    read_manifest,
    split_corpus,
)
from storage.files import atomic_directory, write_atomic

if TYPE_CHECKING:
    from actors.launch import RunWorkers

log = logging.getLogger("forgetless")


class PretrainFailedError(ForgetlessError, RuntimeError):
    """A pretraining worker failed; the message carries why."""


def _say(message: str) -> None:
    """A line the user sees whatever the progress setting: what is built, what is reused."""
    tqdm.write(message, file=sys.stderr)


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve(config: PretrainConfig, *, cwd: Path | None = None) -> PretrainConfig:
    """Absolute paths, the default output directory and tracking store filled in."""
    base = cwd or Path.cwd()
    absolute = lambda p: str(Path(p).expanduser() if Path(p).expanduser().is_absolute()  # noqa: E731
                             else (base / Path(p).expanduser()).resolve())
    corpus = config.corpus
    if corpus.source.kind == "file":
        corpus = corpus.model_copy(update={"source": corpus.source.model_copy(
            update={"path": absolute(corpus.source.path)})})
    config = config.model_copy(update={"cache_dir": absolute(config.cache_dir), "corpus": corpus})
    mlflow = config.mlflow
    if mlflow.tracking_uri is None:
        mlflow = mlflow.model_copy(update={"tracking_uri": f"sqlite:///{base.resolve() / 'mlflow.db'}"})
    output = absolute(config.output_dir) if config.output_dir else str(default_output_dir(config))
    return config.model_copy(update={"mlflow": mlflow, "output_dir": output})


def pretrain_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One rank: pretrain, log (rank 0), write the checkpoint and manifest."""
    if not loop_config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    silence_library_noise()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config: PretrainConfig = loop_config["config"]
    pretrainer = Pretrainer(config, loop_config["tokenizer_dir"], rank=rank, world_size=world_size)
    sink = MlflowSink(config.mlflow.tracking_uri, loop_config["run_id"]) if rank == 0 else None
    started = time.perf_counter()

    missed = []

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if sink is None:
            return
        try:
            sink.log_metrics(metrics, step=step)
        except Exception as exc:  # noqa: BLE001 - an MLflow outage must not stop the pretraining
            if not missed:
                print(f"MLflow is not taking writes ({type(exc).__name__}: {redact(str(exc))}); pretraining goes on, the "
                      "manifest keeps the final held-out metrics", flush=True)
            missed.append(step)
        if "heldout_loss" in metrics:
            print(f"pretrain step {step}/{config.training.max_steps}: held-out loss {metrics['heldout_loss']:.3f}, "
                  f"masked-token accuracy {metrics['heldout_masked_token_accuracy']:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)

    try:
        result = pretrainer.train(loop_config["chunks"], loop_config["heldout"], on_log=on_log)
    except BaseException:
        pretrainer.close()
        raise
    seconds = time.perf_counter() - started
    manifest = {**loop_config["manifest"], "steps": result["steps"], "tokens_seen": result["tokens_seen"],
                "heldout": {"loss": result.get("heldout_loss"),
                            "masked_token_accuracy": result.get("heldout_masked_token_accuracy"),
                            "examples": len(loop_config["heldout"])},
                "parameters": pretrainer.num_parameters, "seconds": round(seconds, 1),
                "workers": world_size, "finished_at": time.time(), "mlflow_missed_steps": len(missed)}
    try:
        pretrainer.save(config.output_dir, extra=lambda d: write_atomic(d / MANIFEST, json.dumps(manifest, indent=2)))
    finally:
        pretrainer.close()  # a stream's worker group goes on to train the stream in this process


def _prepare(config: PretrainConfig, work: Path, progress: bool) -> dict[str, Any]:
    documents = load_corpus(config.corpus.source, config.cache_dir)
    train, heldout = split_corpus(documents, config.corpus, seed=config.seed)
    if progress:
        tqdm.write(f"corpus: {len(documents)} documents ({len(train)} to train on, {len(heldout)} held out); "
                   f"training a {config.model.tokenizer.vocab_size}-piece tokenizer on the training documents")
    tokenizer = train_tokenizer(train, arch=config.model.arch, vocab_size=config.model.tokenizer.vocab_size,
                                algorithm=config.model.tokenizer.algorithm, lossless=True,
                                num_sentinels=config.objective.num_sentinels if config.model.arch == "t5" else 0)
    with atomic_directory(work / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    chunks = chunk_tokens(tokenizer, train, config.corpus.seq_len)
    corruptor = Corruptor.build(config.model.arch, config.objective, tokenizer)
    heldout_examples = denoising_examples(chunk_texts(tokenizer, heldout, config.corpus.seq_len,
                                                        config.heldout_examples), tokenizer, corruptor, seed=config.seed)
    source = config.corpus.source
    manifest = {
        "key": pretrain_key(config), "arch": config.model.arch, "preset": config.model.preset,
        "objective": {"name": "span_corruption" if config.model.arch == "t5" else "text_infilling",
                      **config.objective.model_dump(), "version": OBJECTIVE_VERSION},
        "corpus": {"source": source.model_dump(), "documents": len(documents), "train_documents": len(train),
                   "heldout_documents": len(heldout), "train_chunks": len(chunks),
                   "train_tokens": int(sum(map(len, chunks))), "seq_len": config.corpus.seq_len,
                   "licence": ("chitchat-dataset 0.9.0 (MIT), https://github.com/BYU-PCCL/chitchat-dataset"
                               if source.kind == "builtin" else "user file")},
        "tokenizer": {"vocab_size": len(tokenizer), "trained_on": "the corpus' training documents only",
                      "lossless": True},
        "training": config.training.model_dump(), "seed": config.seed, "code_version": _code_version(),
        "config": experiment_dict(config),
    }
    return {"tokenizer_dir": str(work / "tokenizer"), "chunks": pack_chunks(chunks), "heldout": heldout_examples,
            "manifest": manifest}


def run_pretrain(config: PretrainConfig, *, progress: bool = True, workers: RunWorkers | None = None) -> Path:
    """Pretrain and write the checkpoint; returns its directory (which holds ``manifest.json``).

    A directory that already holds this config's finished checkpoint is reused as it is.
    ``workers``: the worker groups of the stream that names this config (``actors.launch.RunWorkers``):
    pretraining runs in the group the stream then trains in (one Ray Train start-up for both) when
    it asks for as many workers on the same devices. Without, in a Ray Train run of its own.

    Raises:
        ConfigError: output_dir holds something else (use overwrite=true), or bad input.
        DataError: the corpus cannot be read or is too small.
        TrackingUnreachableError: the MLflow store cannot be used.
        PretrainFailedError: a worker failed.
    """
    config = resolve(config)
    output = Path(config.output_dir)
    key = pretrain_key(config)
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_path = output.parent / f".{output.name}.lock"
    with open_lock_file(lock_path, "pretrain output_dir") as lock:  # two streams asking for one checkpoint build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(output)
        if manifest is not None and manifest.get("key") == key and not config.overwrite:
            _say(f"pretrained checkpoint {output} is already built (key {key}); reusing it")
            return output
        if output.exists() and any(output.iterdir()):
            if manifest is None:  # not a checkpoint Forgetless wrote: never replaced, overwrite or not
                raise ConfigError(f"output_dir {output} holds files that are not a pretrained checkpoint (no "
                                  f"{MANIFEST}); overwrite=true replaces only a checkpoint `forgetless pretrain` "
                                  "wrote. Choose another output_dir, or empty it yourself")
            if not config.overwrite:
                raise ConfigError(f"output_dir {output} holds another config's checkpoint (key {manifest.get('key')}); "
                                  "choose another output_dir, or pass overwrite=true to replace it")
        check_tracking(config.mlflow.tracking_uri)
        work = output.parent / f".{output.name}.work"
        prepared = _prepare(config, work, progress)
        sink = MlflowSink.start(config.mlflow.tracking_uri, config.mlflow.experiment_name,
                                run_name=config.mlflow.run_name or config.experiment,
                                tags={"forgetless.kind": "pretrain", "forgetless.output_dir": str(output),
                                      "forgetless.host": socket.gethostname(), "forgetless.pretrain_key": key})
        sink.log_params(flatten(experiment_dict(config)))
        if workers is None:
            local = connect_ray(config)
            use_gpu = config.training.use_gpu
            if use_gpu is None:
                use_gpu = ray.cluster_resources().get("GPU", 0) >= config.training.num_workers
        else:  # the stream's Ray (its config's ray block), and its worker group when the shapes agree
            group, _ = workers.group_for(config.training, lambda gpu, local: cpus_per_worker(config, gpu, local=local))
            use_gpu = group.shape.use_gpu
        if progress:
            m = prepared["manifest"]
            tqdm.write(f"pretraining a {config.model.arch}/{config.model.preset} for {config.training.max_steps} "
                       f"steps on {m['corpus']['train_chunks']} chunks ({m['corpus']['train_tokens']:,} tokens), "
                       f"{config.training.num_workers} worker(s) on {'GPU' if use_gpu else 'CPU'}; MLflow run "
                       f"{sink.run_id}")
        loop_config = {**prepared, "config": config, "run_id": sink.run_id, "use_gpu": use_gpu}
        try:
            if workers is None:
                TorchTrainer(
                    pretrain_loop_per_worker, train_loop_config=loop_config,
                    torch_config=LoopbackTorchConfig() if local else None,
                    scaling_config=ScalingConfig(num_workers=config.training.num_workers, use_gpu=use_gpu,
                                                 resources_per_worker={"CPU": cpus_per_worker(config, use_gpu,
                                                                                              local=local)}),
                    run_config=ray.train.RunConfig(name=f"pretrain-{key}", storage_path=str(work / "ray"),
                                                   failure_config=FailureConfig(max_failures=0)),
                ).fit()
            else:
                # by reference: the group's queue holds the job without importing what it calls (torch)
                group.run({"call": [ray.put((pretrain_loop_per_worker, loop_config))]})
        except KeyboardInterrupt:
            sink.end("KILLED")
            raise
        except Exception as exc:  # noqa: BLE001 - a worker failed: the run says so
            reason = str(exc).strip().splitlines()[-1][:1000] if str(exc).strip() else type(exc).__name__
            sink.set_tags({"forgetless.error": reason})
            sink.end("FAILED")
            raise PretrainFailedError(f"pretraining failed: {reason}") from None
        manifest = read_manifest(output)
        if manifest is None:
            sink.end("FAILED")
            raise PretrainFailedError(f"pretraining finished but wrote no checkpoint in {output}")
        manifest["mlflow"] = {"tracking_uri": redact(config.mlflow.tracking_uri), "run_id": sink.run_id}
        write_atomic(output / MANIFEST, json.dumps(manifest, indent=2))
        sink.log_metrics({"pretrain_seconds": manifest["seconds"]}, step=manifest["steps"])
        sink.log_artifact(output / MANIFEST)
        sink.end("FINISHED")
        return output


def ensure_pretrained(path: str, *, cache_dir: str, progress: bool = True, tracking_uri: str | None = None,
                      workers: RunWorkers | None = None) -> tuple[Path, PretrainConfig]:
    """The checkpoint a stream's ``model.pretrain`` names: built into the cache the first time (in
    the stream's ``workers`` when given: see ``run_pretrain``), reused after (and says so). The
    pretrain config's own ``cache_dir`` is replaced by the stream's."""
    config = load_pretrain_config(path, [f"cache_dir={cache_dir}"])
    if config.output_dir is not None:
        raise ConfigError(f"model.pretrain: {path} sets output_dir; a pretrain config named by a stream is built "
                          "into the cache (remove output_dir, or point model.name_or_path at that directory)")
    if tracking_uri and config.mlflow.tracking_uri is None:
        config = config.model_copy(update={"mlflow": config.mlflow.model_copy(update={"tracking_uri": tracking_uri})})
    resolved = resolve(config)
    manifest = read_manifest(resolved.output_dir)
    if manifest is not None and manifest.get("key") == pretrain_key(resolved):
        _say(f"model.pretrain: reusing the checkpoint built from {path} ({resolved.output_dir})")
        return Path(resolved.output_dir), resolved
    _say(f"model.pretrain: building {path} once into {resolved.output_dir} (later runs reuse it)")
    return run_pretrain(config, progress=progress, workers=workers), resolved
