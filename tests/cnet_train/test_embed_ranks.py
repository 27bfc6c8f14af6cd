"""`cnet-train embed` finds its rank and world through Lightning's cluster environments:
torchrun's variables first, then SLURM's `srun` tasks, else the process alone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from unittest import mock

import pytest
from lightning.fabric.utilities.rank_zero import rank_zero_only

from cnet_train.embed import cluster_environment, rank_and_world

OUTER = dict(os.environ)
"""The environment before any test of this file ran."""
TORCHRUN = {"TORCHELASTIC_RUN_ID": "r1", "WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "1"}
SRUN = {
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_JOB_NAME": "embed",
    "SLURM_JOB_ID": "4242",
    "SLURM_NODELIST": "gpu[3-4]",
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The whole environment is restored afterwards, not only what the test sets: Lightning's
    # SLURM environment writes MASTER_ADDR itself, and a leaked MASTER_ADDR sends every later
    # multi-process launch of the session to a host that does not exist.
    with mock.patch.dict(os.environ):
        for name in [*TORCHRUN, *SRUN, "MASTER_ADDR", "MASTER_PORT"]:
            os.environ.pop(name, None)
        # Lightning's environment sets the process's rank for its rank-zero-only functions.
        rank = getattr(rank_zero_only, "rank", 0)
        monkeypatch.setattr(rank_zero_only, "rank", rank, raising=False)
        yield


def _ranks(monkeypatch: pytest.MonkeyPatch, **variables: str) -> tuple[str, int, int, int]:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    cluster = cluster_environment()
    return type(cluster).__name__, cluster.global_rank(), cluster.local_rank(), cluster.world_size()


def test_torchrun_wins_over_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    found = _ranks(monkeypatch, **SRUN, **TORCHRUN)
    assert found == ("TorchElasticEnvironment", 2, 1, 4)


def test_srun_tasks_give_the_ranks_and_the_main_node(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _ranks(monkeypatch, **SRUN) == ("SLURMEnvironment", 5, 1, 8)
    assert cluster_environment().main_address == "gpu3"  # the first node of the allocation


def test_an_interactive_slurm_shell_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    found = _ranks(monkeypatch, **{**SRUN, "SLURM_JOB_NAME": "bash"})
    assert found == ("LightningEnvironment", 0, 0, 1)


def test_alone_or_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _ranks(monkeypatch) == ("LightningEnvironment", 0, 0, 1)
    assert rank_and_world() == (0, 1)  # no process group for one process
    by_hand = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    assert _ranks(monkeypatch, **by_hand) == ("LightningEnvironment", 1, 1, 2)


def test_no_variable_outlives_a_test() -> None:
    # Runs after the SLURM tests (file order): nothing they or Lightning set is left behind.
    for name in ("MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "WORLD_SIZE"):
        assert os.environ.get(name) == OUTER.get(name), name
