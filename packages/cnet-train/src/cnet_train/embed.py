"""`cnet-train embed`: the text-embedding cache of a dataset's captions.

Run once before training (alone, or under torchrun to shard the work over GPUs); never inside
the training job. Resumable: keys already in the cache are skipped. The empty prompt is always
included, because caption dropout swaps it in at every step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment
from lightning.fabric.plugins.environments.lightning import LightningEnvironment
from lightning.fabric.plugins.environments.slurm import SLURMEnvironment
from lightning.fabric.plugins.environments.torchelastic import TorchElasticEnvironment
from tqdm import tqdm

from cnet_data.captions import caption_key
from cnet_data.embcache import EmbeddingCacheWriter, FieldSpec, finalize
from cnet_data.index import DatasetIndex
from cnet_models.loading import load_base_model
from cnet_models.text import PromptEncoder
from cnet_train.config import TrainConfig
from cnet_train.control_gain import held_out_captions
from cnet_train.data import ensure_index
from cnet_train.precision_auto import settle_here


def cache_fields(encoder: PromptEncoder) -> list[FieldSpec]:
    """The record layout the encoder's outputs need."""
    probe = encoder.empty_prompt()
    dtype = str(probe.prompt_embeds.dtype).removeprefix("torch.")
    fields = [FieldSpec("prompt_embeds", tuple(probe.prompt_embeds.shape[1:]), dtype)]
    if probe.pooled_prompt_embeds is not None:
        pooled = probe.pooled_prompt_embeds
        fields.append(FieldSpec("pooled_prompt_embeds", tuple(pooled.shape[1:]), dtype))
    return fields


def embed_captions(config: TrainConfig) -> int:
    """Encode every caption not yet in the cache; returns how many this rank added."""
    config = settle_here(config)  # the dtype the run on this machine reads the cache in
    if config.cache.path is None:
        raise ValueError("cache.path is not set: say where the embedding cache goes")
    rank, world = rank_and_world()
    if rank == 0:  # one rank builds a missing index; the others wait for it
        ensure_index(config)
    barrier()
    index = DatasetIndex(ensure_index(config))
    base = load_base_model(config.model)
    device = compute_device()
    for encoder in base.text_encoders:
        module: torch.nn.Module = encoder  # transformers' `to` is typed in a way mypy rejects
        module.to(device)
    prompts = base.prompt_encoder()
    writer = EmbeddingCacheWriter(
        config.cache.path,
        fingerprint=prompts.fingerprint(config.model.source),
        fields=cache_fields(prompts),
        rank=rank,
    )
    added = 0
    with writer:
        for captions in _batches(_captions(config, index), rank, world, config.cache.batch_size):
            missing = set(writer.missing([caption_key(c) for c in captions]))
            todo = list(dict.fromkeys(c for c in captions if caption_key(c) in missing))
            if todo:
                encoded = prompts.encode(todo)
                tensors = {"prompt_embeds": encoded.prompt_embeds}
                if encoded.pooled_prompt_embeds is not None:
                    tensors["pooled_prompt_embeds"] = encoded.pooled_prompt_embeds
                added += writer.add([caption_key(c) for c in todo], tensors)
    barrier()
    if rank == 0:
        finalize(config.cache.path)
    return added


def _captions(config: TrainConfig, index: DatasetIndex) -> list[str]:
    """The captions a run reads from the cache: the training index's, then those of the
    control gain's own held-out index (measured with cached embeddings too, in training and
    by `cnet-train evaluate`)."""
    return [index.caption(i) for i in range(len(index))] + held_out_captions(config)


def _batches(captions: list[str], rank: int, world: int, size: int) -> Iterator[list[str]]:
    """This rank's share of the captions (the empty prompt on rank 0), with a progress bar."""
    mine = range(rank, len(captions), world)
    batch: list[str] = [""] if rank == 0 else []
    for i in tqdm(mine, desc=f"embedding (rank {rank})", unit="caption", disable=rank != 0):
        batch.append(captions[i])
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def cluster_environment() -> ClusterEnvironment:
    """Lightning's view of where this process sits: torchrun's ranks first (a torchrun inside a
    SLURM allocation starts its own processes, whatever SLURM's variables say), then the tasks
    of `srun`, else one process alone."""
    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect():
        return SLURMEnvironment(auto_requeue=False)  # embed is rerun, not requeued
    # Started by hand with torch.distributed's variables, or alone (world 1, rank 0).
    alone = LightningEnvironment()
    alone.set_world_size(int(os.environ.get("WORLD_SIZE", "1")))
    alone.set_global_rank(int(os.environ.get("RANK", "0")))
    return alone


def rank_and_world() -> tuple[int, int]:
    """This process's (rank, world size), joining the process group of a multi-process launch."""
    cluster = cluster_environment()
    world = cluster.world_size()
    if world > 1 and not dist.is_initialized():
        # SLURM's environment derives the address and port from the job (and sets them).
        os.environ["MASTER_ADDR"] = cluster.main_address
        os.environ["MASTER_PORT"] = str(cluster.main_port)
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            rank=cluster.global_rank(),
            world_size=world,
        )
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def compute_device() -> torch.device:
    """This rank's GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", cluster_environment().local_rank())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if dist.is_initialized():
        dist.barrier()
