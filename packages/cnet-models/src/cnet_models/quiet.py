"""Filters of library notices that cnet makes expected, installed on import of this module.

Imported by `cnet_models.facade` before it imports diffusers and transformers, since the
notices come from those imports. Each filter drops one message of one logger, nothing else:

- transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`" (and the same for Siglip), printed when diffusers' pipeline modules
  import the image processors. cnet never uses them (no safety checker, no IP-Adapter), and
  torchvision is no dependency of cnet: there is nothing to install or change.
- DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable
  to detect it", printed when transformers' `save_pretrained` imports DeepSpeed (if installed)
  on a machine without CUDA. cnet chooses devices through Lightning and its own preflight check,
  which names the devices the machine has; DeepSpeed's own accelerator pick is not used.
- diffusers' "There are modules in UNet2DConditionModel that should be kept in float32: []"
  when a model is cast with `to(dtype)`, as the memory plan casts its meta-device networks:
  with an empty list there is nothing kept in float32 to be inconsistent about.
"""

from __future__ import annotations

import logging

from typing_extensions import override

_DROPPED = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "DeepSpeed": "Setting accelerator to CPU. If you have GPU or other accelerator",
    "diffusers.models.modeling_utils": "that should be kept in float32: []. Casting directly",
}
"""Logger name -> a fragment that only the expected notice's message contains."""


class DropMessage(logging.Filter):
    """Drops the records whose message contains `fragment`; lets every other record through."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def install() -> None:
    """Add each filter to its logger, once (the loggers are created here if need be: the
    library that logs later gets the same logger object, filter included)."""
    for name, fragment in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(DropMessage(fragment))


install()
