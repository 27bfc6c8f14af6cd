# The public names of cnet-models, written once: type checkers read them here, and `__init__.py`
# builds the lazy runtime exports from these same lines (lazy_loader.attach_stub).
from .conditioning import AddedConditioning as AddedConditioning
from .conditioning import PromptEmbeddings as PromptEmbeddings
from .configs import BaseModelConfig as BaseModelConfig
from .configs import ControlNetConfig as ControlNetConfig
from .controlled import ControlledUNet as ControlledUNet
from .controlled import make_controlnet as make_controlnet
from .ema import EMAConfig as EMAConfig
from .ema import ExponentialMovingAverage as ExponentialMovingAverage
from .ema_export import export_ema_controlnet as export_ema_controlnet
from .families import FAMILIES as FAMILIES
from .families import Family as Family
from .families import ModelFamily as ModelFamily
from .families import detect_family as detect_family
from .families import family_by_name as family_by_name
from .families import register_family as register_family
from .families import registered_families as registered_families
from .family_sdxl import sdxl_time_ids as sdxl_time_ids
from .fullsize import build_fullsize as build_fullsize
from .loading import BaseModel as BaseModel
from .loading import load_base_model as load_base_model
from .noise import NoiseSchedule as NoiseSchedule
from .text import PromptEncoder as PromptEncoder
from .tiny import write_tiny_model as write_tiny_model

__version__: str
__all__: list[str]

def __dir__() -> list[str]: ...
