"""Training on several processes (one or several machines) with ``torch.distributed``.

Started by ``torchrun``, every process reads where it stands from the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``) and joins one process group: ``gloo`` when training on CPU, ``nccl`` on
CUDA (process ``LOCAL_RANK`` then uses GPU ``LOCAL_RANK``).

Equivalence by construction. Each global batch of ``B`` images is exactly the batch a
single process would use in that step (the order is a function of ``(seed, epoch)``);
process ``r`` of ``W`` takes the contiguous share ``r`` of it (``B / W`` images; ``W``
must divide ``B``; the last, shorter batch of an epoch is split as evenly as it goes,
and a share may then be empty). Each process sums the cross-entropy over its share and
divides by the global batch's size. The model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (:meth:`World.data_parallel`),
which sums the gradients over the processes while the backward pass still runs (a
communication hook makes it sum rather than average). The sum of the shares' gradients
is the gradient of the mean over the whole batch, so every process holds the
single-process gradient (up to floating-point summation order) and takes the same
optimizer step: the weights stay identical on every process without being sent again.
A step in which some share is empty (only possible on an epoch's last batch, when it
holds fewer images than processes) runs outside the wrapper's synchronization and sums
the gradients with one explicit all-reduce instead, since the wrapper needs every
process to run the model.

Why not :class:`torch.utils.data.DistributedSampler`: it deals the epoch's order out
round-robin and pads the last batch with repeated images, so on an uneven epoch end the
processes together would train on images a single process does not. Contiguous shares
of the single-process batch keep every global batch identical to it.

Only process 0 writes the run folder, the logs and the progress; every process can
read the same checkpoint to resume. Every collective waits at most
``CNNKIT_DIST_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT_S`); a process that
died or hangs makes the others stop with a :class:`DistributedError` saying so.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cnnkit.kernels import tuning

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "CNNKIT_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """The process group could not be formed, or another process stopped or did not
    answer in time; the message says which step and how long was waited."""


def timeout_seconds() -> float:
    """The collective and rendezvous timeout: ``$CNNKIT_DIST_TIMEOUT`` or the default."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None or text == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return value


def backend_for(device_type: str) -> str:
    """``"nccl"`` for CUDA, ``"gloo"`` for CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def threads_per_process(processes: int, cpus: int | None = None) -> int:
    """Intra-op threads for each of ``processes`` processes sharing ``cpus`` CPUs
    (default: the CPUs this process may use): ``max(1, cpus // processes)``."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
    return max(1, cpus // max(processes, 1))


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(
                f"environment variable {name} is not set; start the processes with torchrun "
                "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
            )
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"environment variable {name} must be >= 0, got {value}")
    return value


def env_world_size() -> int:
    """``$WORLD_SIZE`` (1 when it is not set)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    ``rank`` in ``[0, size)``; ``local_rank`` and ``local_size`` count the processes on
    this machine. ``size == 1`` is ordinary single-process training: every method is
    then a no-op or the identity, and nothing is communicated.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Process 0, the only one that writes files and prints progress."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """Require ``batch_size`` to be a multiple of the number of processes."""
        if batch_size % self.size:
            raise ValueError(
                f"batch_size {batch_size} cannot be split among {self.size} processes: "
                f"each takes an equal share of every batch, so the batch size must be a "
                f"multiple of the world size {self.size}"
            )

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of a global batch's sample indices ``(B,)``.

        Shares are ``B / size`` long (the last, shorter batch of an epoch: lengths differ
        by at most one, some may be empty); share ``r`` starts at ``r * ceil(B / size)``
        rounded as :func:`torch.tensor_split` does.
        """
        if self.size == 1:
            return index
        return torch.tensor_split(index, self.size)[self.rank]

    def device(self, device: torch.device) -> torch.device:
        """CUDA -> this process's GPU ``cuda:LOCAL_RANK``; CPU unchanged."""
        if device.type == "cuda" and self.active:
            return torch.device("cuda", self.local_rank)
        return device

    def collective(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Context for communication (``what`` it does, for the message): a peer that
        stopped or timed out becomes a :class:`DistributedError`. With one process
        nothing is communicated, and the block's errors pass as they are."""
        if not self.active:
            return contextlib.nullcontext()
        return _stopped_peer(self, what)

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place; returns it."""
        if self.active:
            with self.collective(what):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_gradients(self, parameters: Iterable[torch.nn.Parameter], what: str) -> None:
        """Replace each parameter's ``.grad`` by its sum over all processes (a missing
        ``.grad`` counts as zeros), with one all-reduce of the flattened gradients."""
        if not self.active:
            return
        params = [p for p in parameters if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # (total weights,)
        self.all_reduce_sum(flat, what)
        start = 0
        for p in params:
            p.grad.copy_(flat[start : start + p.numel()].view_as(p.grad))
            start += p.numel()

    def data_parallel(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped for training on every process: a
        :class:`~torch.nn.parallel.DistributedDataParallel` whose gradient all-reduce sums
        over the processes (instead of averaging); ``model`` itself with one process.

        Wrapping copies process 0's parameters and buffers to every process; buffers
        are not sent again at each forward pass (the networks' buffers are constants). Reach the
        model through ``.module``; its ``state_dict`` keys carry no wrapper prefix.
        """
        if not self.active:
            return model
        device = next(model.parameters()).device
        with self.collective("copying process 0's initial weights"):
            wrapped = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False,
            )
        wrapped.register_comm_hook(None, _sum_bucket)
        return wrapped

    def broadcast_object(self, value: Any, what: str) -> Any:
        """Process 0's ``value`` (picklable, small), on every process."""
        if not self.active:
            return value
        box = [value if self.is_main else None]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self, what: str) -> None:
        """Wait until every process gets here."""
        if self.active:
            with self.collective(what):
                dist.barrier()


SINGLE = World()


def _sum_bucket(state: object, bucket):
    """DistributedDataParallel communication hook: sum a bucket of gradients over all
    processes (the built-in one divides by the number of processes).

    ``bucket`` is a :class:`torch.distributed.GradBucket` and the result a
    ``torch.futures.Future[torch.Tensor]``; neither is annotated because the wrapper
    compares the annotations with those types, and this module's postponed annotations
    would make them strings.
    """
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


@contextlib.contextmanager
def _stopped_peer(world: World, what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, dist.DistError) as error:
        raise DistributedError(
            f"process {world.rank} of {world.size}: {what} failed: another process stopped "
            f"or did not answer within {world.timeout_s:g} s ({TIMEOUT_ENV}); "
            f"stopping too ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from error


def current_world() -> World:
    """The :class:`World` of an already initialized default process group (else SINGLE)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=_env_int("LOCAL_RANK", 0),
        local_size=_env_int("LOCAL_WORLD_SIZE", dist.get_world_size()),
        backend=str(dist.get_backend()),
        timeout_s=timeout_seconds(),
    )


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[World]:
    """Join the training processes described by the environment, for the block.

    - a process group already initialized (by the caller): used as it is, left open;
    - ``WORLD_SIZE`` unset or 1: :data:`SINGLE`, nothing is set up;
    - otherwise: ``init_process_group`` with ``env://``, backend :func:`backend_for`
      ``device_type``, timeout :func:`timeout_seconds`; when the block ends normally
      every process waits for the others, then the group is destroyed.

    A rendezvous that cannot be reached in time raises :class:`DistributedError` naming
    ``MASTER_ADDR:MASTER_PORT``.
    """
    if dist.is_available() and dist.is_initialized():
        yield current_world()
        return
    size = env_world_size()
    if size == 1:
        yield SINGLE
        return
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1, but this torch build has no torch.distributed")
    rank = _env_int("RANK")
    if rank >= size:
        raise ValueError(f"environment variable RANK must be < WORLD_SIZE {size}, got {rank}")
    local_rank = _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    timeout = timeout_seconds()
    backend = backend_for(device_type)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=timeout),
        )
    except ValueError:
        raise
    except (RuntimeError, dist.DistError) as error:
        raise DistributedError(
            f"process {rank} of {size}: could not join the process group at {where} within "
            f"{timeout:g} s ({TIMEOUT_ENV}): is MASTER_ADDR reachable from this machine and "
            f"are all {size} processes started? ({str(error).splitlines()[0]})"
        ) from error
    world = World(rank, size, local_rank, local_size, backend, timeout)
    try:
        yield world
        # Leave together: a process that tears its connections down while another
        # still works (process 0 writing the last files) can abort in the library.
        world.barrier("waiting for every process to finish (one may have failed)")
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# Launching on one machine: ``cnnkit train --nproc N``
# --------------------------------------------------------------------------------------


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m cnnkit ARGV``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cnnkit",
        *argv,
    ]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``cnnkit ARGV`` in ``nproc`` processes on this machine (torchrun); return its
    exit status. Each process gets ``threads_per_process(nproc)`` threads unless
    ``OMP_NUM_THREADS`` is set; the processes measure no implementation choice
    (:func:`cnnkit.kernels.tuning.worker_environment`)."""
    env = tuning.worker_environment(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    return subprocess.call(launch_command(nproc, argv), env=env)


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (e.g. ``--nproc``)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out
