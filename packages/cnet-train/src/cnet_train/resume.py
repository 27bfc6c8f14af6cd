"""Which checkpoint a run resumes from, and the check that every rank resumes from the same.

`resume: auto` takes the newest complete checkpoint in `RUN_DIR/checkpoints`: the names cnet
writes (`step-00000500.ckpt`) and the versioned names Lightning writes when a name is taken
(`step-00000500-v1.ckpt`). Complete means: a file that is a whole `torch.save` archive, or a
folder holding its writer's commit marker (DeepSpeed's `latest`, a distributed checkpoint's
`.metadata`). Temporary names (`.step-...partial`) are never candidates.
"""

from __future__ import annotations

import logging
import re
import socket
import zipfile
from pathlib import Path

import lightning as L
from typing_extensions import override

from cnet_train.config import TrainConfig
from cnet_train.errors import ResumeMismatchError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"step-(\d{8})(?:-v(\d+))?\.ckpt")
FOLDER_COMMIT_MARKERS = ("latest", ".metadata")
"""DeepSpeed writes `latest` after its shards; torch.distributed.checkpoint writes `.metadata`
after every rank's data."""


def checkpoint_dir(config: TrainConfig) -> Path:
    return config.run_dir / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.fullmatch(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """Whether the checkpoint at `path` was written to the end."""
    if path.is_dir():
        return any((path / marker).is_file() for marker in FOLDER_COMMIT_MARKERS)
    return path.is_file() and zipfile.is_zipfile(path)  # a torch.save archive ends whole


def committed_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints named as cnet or Lightning name them in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match:
            found.append(((int(match.group(1)), int(match.group(2) or 0)), path))
    return [path for _, path in sorted(found)]


def resume_path(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from: `auto` takes the newest complete one, if any; a path must
    exist and be complete (the config's value is already one of the choices or a path:
    `cnet_train.resume_setting`)."""
    resume = config.checkpoint.resume
    if resume == "none":
        return None
    if isinstance(resume, Path):
        path = resume.expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint.resume: {path} does not exist")
        if not is_complete(path):
            raise ValueError(f"checkpoint.resume: {path} is incomplete (torn by a crash?)")
        return path
    for path in reversed(committed_checkpoints(checkpoint_dir(config))):
        if is_complete(path):
            return path
        logger.warning("skipping incomplete checkpoint %s", path)
    return None


class ResumeAgreement(L.Callback):
    """Fails the job on every rank, naming the ranks, unless all resume from rank 0's choice.

    Each node picks its checkpoint from what its own filesystem shows. With a run_dir that is
    not shared, one node resumes and another starts fresh, and both then wait forever in
    collectives that no longer match; so before anything is restored, the ranks compare.
    """

    def __init__(self, chosen: Path | None) -> None:
        self.chosen = chosen

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        import torch.distributed as dist

        mine = (str(self.chosen) if self.chosen else None, socket.gethostname())
        views: list[object] = [None] * trainer.world_size
        dist.all_gather_object(views, mine)
        wanted = views[0][0] if isinstance(views[0], tuple) else None
        differ = [
            f"rank {rank} on {view[1]} sees {view[0] or 'no checkpoint'}"
            for rank, view in enumerate(views)
            if isinstance(view, tuple) and view[0] != wanted
        ]
        if differ:
            host0 = views[0][1] if isinstance(views[0], tuple) else "?"
            raise ResumeMismatchError(
                f"rank 0 on {host0} resumes from {wanted or 'no checkpoint (a fresh start)'} but "
                + "; ".join(differ),
                hint="run_dir must be on a filesystem every node shares (the same path on all)",
            )
