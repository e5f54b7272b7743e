"""The seeded order and shifts of the training images: functions of (seed, epoch, index).

Everything random in training is a function of the run's ``seed`` and a position, never
of a generator that carries state from step to step:

- the order of the training images in epoch ``e`` is ``torch.randperm`` drawn from a
  generator seeded with a hash of ``(seed, "order", e)`` (:func:`epoch_order`);
- the shift of image ``i`` in epoch ``e`` (``augment="shift"``) is drawn for all images
  at once from a generator seeded with a hash of ``(seed, "shift", e)``, then indexed by
  ``i`` (:func:`epoch_shifts`);
- before step ``s``, torch's global generator is seeded with a hash of ``(seed, "step",
  s)`` (:func:`step_seed`), for any layer that draws random numbers (dropout).

So a checkpoint needs no generator state: the epoch and the number of batches done in it
say where to continue, and a run killed at any point (even by SIGKILL) and resumed ends,
on CPU, with weights bitwise equal to those of a run that was never interrupted.
"""

from __future__ import annotations

import hashlib

import torch

from cnnkit.data.splits import ImageSet
from cnnkit.training.distributed import World

# what a checkpoint records instead of generator states
RNG_NOTE = {
    "scheme": "derived",
    "note": "data order, shifts and per-step seeds are hashes of (seed, epoch or step); "
    "no generator state is stored",
}


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit generator seed from ``seed`` and a tag such as ``("order", epoch)``."""
    text = "/".join(str(p) for p in ("cnnkit", seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _generator(seed: int, *parts: object) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derived_seed(seed, *parts))
    return generator


def step_seed(seed: int, step: int) -> None:
    """Seed torch's global generator for step ``step`` (0-based) of the run."""
    torch.manual_seed(derived_seed(seed, "step", step))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order ``(n,)`` in which epoch ``epoch`` (0-based) visits the training images."""
    return torch.randperm(n, generator=_generator(seed, "order", epoch))


def epoch_shifts(n: int, max_shift: int, seed: int, epoch: int) -> torch.Tensor:
    """Shifts ``(n, 2)`` (rows, columns) in ``[-max_shift, max_shift]`` for epoch ``epoch``."""
    generator = _generator(seed, "shift", epoch)
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)


def max_shift_for(input_hw: tuple[int, int]) -> int:
    """Largest shift used by ``augment="shift"``: 1/14 of the shorter side, rounded
    (2 pixels for a 28×28 or 32×32 input, 6 for 83×83)."""
    return round(min(input_hw) / 14)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Move each image ``(N, C, H, W)`` by its ``(dy, dx)`` in ``shifts`` ``(N, 2)``.

    ``out[n, c, y, x] = images[n, c, clamp(y - dy), clamp(x - dx)]``: the content moves by
    ``(dy, dx)`` and the border rows and columns are repeated into the space it leaves.
    """
    n, _, h, w = images.shape
    shifts = shifts.to(images.device)
    rows = (torch.arange(h, device=images.device) - shifts[:, :1]).clamp(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=images.device) - shifts[:, 1:]).clamp(0, w - 1)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]  # (N, 1, 1)
    moved = images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return moved.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def batch_share(
    train: ImageSet,
    order: torch.Tensor,
    shifts: torch.Tensor | None,
    batch: int,
    batch_size: int,
    world: World,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(images, labels, B)``: this process's share of batch ``batch`` (0-based) of an
    epoch visited in ``order`` ``(n,)``, its images moved by ``shifts`` ``(n, 2)`` (when
    given), and the size ``B`` of the whole batch (the last of an epoch may be shorter)."""
    index = order[batch * batch_size : (batch + 1) * batch_size]  # (B,)
    mine = world.shard(index)  # (B / processes,)
    images = train.images[mine]  # (B / processes, C, H, W)
    if shifts is not None:
        images = shift_images(images, shifts[mine])
    return images, train.labels[mine], len(index)
