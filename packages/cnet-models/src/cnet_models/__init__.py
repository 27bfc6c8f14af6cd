"""cnet-models: model families, loading, the controlled UNet, text encoding, EMA, tiny models.

Nothing here imports lightning, and only `cnet_models.facade` imports diffusers and
transformers. Importing the package is cheap: the public names, listed once in `__init__.pyi`,
load their modules on first use.
"""

import lazy_loader

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (tool.hatch.version)

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
