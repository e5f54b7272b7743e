"""One training step, the same for one process and for many.

A batch of ``B`` images ``x_i`` with labels ``y_i`` is split among the processes (one
process holds all of it); each process computes, on its share ``S_r``,

    L_r = (1 / B) * sum_{i in S_r} CE(f(x_i), y_i),

and back-propagates it. The gradients of the ``L_r`` summed over the processes are the
gradient of the whole batch's mean cross-entropy ``L = sum_r L_r``, which every process
then holds; each takes the same optimizer step. With one process the sum has one term,
and nothing is communicated: the only part of the step that differs between one and many
processes is that sum of the gradients (during the backward pass, by the
:class:`~torch.nn.parallel.DistributedDataParallel` wrapper, or by one all-reduce after
it; see :mod:`cnnkit.training.distributed`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cnnkit.training.distributed import SINGLE, World


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    clip: float | None = None,
    *,
    world: World | None = None,
    batch_images: int | None = None,
) -> tuple[float, int]:
    """One gradient step on a batch; returns ``(mean loss, number correct)``.

    ``images`` ``(n, C, H, W)`` and ``labels`` ``(n,)`` are this process's share of a
    batch of ``batch_images`` images (default: ``n`` times the number of processes in
    ``world``, which defaults to this one process alone). The loss is the mean
    cross-entropy of the logits over the whole batch; the returned loss and count are
    the whole batch's. With ``clip``, the gradient of all parameters together is scaled
    down to a Euclidean norm of at most ``clip`` before the step. If the loss or the
    gradient's norm is NaN or infinite, the step is not taken and
    :class:`NonFiniteLossError` is raised (the caller adds where).

    With several processes, ``n`` may be 0, and ``model`` should be the wrapper from
    :meth:`World.data_parallel`, which sums the gradients during the backward pass; a
    plain module has its gradients summed by one all-reduce after it.
    """
    world = SINGLE if world is None else world
    wrapped = isinstance(model, DistributedDataParallel)
    module = model.module if wrapped else model
    module.train()
    total = len(labels) * world.size if batch_images is None else batch_images
    if total < 1:
        raise ValueError(f"the batch must hold at least one image, got {total}")
    # The wrapper needs every process to run the model; a share is empty only when the
    # batch holds fewer images than there are processes. Unsynchronized, the model runs
    # unwrapped: the wrapper's forward may communicate (it rebuilds its buckets after
    # the first step), which a process without images would not match.
    synced = wrapped and total >= world.size
    device = next(module.parameters()).device
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, correct)
    with model.no_sync() if wrapped and not synced else contextlib.nullcontext():
        share_loss = None
        if len(labels):
            logits = (model if synced else module)(images)  # (n, classes)
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
            share_loss = loss_sum / total
            stats[0] = loss_sum.detach()
            stats[1] = (logits.detach().argmax(dim=1) == labels).sum()
        world.all_reduce_sum(stats, "summing the batch's loss")
        value = float(stats[0]) / total
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the loss is {value}")
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if share_loss is not None:
            with world.collective("summing the gradients"):
                share_loss.backward()
    if not synced:
        world.all_reduce_gradients(module.parameters(), "summing the gradients")
    if clip is not None:
        norm = float(nn.utils.clip_grad_norm_(module.parameters(), clip))
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"the gradient's norm is {norm}")
    optimizer.step()
    _after_step(module)
    return value, int(stats[1])


def _after_step(model: nn.Module) -> None:
    """Re-impose tied weights after the optimizer moved them, if the model has ties."""
    project = getattr(model, "project_ties", None)
    if callable(project):
        with torch.no_grad():
            project()
