"""Lightning's notices that a cnet run makes expected, filtered one by one.

Each filter matches one message (and its category or logger), never a whole library, so that
what is left on the console is something a user must act on. Why each is expected:

- "Found N module(s) in eval mode at the start of training": the VAE, the text encoders and
  the UNet are frozen and in eval mode on purpose; only the ControlNet trains.
- "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is
  not resumable": cnet's data module saves the bucket sampler's position in the checkpoint and
  resumes with exactly the batches not yet seen; Lightning only looks at the DataLoader.
- "The number of training batches (N) is smaller than the logging interval": Lightning counts
  the logging interval in steps across epochs (a cnet run has no epoch limit), so a small
  dataset is still logged every `trainer.log_every_n_steps` steps.
- The litlogger tip: an advertisement, printed by every Trainer.
- "GPU available: ..., used: ...", "TPU available", "HPU available", "Restoring states from
  the checkpoint path at ...", "Restored all states from the checkpoint at ..." and
  "`Trainer.fit` stopped: `max_steps=N` reached": the run's start-up and end summaries say
  which devices it uses, which checkpoint it resumes from and where it stopped
  (`cnet_train.summary`).
- Lightning's own `isinstance(treespec, LeafSpec)` FutureWarning from newer torch: inside
  Lightning's code, nothing a user can change.

- "You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a
  `LightningDataModule`": the module adds the latent cache's moments to each batch there (it
  owns the VAE the cache is checked against); the data module defines no such hook.

- "`weights_only` was not set, defaulting to `False`", logged at every checkpoint save: cnet's
  checkpoints always hold the full training state, which is that default.
"""

from __future__ import annotations

import logging
import warnings

from cnet_models.quiet import DropMessage

_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader"
    r" is not resumable",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
"""Messages (regular expressions matched at the start) of Lightning's `PossibleUserWarning`."""

_HOOK = r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in"

_PYTREE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
"""The logger of Lightning's `rank_zero_info`."""

_INFO = (
    "💡 Tip: For seamless cloud logging",
    "GPU available: ",
    "TPU available: ",
    "HPU available: ",
    "`Trainer.fit` stopped: `max_steps=",
    "Restoring states from the checkpoint path at ",
    "Restored all states from the checkpoint at ",
)
"""Fragments of the info lines dropped from Lightning's rank-zero logger."""

_CHECKPOINT_LOGGER = "lightning.pytorch.trainer.connectors.checkpoint_connector"
_CHECKPOINT_INFO = ("`weights_only` was not set, defaulting to `False`",)


def silence_expected_notices() -> None:
    """Install the filters (again is harmless: `warnings` replaces an equal filter, and each
    logging filter is added once)."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=_HOOK, category=UserWarning)
    warnings.filterwarnings(
        "ignore", message=_PYTREE, category=FutureWarning, module=r"lightning\.pytorch\.utilities"
    )
    for name, fragments in ((RANK_ZERO_LOGGER, _INFO), (_CHECKPOINT_LOGGER, _CHECKPOINT_INFO)):
        logger = logging.getLogger(name)
        for fragment in fragments:
            known = [f.fragment for f in logger.filters if isinstance(f, DropMessage)]
            if fragment not in known:
                logger.addFilter(DropMessage(fragment))
