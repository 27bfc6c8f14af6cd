"""Model families as specs, registered by name: what differs between SD 1.5, SD 2.1 and SDXL.

A `ModelFamily` holds what is a property of the architecture (its parts, its default
resolution) and does what differs between families: how prompts are encoded, what added
conditioning the UNet takes, which pipeline renders it, how its tiny models are shaped, how its
UNet config is recognised. Everything else branches on nothing: it asks the spec. A new
family or variant is one new spec (`register_family`, or a module in `_BUILT_IN_SPECS`) plus
its name in `FamilyName`.

Everything a model folder states about itself (prediction type, VAE scaling factor,
`force_upcast`, cross-attention width) is read from that folder when it is loaded, never
assumed from the family.

This module imports neither diffusers nor torch: the built-in specs (`family_sd`,
`family_sdxl`) load on the first look-up, so naming a family (a config) stays cheap.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import attrs
from typing_extensions import override

if TYPE_CHECKING:
    import torch

    from cnet_models.conditioning import AddedConditioning, PromptEmbeddings
    from cnet_models.facade import (
        CLIPTokenizer,
        ControlNetModel,
        EulerDiscreteScheduler,
        TextEncoder,
    )
    from cnet_models.loading import BaseModel
    from cnet_models.pipelines import ControlNetPipeline

FamilyName = Literal["sd15", "sd21", "sdxl"]
"""The family names a training config accepts (its schema lists them). Every registered family
is named here and every name here is registered: a test keeps the two equal."""
FAMILY_NAMES: tuple[FamilyName, ...] = get_args(FamilyName)

UnconditionalChoice = Literal["auto", "empty_prompt", "zeros"]
"""What stands in for a dropped caption (and for the unconditional input at validation):
`auto` is what the family's pipeline does at inference (`zeros_for_empty_prompt`), the other
two force the encoded empty prompt or all-zero embeddings."""

_BUILT_IN_SPECS = ("cnet_models.family_sd", "cnet_models.family_sdxl")
"""Modules of the shipped families, each listing its specs in `SPECS`; registered in this
order (whatever order they were imported in) before any other family."""


def _same_length(
    spec: ModelFamily, attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    if len(value) != len(spec.text_encoders):
        raise ValueError(
            f"family {spec.name}: {attribute.name} has {len(value)} entries, expected one per "
            f"text encoder ({len(spec.text_encoders)})"
        )


@attrs.frozen(kw_only=True)
class ModelFamily(abc.ABC):
    """What an architecture family fixes, and the behaviour that differs between families."""

    name: str
    """The registry name, as a config's `model.family` names it."""
    text_encoders: tuple[str, ...]
    """Subfolders of the text encoders, in the order their outputs are concatenated."""
    tokenizers: tuple[str, ...] = attrs.field(validator=_same_length)
    """Subfolders of the matching tokenizers."""
    default_resolution: int
    """Side of the square training resolution the base model was trained at."""
    upcast_attention_in_half: bool
    """SD 2.x overflows in float16 attention unless attention is computed in float32."""
    pipeline: str
    """The diffusers text-to-image pipeline class of the family."""
    controlnet_pipeline: str
    """The diffusers ControlNet pipeline class of the family."""
    zeros_for_empty_prompt: bool | None
    """What the family's pipeline feeds as the unconditional input of classifier-free guidance
    when no negative prompt is given. None: the pipeline has no choice, it encodes the empty
    prompt (SD 1.x / 2.x). True or False: the default of the pipeline's
    `force_zeros_for_empty_prompt` (SDXL: True, all-zero embeddings, pooled too), which a model
    folder's `model_index.json` may set otherwise (see `pipeline_zeros`)."""
    tiny_pad_tokens: tuple[str, ...] = attrs.field(validator=_same_length)
    """What each tokenizer pads with, in `tokenizers` order: OpenAI's CLIP-L its end token,
    OpenCLIP's "!"; the tiny models' tokenizers copy it."""
    arch_folder: str = attrs.field(default=attrs.Factory(lambda spec: spec.name, takes_self=True))
    """The folder of its full-size architecture configs, `archs/<arch_folder>/<part>.json`."""

    @property
    def default_bucket_area(self) -> int:
        """The pixel area of its aspect-ratio buckets: the default resolution squared."""
        return self.default_resolution**2

    @property
    @abc.abstractmethod
    def hidden_state(self) -> str:
        """Which hidden state of the text encoders conditions the UNet, as the embedding
        cache's fingerprint records it ("last", "penultimate")."""

    @abc.abstractmethod
    def matches(self, unet_config: Mapping[str, Any]) -> bool:
        """Whether a UNet config (full-size or tiny) is of this family, from structural fields."""

    @abc.abstractmethod
    def has_projection(self, index: int) -> bool:
        """Whether text encoder `index` is a `CLIPTextModelWithProjection`."""

    @abc.abstractmethod
    def encode_prompts(
        self,
        tokenizers: Sequence[CLIPTokenizer],
        encoders: Sequence[TextEncoder],
        prompts: list[str],
    ) -> PromptEmbeddings:
        """The embeddings of `prompts`, exactly as the family's pipeline's `encode_prompt`."""

    @abc.abstractmethod
    def added_conditioning(
        self,
        text: PromptEmbeddings,
        original_size: torch.Tensor,
        crop_top_left: torch.Tensor,
        target_size: torch.Tensor,
    ) -> AddedConditioning | None:
        """The UNet's added conditioning for a batch, from its text embeddings and per-sample
        (batch, 2) sizes and crop offsets; None for a family whose UNet takes none."""

    @abc.abstractmethod
    def build_controlnet_pipeline(
        self,
        base: BaseModel,
        controlnet: ControlNetModel,
        scheduler: EulerDiscreteScheduler,
        zeros: bool,
    ) -> ControlNetPipeline:
        """The family's ControlNet pipeline over `base`'s loaded parts; `zeros`: whether its
        unconditional input is all-zero embeddings rather than the encoded empty prompt."""

    @abc.abstractmethod
    def negative_prompt_embeds(self, pipe: ControlNetPipeline, zeros: bool) -> torch.Tensor | None:
        """The negative embeddings to pass to `pipe` for that unconditional input; None: the
        pipeline makes the right one itself."""

    @abc.abstractmethod
    def tiny_unet_config(
        self, config: dict[str, Any], text_configs: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """A shrunk UNet config (sizes and cross-attention width already set) with the
        family's own tiny changes: its block layout, its added-embedding input size."""

    @abc.abstractmethod
    def model_index_entries(self) -> dict[str, Any]:
        """The family's own entries of a tiny model folder's `model_index.json`."""

    def pipeline_zeros(self, model_index: Callable[[], Mapping[str, Any] | None]) -> bool:
        """Whether the family's pipeline, for a folder whose `model_index.json` the call
        `model_index()` returns (None: none could be read), feeds all-zero embeddings as the
        unconditional input. The folder's `force_zeros_for_empty_prompt` counts only where the
        pipeline reads it (and the folder is read only then)."""
        if self.zeros_for_empty_prompt is None:
            return False
        stored = (model_index() or {}).get("force_zeros_for_empty_prompt")
        return self.zeros_for_empty_prompt if stored is None else bool(stored)


Family = ModelFamily
"""The former name of the spec base class."""

_REGISTRY: dict[str, ModelFamily] = {}


def _registry() -> dict[str, ModelFamily]:
    """The registry, with the built-in families registered on the first call."""
    if not _REGISTRY:
        specs: list[ModelFamily] = []
        for module in _BUILT_IN_SPECS:
            specs.extend(importlib.import_module(module).SPECS)
        _REGISTRY.update((spec.name, spec) for spec in specs)
    return _REGISTRY


def register_family(spec: ModelFamily) -> ModelFamily:
    """Add `spec` to the registry under its name (detection asks it after those before it)."""
    registry = _registry()
    if spec.name in registry:
        raise ValueError(f"model family {spec.name!r} is already registered")
    registry[spec.name] = spec
    return spec


def registered_families() -> tuple[ModelFamily, ...]:
    """Every registered family, in registration order."""
    return tuple(_registry().values())


def family_by_name(name: str) -> ModelFamily:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown model family {name!r}; expected one of {_names()}")
    return registry[name]


def _names() -> str:
    return ", ".join(_registry())


class _RegistryView(Mapping[str, ModelFamily]):
    """The registry as a read-only mapping, name -> spec (built-ins loaded on first use)."""

    @override
    def __getitem__(self, name: str) -> ModelFamily:
        return _registry()[name]

    @override
    def __iter__(self) -> Iterator[str]:
        return iter(_registry())

    @override
    def __len__(self) -> int:
        return len(_registry())


FAMILIES: Mapping[str, ModelFamily] = _RegistryView()


class FamilyDetectionError(ValueError):
    """A UNet config that matches no known family; name the family explicitly instead."""


def detect_family(unet_config: Mapping[str, Any]) -> ModelFamily:
    """The family of a UNet, from structural fields of its config (tiny models included): the
    first registered family whose `matches` accepts it.

    SDXL: `addition_embed_type == "text_time"`. SD 2.x: linear projections in its transformer
    blocks (`use_linear_projection`), or its 1024-wide cross-attention. SD 1.x: neither.
    """
    for spec in _registry().values():
        if spec.matches(unet_config):
            return spec
    kind = unet_config.get("addition_embed_type")
    if kind not in (None, ""):
        raise FamilyDetectionError(
            f"UNet has addition_embed_type {kind!r}, which no supported family uses; pass the "
            f"family explicitly if it is one of {_names()}"
        )
    raise FamilyDetectionError(
        f"the UNet config matches no registered family; pass the family explicitly if it is "
        f"one of {_names()}"
    )


def zeros_for_empty_prompt(family: ModelFamily, model_index: Mapping[str, Any] | None) -> bool:
    """Whether the family's pipeline, loaded from a folder with this `model_index.json` (None:
    none could be read), conditions the unconditional branch of CFG on all-zero embeddings.

    The folder's `force_zeros_for_empty_prompt` counts only where the pipeline reads it (SDXL);
    the SD 1.x / 2.x pipelines always encode the empty prompt, whatever the folder says.
    """
    return family.pipeline_zeros(lambda: model_index)


def unconditional_zeros(
    choice: UnconditionalChoice, family: ModelFamily, model_index: Mapping[str, Any] | None
) -> bool:
    """Whether `choice` means all-zero embeddings for this family and folder."""
    if choice == "auto":
        return zeros_for_empty_prompt(family, model_index)
    return choice == "zeros"
