"""Where a run computes: the device, and the number of CPU threads of each process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cnnkit.training.config import TrainConfig
from cnnkit.training.distributed import World, threads_per_process


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but this torch build sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', got {name!r}")
    return torch.device(name)


def threads_for(config: TrainConfig, world: World) -> int | None:
    """``config.threads``; unset with several processes: the CPUs shared among this
    machine's processes."""
    if config.threads is None and world.active:
        return threads_per_process(world.local_size)
    return config.threads


@contextlib.contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block (unchanged when ``None``)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
