"""Per-step work that never makes the host wait for the GPU.

A training step queues its kernels and returns; the host prepares the next batch while the GPU
runs. Reading a device value (`.item()`, `.tolist()`, `float(t)`, `bool(t)`) or copying from
pageable host memory to the device (PyTorch synchronises the stream after such a copy) stops
the host until the GPU has caught up, every step. These helpers do the step's host-side work
without either.
"""

from __future__ import annotations

import random

import torch


def dropout_draws(count: int, probability: float, generator: torch.Generator) -> list[bool]:
    """Which of `count` captions to drop, each with `probability`: drawn on the host from the
    seed of `generator` (its initial seed is host state, also for a CUDA generator), so a pure
    function of that seed that reads nothing from the device and leaves `generator` as it was."""
    draws = random.Random(generator.initial_seed())
    return [draws.random() < probability for _ in range(count)]


def to_device(
    tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`tensor` (on the host) on `device` in `dtype`: on CUDA through page-locked memory and an
    asynchronous copy, which does not wait for the GPU as a copy from pageable memory does."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device, dtype)
    # The dtype changes on the device: a conversion on the way would stage through pageable
    # memory again.
    return tensor.pin_memory().to(device, non_blocking=True).to(dtype=dtype)
