"""cnet-data: buckets, the bucket batch sampler, the paired dataset and embedding caches.

Importing the package is cheap: the public names, listed once in `__init__.pyi`, load their
modules (and torch) only when first used, so `cnet-data --help` and the index tools start fast.
lazy_loader also keeps `cnet_data.scan` the function after `import cnet_data.scan` (the
submodule of the same name would otherwise replace it on the package).
"""

import lazy_loader

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (tool.hatch.version)

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
