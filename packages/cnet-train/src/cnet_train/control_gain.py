"""Control gain: does the ControlNet use its condition yet?

ControlNet training is known to converge suddenly: for thousands of steps the training loss
looks the same before and after the ControlNet starts to follow its condition. The control gain
makes that moment visible. On a fixed held-out set, the denoising loss is measured twice with
the same latents, noise and timesteps: once with each sample's own conditioning image, once
with another sample's conditioning image of the same size (the batch's conditioning images
rolled by one; every batch comes from one bucket). The gain is the ratio

    gain = loss with another sample's condition / loss with the sample's own condition

1 means the prediction does not depend on which condition it got (a fresh ControlNet, whose
zero convolutions hide the condition, measures exactly 1); above 1 means the ControlNet uses
its condition to denoise. The losses are plain MSE against the scheduler's target (no min-SNR
weighting, no noise offset, no caption dropout), so that they mean the same in every run.

Every draw (VAE latent sample, noise, timestep) comes from a generator seeded by (seed, batch,
repeat), independent of the training step: two measurements of the same weights give the same
figures. Timesteps are stratified: sample j of repeat r draws its timestep inside range
(j + r) mod K of K equal ranges of the schedule, so every range gets its share and the
by-timestep table is complete.

The held-out set (`held_out_batches`) is a fixed, deterministic choice of samples from the
training index (or from `control_gain.index`, a separately indexed held-out dataset), cropped
as validation crops (centred, no flip). Samples taken from the training index are not removed
from training, and need not be: the gain is a paired comparison on the same samples, and what
it measures, whether the prediction for a sample depends on its own condition more than on
another's, is the skill in question whether or not the sample was seen (a ControlNet that fits
a seen pair does so through its condition). A run that wants unseen samples indexes them on
their own and names that index in `control_gain.index`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cnet_data.batch import Batch, collate_samples
from cnet_data.buckets import BucketTable, merge_small_buckets
from cnet_data.dataset import ControlNetDataset
from cnet_data.index import DatasetIndex

if TYPE_CHECKING:
    from cnet_data.embcache import EmbeddingCache
    from cnet_models.text import PromptEmbeddings
    from cnet_train.config import TrainConfig
    from cnet_train.module import ControlNetModule

HELD_OUT_SEED = 2024_09
"""Seed of the choice of held-out samples: a constant, so that runs with different training
seeds are measured on the same samples."""
_DRAW_SALT = 0x6A09E667
"""Mixed into the measurement's generator seeds, so that they differ from any training draw."""


def _at_least(minimum: int) -> Callable[[object, attrs.Attribute[Any], int], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")

    return check


@attrs.frozen
class ControlGainConfig:
    """The control-gain measurement at every validation (and by `cnet-train evaluate`)."""

    enabled: bool = True
    """Measure at every `validation.every_n_steps` steps and at the end of training (when a
    validation happens then), log `val/control_gain` and draw it in loss.png."""
    samples: int = attrs.field(default=16, validator=_at_least(2))
    """Held-out samples measured (at least 2; a bucket with one chosen sample gets a partner,
    so a few more may be measured)."""
    repeats: int = attrs.field(default=4, validator=_at_least(1))
    """Draws of noise and timestep per sample; more repeats, less noise in the figure."""
    timestep_ranges: int = attrs.field(default=4, validator=_at_least(1))
    """Equal ranges of the noise schedule the timesteps are stratified over and reported by."""
    batch_size: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_at_least(2))
    )
    """Samples per measured batch (at least 2: the shuffled condition comes from another sample
    of the batch); None: `data.batch_size`, or 2 if that is 1."""
    index: Path | None = None
    """A dataset index (`cnet-data index`) of held-out samples kept out of training; None:
    samples chosen from the training index (see the module docstring for why that is sound)."""


@attrs.frozen
class TimestepRange:
    """The two losses over the timesteps in [low, high)."""

    low: int
    high: int
    true_loss: float
    shuffled_loss: float
    draws: int = 0
    """How many (sample, repeat) draws fell in this range."""

    @property
    def gain(self) -> float:
        return self.shuffled_loss / self.true_loss


@attrs.frozen
class ControlGain:
    """The control gain of one set of weights on one held-out set."""

    true_loss: float
    """Mean denoising loss with each sample's own condition."""
    shuffled_loss: float
    """Same latents, noise and timesteps, another sample's condition of the same size."""
    by_timestep: tuple[TimestepRange, ...]
    """The same two losses per timestep range (ranges with no draw left out)."""

    @property
    def gain(self) -> float:
        """Shuffled-condition loss over true-condition loss: above 1 when the condition helps."""
        return self.shuffled_loss / self.true_loss

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return {
            "gain": self.gain,
            "true_loss": self.true_loss,
            "shuffled_loss": self.shuffled_loss,
            "by_timestep": [{**attrs.asdict(r), "gain": r.gain} for r in self.by_timestep],
        }


# -- the held-out set ---------------------------------------------------------------------------


def held_out_batches(
    config: TrainConfig, *, samples: int | None = None, batch_size: int | None = None
) -> list[Batch]:
    """The fixed held-out set of `config`, as batches like the training loader's (one bucket
    per batch, at least 2 samples each), cropped as for validation (centred, no flip).

    From `control_gain.index` if set, else from the training index (built if missing). The
    choice is a pure function of the index and `samples`: the same batches at every call."""
    from cnet_train.data import ensure_index, run_buckets  # cnet_train.data imports config

    settings = config.control_gain
    index = DatasetIndex(settings.index if settings.index is not None else ensure_index(config))
    if len(index) < 2:
        raise ValueError(
            f"the control gain needs at least 2 held-out samples; {index.directory} has "
            f"{len(index)}"
        )
    table = BucketTable.from_config(run_buckets(config).config)
    # Every bucket keeps at least 2 samples, so a sample always has a partner of its size.
    ids, _ = merge_small_buckets(table.assign(index.widths, index.heights), 2, table.log_aspects)
    chosen = choose_samples(ids, samples or settings.samples)
    dataset = ControlNetDataset(
        index, table, ids, train=False, augment=config.data.augment, seed=config.seed
    )
    size = max(2, batch_size or settings.batch_size or config.data.batch_size)
    return [
        collate_samples([dataset[int(i)] for i in chunk])
        for bucket in sorted({int(ids[i]) for i in chosen})
        for chunk in _chunks([i for i in chosen if ids[i] == bucket], size)
    ]


def held_out_captions(config: TrainConfig) -> list[str]:
    """The captions of the control gain's own held-out index (`control_gain.index`; none
    where the held-out set is drawn from the training index)."""
    if config.control_gain.index is None:
        return []
    index = DatasetIndex(config.control_gain.index)
    return [index.caption(i) for i in range(len(index))]


def check_held_out_cached(config: TrainConfig, cache: EmbeddingCache) -> None:
    """Refuse a cache that lacks captions of the control gain's own held-out index
    (`control_gain.index`); the training index's are in it by construction (`cnet-train
    embed` adds both)."""
    from cnet_data.captions import caption_key
    from cnet_train.errors import CacheIncompleteError

    captions = dict.fromkeys(held_out_captions(config))
    missing = [c for c in captions if caption_key(c) not in cache]
    if missing:
        raise CacheIncompleteError(
            f"the embedding cache {cache.directory} lacks {len(missing)} caption(s) of "
            f"control_gain.index {config.control_gain.index} (e.g. {missing[0]!r}): run "
            "`cnet-train embed CONFIG` again to add them (it skips what is cached)"
        )


def choose_samples(bucket_ids: npt.NDArray[np.int64], count: int) -> list[int]:
    """`count` indices spread over the dataset by a fixed permutation, plus, for a bucket
    chosen only once, its next sample in that order (its partner of the same size)."""
    order = np.random.default_rng(HELD_OUT_SEED).permutation(bucket_ids.size)
    chosen = [int(i) for i in order[:count]]
    counts: dict[int, int] = {}
    for i in chosen:
        counts[int(bucket_ids[i])] = counts.get(int(bucket_ids[i]), 0) + 1
    for bucket, n in counts.items():
        if n == 1:
            partner = next(int(i) for i in order[count:] if bucket_ids[i] == bucket)
            chosen.append(partner)
    return sorted(chosen)


def _chunks(members: list[int], size: int) -> list[list[int]]:
    """`members` in chunks of `size`; a last chunk of one joins the one before (it would have
    no partner)."""
    chunks = [members[i : i + size] for i in range(0, len(members), size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2].extend(chunks.pop())
    return chunks


# -- the measurement ----------------------------------------------------------------------------


def measure_control_gain(
    module: ControlNetModule,
    batches: Iterable[Batch],
    *,
    seed: int = 0,
    repeats: int = 4,
    timestep_ranges: int = 4,
) -> ControlGain:
    """The control gain of `module`'s ControlNet on `batches` (each of at least 2 samples of
    one size), with no gradient, the ControlNet in eval mode (restored after) and fixed draws.

    Collective under several processes: every rank must call it with the same batches; each
    measures its share (every world-size-th batch, padded so that all ranks run the same
    number of forwards, as a sharded ControlNet needs) and the sums are all-reduced."""
    batches = list(batches)
    if not batches:
        raise ValueError("the control gain needs at least one held-out batch")
    sizes = [_batch_size(b) for b in batches]
    offsets = np.cumsum([0, *sizes])
    bounds = _range_bounds(module.schedule.num_train_timesteps, timestep_ranges)
    sums = torch.zeros(len(bounds), 3, dtype=torch.float64, device=module.device)
    controlnet = module.controlnet
    was_training = controlnet.training
    controlnet.eval()
    try:
        with torch.no_grad():
            for number, counted in _share(len(batches)):
                text = _text_conditioning(module, batches[number])  # the same in every repeat
                for repeat in range(repeats):
                    g = _generator(module.device, seed, number, repeat)
                    start = int(offsets[number]) + repeat
                    true, shuffled, which = _paired_losses(
                        module, batches[number], text, g, bounds=bounds, start=start
                    )
                    if counted:
                        rows = torch.stack([true, shuffled, torch.ones_like(true)], dim=1)
                        sums.index_add_(0, which, rows.to(torch.float64))
    finally:
        controlnet.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return _summary(sums.cpu(), bounds)


def _batch_size(batch: Batch) -> int:
    n = int(batch["conditioning_image"].shape[0])
    if n < 2:
        raise ValueError(
            "a control-gain batch needs at least 2 samples (the shuffled condition is another "
            "sample's of the same size); use held_out_batches, or batches of 2 or more"
        )
    return n


def _share(count: int) -> list[tuple[int, bool]]:
    """This rank's batch numbers, with whether each counts: every rank gets the same number,
    a rank short of batches repeating one whose figures it then drops."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    own = list(range(rank, count, world))
    per_rank = -(-count // world)
    pad = own[-1] if own else 0
    return [(b, True) for b in own] + [(pad, False)] * (per_rank - len(own))


def _range_bounds(num_timesteps: int, ranges: int) -> list[tuple[int, int]]:
    ranges = min(ranges, num_timesteps)
    edges = [k * num_timesteps // ranges for k in range(ranges + 1)]
    return list(itertools.pairwise(edges))


def _generator(device: torch.device, seed: int, number: int, repeat: int) -> torch.Generator:
    mixed = (((seed * 1_000_003 + number) * 1031 + repeat) * 4099) ^ _DRAW_SALT
    return torch.Generator(device=device).manual_seed(mixed % (2**63))


def _paired_losses(
    module: ControlNetModule,
    batch: Batch,
    text: PromptEmbeddings,
    g: torch.Generator,
    *,
    bounds: Sequence[tuple[int, int]],
    start: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample losses with the own and with the rolled condition, and each sample's
    timestep range; sample i draws in range (start + i) mod K."""
    device = module.device
    images = batch["image"].to(device)
    n = images.shape[0]
    with torch.autocast(device.type, enabled=False):
        latents = module.encode_images(images, g)
    noise = torch.randn(latents.shape, generator=g, device=device, dtype=latents.dtype)
    which = (torch.arange(n, device=device) + start) % len(bounds)
    low = torch.tensor([lo for lo, _ in bounds], device=device)[which]
    high = torch.tensor([hi for _, hi in bounds], device=device)[which]
    u = torch.rand(n, generator=g, device=device)
    timesteps = torch.minimum(low + (u * (high - low)).long(), high - 1)
    noisy = module.schedule.add_noise(latents, noise, timesteps)
    target = module.schedule.target(latents, noise, timesteps)
    added = module.added_conditioning(batch, text)
    condition = batch["conditioning_image"].to(device)
    losses = []
    for control in (condition, condition.roll(1, dims=0)):
        with module.autocast():
            prediction = module.controlled(
                noisy,
                timesteps,
                text.prompt_embeds,
                control,
                conditioning_scale=module.config.conditioning.scale,
                added=added,
            )
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        losses.append(error.mean(dim=tuple(range(1, error.ndim))))
    return losses[0], losses[1], which


def _text_conditioning(module: ControlNetModule, batch: Batch) -> PromptEmbeddings:
    """Each sample's own caption, never dropped (from the cache when the run has one), encoded
    outside autocast like the training step's."""
    with torch.autocast(module.device.type, enabled=False):
        if module.cache is None:
            return module.prompt_encoder.encode(list(batch["caption"]))
        return _cached_text(module, module.cache, batch)


def _cached_text(module: ControlNetModule, cache: EmbeddingCache, batch: Batch) -> PromptEmbeddings:
    from cnet_models.text import PromptEmbeddings

    stored = cache.get_many(list(batch["caption_key"]))
    dtype = module.unet.dtype
    pooled = stored.get("pooled_prompt_embeds")
    return PromptEmbeddings(
        stored["prompt_embeds"].to(module.device, dtype),
        None if pooled is None else pooled.to(module.device, dtype),
    )


def _summary(sums: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> ControlGain:
    total = sums.sum(dim=0)
    if total[2] == 0:
        raise ValueError("the control gain measured no sample")
    ranges = tuple(
        TimestepRange(low, high, float(row[0] / row[2]), float(row[1] / row[2]), draws=int(row[2]))
        for (low, high), row in zip(bounds, sums, strict=True)
        if row[2] > 0
    )
    return ControlGain(float(total[0] / total[2]), float(total[1] / total[2]), ranges)


def format_gain_line(step: int, gain: ControlGain) -> str:
    """The one console line of a measurement during training."""
    return (
        f"step {step}: control gain {gain.gain:.3f} (loss {gain.true_loss:.4g} own condition, "
        f"{gain.shuffled_loss:.4g} shuffled)"
    )


def format_table(gain: ControlGain, title: str = "") -> str:
    """The overall figures and the by-timestep table, for `cnet-train evaluate`."""
    lines = [title] if title else []
    lines.append(
        f"control gain {gain.gain:.4f}   loss own condition {gain.true_loss:.6g}   "
        f"shuffled {gain.shuffled_loss:.6g}"
    )
    lines.append(f"{'timesteps':>12}  {'draws':>5}  {'own':>10}  {'shuffled':>10}  {'gain':>7}")
    for r in gain.by_timestep:
        span = f"{r.low}-{r.high - 1}"
        lines.append(
            f"{span:>12}  {r.draws:>5}  {r.true_loss:>10.5g}  {r.shuffled_loss:>10.5g}  "
            f"{r.gain:>7.4f}"
        )
    return "\n".join(lines)
