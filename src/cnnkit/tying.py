"""Tied weights held equal by averaging after every step (the lecture's Section 3).

A CNN is a network whose weights are tied: ``w_1 = w_2 = ... = w_N``. The lecture keeps the
constraint the literal way: a gradient step moves every ``w_j`` on its own to ``w~_j``, then
each is replaced by the group's mean, ``w_i(new) = (1/N) sum_j w~_j(new)``. This module does
that for any parameters and any ``torch.optim`` optimizer:

* :class:`TieGroups` -- which entries are tied: each parameter maps to an integer label
  tensor of its own shape; entries with equal labels form one group, and a label may appear
  in several parameters (a group may span parameters).
* :func:`project_` -- replace every group by its mean, in place, vectorized.
* :func:`tie_after_step` -- run :func:`project_` after every ``optimizer.step()``, optionally
  with :func:`scale_gradients_by_group_size`.
* :func:`is_tied` / :func:`check_tied` -- test the constraint.
* :func:`convolution_groups` -- the groups under which a locally connected layer is a
  convolution; :func:`stored_and_free` -- its stored versus free parameter counts.

Why averaging gives a convolution: if the tied entries are equal before a plain SGD step,
each moves by ``-lr * g_j`` (``g_j`` its own gradient), and their mean moves by
``-lr * mean_j g_j``. A convolution stores the weight once, and its gradient is the *sum*
``sum_j g_j``; so averaging at ``lr`` follows the convolution at ``lr / N``. Multiplying
each gradient by its group's size ``N`` first (``scale_gradients=True``) makes averaging at
``lr`` follow the convolution at ``lr``. Optimizers whose update is not linear in the
gradient (Adam, RMSprop) break both equivalences. See ``docs/tying.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "TieCounts",
    "TieGroups",
    "TieHandle",
    "check_tied",
    "convolution_groups",
    "free_parameters",
    "is_tied",
    "project_",
    "scale_gradients_by_group_size",
    "stored_and_free",
    "stored_entries",
    "tie_after_step",
]


class TieGroups(Mapping):
    """Tie groups over parameters: a read-only mapping ``parameter -> labels``.

    Args:
        labels: a mapping from each parameter (a floating-point tensor, usually an
            ``nn.Parameter``) to an integer tensor of the same shape. Entries with equal
            labels are tied, within one parameter and across parameters. Parameters that
            are not keys are left alone; an entry whose label is unique is untied.
        names: optional display names for the parameters, used in error messages
            (default ``"parameter 0 (shape ...)"``, ...).

    The labels are renumbered once, at construction, to ``0 .. S-1`` (``S`` slots, one per
    group; nonnegative labels below the number of entries are kept as they are, others go
    through ``torch.unique``); ``groups[p]`` returns the renumbered labels, shaped like
    ``p``. A label tensor made by ``expand`` (stride 0 along some dimensions, as
    :func:`convolution_groups` makes them) is constant along those dimensions, and is
    kept that way: only its distinct slice is stored, and :func:`project_` sums the
    parameter over those dimensions before it scatters -- for a convolution's groups, a
    sum over positions. Labels are stored as ``int32`` where they fit, on each
    parameter's device, and follow the parameter if it moves. Build once and reuse: every
    operation of this module accepts a plain mapping too but then renumbers it each call.
    """

    def __init__(
        self,
        labels: Mapping[torch.Tensor, torch.Tensor],
        names: Mapping[torch.Tensor, str] | None = None,
    ) -> None:
        if not isinstance(labels, Mapping):
            raise TypeError(
                f"labels must be a mapping from parameters to label tensors, "
                f"got {type(labels).__name__}"
            )
        if len(labels) == 0:
            raise ValueError("labels must name at least one parameter, got an empty mapping")
        names = {} if names is None else names
        params, flat, broadcast, shapes = [], [], [], []
        for i, (param, label) in enumerate(labels.items()):
            if not isinstance(param, torch.Tensor) or not param.is_floating_point():
                raise TypeError(
                    "the keys of labels must be floating-point tensors (parameters), "
                    f"got {type(param).__name__} at position {i}"
                )
            name = names.get(param, f"parameter {i} (shape {tuple(param.shape)})")
            if not isinstance(label, torch.Tensor):
                raise TypeError(
                    f"labels of {name} must be an integer torch.Tensor, got {type(label).__name__}"
                )
            if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
                raise TypeError(f"labels of {name} must have an integer dtype, got {label.dtype}")
            if label.shape != param.shape:
                raise ValueError(
                    f"labels of {name} must have the parameter's shape {tuple(param.shape)}, "
                    f"got {tuple(label.shape)}"
                )
            dims = tuple(
                d for d in range(label.dim()) if label.stride(d) == 0 and label.shape[d] > 1
            )
            base = label.detach()
            for d in dims:
                base = base.narrow(d, 0, 1)  # the labels, constant along d
            params.append(param)
            broadcast.append(dims)
            shapes.append(tuple(base.shape))
            flat.append(base.reshape(-1).to(torch.int64))
        self._params: list[torch.Tensor] = params
        self._names: list[str] = [
            names.get(p, f"parameter {i} (shape {tuple(p.shape)})") for i, p in enumerate(params)
        ]
        self._position = {id(p): i for i, p in enumerate(params)}
        self._broadcast: list[tuple[int, ...]] = broadcast  # dims the labels are constant on
        self._base_shape: list[tuple[int, ...]] = shapes  # shape of the stored labels
        self._stored = sum(p.numel() for p in params)
        low = min((int(f.min()) for f in flat if f.numel()), default=0)
        high = max((int(f.max()) for f in flat if f.numel()), default=-1)
        if low >= 0 and high < max(self._stored, 1):
            self._slot_labels: torch.Tensor | None = None  # slot s is label s
            num_slots = high + 1
        else:
            device = flat[0].device
            everything = torch.cat([f.to(device) for f in flat])  # (stored labels,)
            self._slot_labels, inverse = torch.unique(everything, return_inverse=True)
            num_slots = len(self._slot_labels)
            flat = list(torch.split(inverse, [f.numel() for f in flat]))
        index_dtype = torch.int32 if num_slots < 2**31 else torch.int64
        counts = torch.zeros(num_slots, dtype=torch.int64)
        for f, param, base_shape in zip(flat, params, shapes, strict=True):
            repeats = param.numel() // max(math.prod(base_shape), 1)  # entries per label
            counts += torch.bincount(f.cpu(), minlength=num_slots) * repeats
        self._counts = counts  # (S,) entries per slot, on the CPU
        self._converted: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._index = [
            f.to(device=p.device, dtype=index_dtype) for f, p in zip(flat, params, strict=True)
        ]
        self._free = int((counts > 0).sum())

    # -- Mapping interface ------------------------------------------------------------------
    def __getitem__(self, param: torch.Tensor) -> torch.Tensor:
        i = self._position.get(id(param))
        if i is None or self._params[i] is not param:
            raise KeyError("this tensor is not one of the tied parameters")
        return self._labels(i)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        return (
            f"TieGroups({len(self)} parameters, {self._stored:,} stored entries, "
            f"{self._free:,} free values)"
        )

    # -- counts -----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The parameters' display names, in order."""
        return tuple(self._names)

    @property
    def stored(self) -> int:
        """Number of entries held in memory: the sum of the parameters' sizes."""
        return self._stored

    @property
    def free(self) -> int:
        """Number of groups: the distinct values the parameters can take once tied."""
        return self._free

    def group_sizes(self) -> torch.Tensor:
        """``(S,)`` int64 on the CPU: how many entries each slot holds (0 for unused labels)."""
        return self._counts.clone()

    def renamed(self, module: nn.Module) -> TieGroups:
        """A copy whose parameters carry their names in ``module.named_parameters()``."""
        names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        copy = object.__new__(TieGroups)
        copy.__dict__.update(self.__dict__)
        copy._names = [
            names.get(id(p), old) for p, old in zip(self._params, self._names, strict=True)
        ]
        return copy

    @staticmethod
    def combine(*groups: TieGroups) -> TieGroups:
        """Several independent tie groups as one: labels of different arguments never tie."""
        if not groups:
            raise ValueError("combine needs at least one TieGroups")
        labels, names, offset = {}, {}, 0
        for g in groups:
            g = _as_groups(g)
            for i, (param, name) in enumerate(zip(g._params, g._names, strict=True)):
                if param in labels:
                    raise ValueError(f"{name} appears in two of the tie groups being combined")
                labels[param] = g._labels(i, offset)
                names[param] = name
            offset += len(g._counts)
        return TieGroups(labels, names)

    # -- internals --------------------------------------------------------------------------
    def _device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            listed = ", ".join(
                f"{n} on {p.device}" for n, p in zip(self._names, self._params, strict=True)
            )
            raise ValueError(f"tied parameters must all be on one device, got {listed}")
        dtype = self._params[0].dtype
        for p in self._params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return devices.pop(), dtype

    def _flat_index(self, i: int) -> torch.Tensor:
        """Parameter ``i``'s stored labels, flat, on its device (moved there if needed)."""
        index, device = self._index[i], self._params[i].device
        if index.device != device:
            index = self._index[i] = index.to(device)
        return index

    def _labels(self, i: int, offset: int = 0) -> torch.Tensor:
        """Parameter ``i``'s renumbered labels (int64, plus ``offset``), shaped like it."""
        base = (self._flat_index(i).to(torch.int64) + offset).view(self._base_shape[i])
        return base.expand(self._params[i].shape)

    def _reduced(self, i: int, values: torch.Tensor, reduce: str) -> torch.Tensor:
        """``values`` (shaped like parameter ``i``) reduced over its broadcast dims, flat."""
        dims = self._broadcast[i]
        if dims:
            values = getattr(values, reduce)(dim=dims, keepdim=True)
        return values.reshape(-1)

    def _counts_as(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The group sizes ``(S,)`` on ``device`` in ``dtype``, converted once and kept."""
        key = (device, dtype)
        if key not in self._converted:
            self._converted[key] = self._counts.to(device=device, dtype=dtype)
        return self._converted[key]

    def _sizes(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Each entry's group size, broadcastable to ``like`` (parameter ``i``'s grad)."""
        counts = self._counts_as(like.device, like.dtype)
        index = self._flat_index(i).to(like.device)
        return counts.index_select(0, index).view(self._base_shape[i])


def _as_groups(groups: object) -> TieGroups:
    if isinstance(groups, TieGroups):
        return groups
    if isinstance(groups, Mapping):
        return TieGroups(groups)
    raise TypeError(
        f"groups must be a TieGroups or a mapping from parameters to label tensors, "
        f"got {type(groups).__name__}"
    )


@torch.no_grad()
def project_(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor]) -> None:
    """Replace every tied group by its mean, in place: ``w_i <- (1/N) sum_j w_j``.

    For each group ``g`` of ``N_g`` entries, every entry becomes ``mean_g`` computed in the
    promoted dtype of the parameters. Vectorized: one ``index_add_`` per parameter into a
    vector of group sums, one gather back; no loop over groups or positions. Runs under
    ``torch.no_grad()`` and works on any device (all tied parameters on the same one).
    Idempotent up to rounding, and it preserves every group's mean.
    """
    g = _as_groups(groups)
    device, dtype = g._device_and_dtype()
    sums = torch.zeros(len(g._counts), device=device, dtype=dtype)  # (S,)
    for i, param in enumerate(g._params):
        sums.index_add_(0, g._flat_index(i), g._reduced(i, param.to(dtype), "sum"))
    means = sums.div_(g._counts_as(device, dtype).clamp_min(1))  # (S,)
    for i, param in enumerate(g._params):
        param.copy_(means.index_select(0, g._flat_index(i)).view(g._base_shape[i]))


@torch.no_grad()
def _spreads(g: TieGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot, the largest and smallest value among its entries: ``(high, low)``, (S,)."""
    device, dtype = g._device_and_dtype()
    high = torch.full((len(g._counts),), -math.inf, device=device, dtype=dtype)
    low = torch.full((len(g._counts),), math.inf, device=device, dtype=dtype)
    for i, param in enumerate(g._params):
        index = g._flat_index(i).to(torch.int64)
        values = param.to(dtype)
        high.scatter_reduce_(0, index, g._reduced(i, values, "amax"), reduce="amax")
        low.scatter_reduce_(0, index, g._reduced(i, values, "amin"), reduce="amin")
    return high, low


def _untied(g: TieGroups, atol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    high, low = _spreads(g)
    tied = (high == low) | ((high - low) <= atol)
    used = (g._counts > 0).to(tied.device)
    return high, low, used & ~tied


def is_tied(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor], atol: float = 0.0) -> bool:
    """True if in every group ``max - min <= atol`` (a NaN anywhere in a group fails).

    Right after :func:`project_` every group holds one value exactly, so the default
    ``atol=0`` holds.
    """
    atol = _check_atol(atol)
    return not bool(_untied(_as_groups(groups), atol)[2].any())


def check_tied(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor], atol: float = 0.0) -> None:
    """Raise ``ValueError`` naming a group that is not tied, its parameter and its values.

    The message names the group's label, the parameter and index holding the group's
    largest value and those holding its smallest, and the spread against ``atol``.
    """
    atol = _check_atol(atol)
    g = _as_groups(groups)
    high, low, bad = _untied(g, atol)
    spread = high - low
    if not bool(bad.any()):
        return
    slot = int(torch.nonzero(bad)[0])
    label = slot if g._slot_labels is None else int(g._slot_labels[slot])
    where = {}
    for which, target in (("largest", high[slot]), ("smallest", low[slot])):
        for i, param in enumerate(g._params):
            hit = (g._labels(i) == slot).reshape(-1) & (
                (param.reshape(-1).to(target.dtype) == target)
                | (torch.isnan(param.reshape(-1)) & torch.isnan(target))
            )
            if bool(hit.any()):
                flat = int(torch.nonzero(hit)[0])
                index = tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), param.shape))
                where[which] = f"{g._names[i]} at index {index} holds {float(target):.6g}"
                break
        else:  # a NaN makes amax/amin NaN without matching: name any entry of the group
            for i, param in enumerate(g._params):
                hit = (g._labels(i) == slot).reshape(-1)
                if bool(hit.any()):
                    flat = int(torch.nonzero(hit)[0])
                    index = tuple(
                        int(v) for v in torch.unravel_index(torch.tensor(flat), param.shape)
                    )
                    where[which] = f"{g._names[i]} at index {index} is in it"
                    break
    raise ValueError(
        f"tie group {label} is not tied: {where['largest']}, {where['smallest']} "
        f"(spread {float(spread[slot]):.3g} > atol {atol:g}); "
        "call cnnkit.tying.project_(groups) after each optimizer step"
    )


def _check_atol(atol: object) -> float:
    if isinstance(atol, bool) or not isinstance(atol, (int, float)):
        raise TypeError(f"atol must be a number >= 0, got {atol!r}")
    if not math.isfinite(atol) or atol < 0:
        raise ValueError(f"atol must be a finite number >= 0, got {atol}")
    return float(atol)


def free_parameters(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor]) -> int:
    """The number of distinct values the tied parameters hold: one per group."""
    return _as_groups(groups).free


def stored_entries(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor]) -> int:
    """The number of entries the tied parameters store: the sum of their sizes."""
    return _as_groups(groups).stored


class TieHandle:
    """Undoes :func:`tie_after_step` or :func:`scale_gradients_by_group_size`: ``remove()``.

    Also a context manager that removes the hooks on exit.
    """

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Remove every hook this handle holds; a second call does nothing."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> TieHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def scale_gradients_by_group_size(
    groups: TieGroups | Mapping[torch.Tensor, torch.Tensor],
) -> TieHandle:
    """Multiply the gradient reaching each tied entry by the size of its group.

    Registers a gradient hook (``Tensor.register_hook``) on every tied parameter: each
    gradient ``g_j`` flowing into the parameter becomes ``N_g * g_j``, ``N_g`` the number
    of entries in ``j``'s group (1 for an untied entry), before it is accumulated into
    ``.grad``. The group's mean gradient then equals the sum ``sum_j g_j``, the gradient a
    single shared weight would receive, so plain SGD (with or without momentum, nesterov
    or dampening) followed by :func:`project_` moves the group exactly as it moves a
    shared weight at the same learning rate. Weight decay, which the optimizer adds after
    the hook, is not scaled, and so matches the shared weight's too. Everything else that
    reads ``.grad`` sees the scaled values (a gradient-norm clip, for one). Adam-like
    optimizers divide by the gradient's magnitude, so the scaling hardly changes them.
    Returns a :class:`TieHandle`; ``remove()`` unregisters the hooks.
    """
    g = _as_groups(groups)
    handles = []
    for i, param in enumerate(g._params):
        if not param.requires_grad:
            raise ValueError(f"{g._names[i]} does not require grad, so it has no gradient")

        def hook(grad: torch.Tensor, i: int = i) -> torch.Tensor:
            return grad * g._sizes(i, grad)

        handles.append(param.register_hook(hook))
    return TieHandle(handles)


def tie_after_step(
    optimizer: torch.optim.Optimizer,
    groups: TieGroups | Mapping[torch.Tensor, torch.Tensor],
    *,
    scale_gradients: bool = False,
    project_now: bool = True,
) -> TieHandle:
    """Keep ``groups`` tied through training: :func:`project_` after every optimizer step.

    Registers ``optimizer.register_step_post_hook``, so it works with any
    ``torch.optim`` optimizer and any training loop that calls ``optimizer.step()``.

    Args:
        optimizer: the optimizer that updates the tied parameters.
        groups: the tie groups (a :class:`TieGroups` or a plain mapping).
        scale_gradients: also register :func:`scale_gradients_by_group_size`, so that a
            group moves by the *sum* of its entries' gradients, as a shared weight does,
            instead of their mean (the lecture's literal rule). With plain SGD this makes
            averaging at learning rate ``lr`` equal to weight sharing at ``lr``; without
            it, averaging at ``lr`` equals sharing at ``lr / N``.
        project_now: project once immediately, so the constraint holds from the start
            (a freshly initialised untied layer is not tied).

    Returns a :class:`TieHandle`; ``remove()`` stops the projection (and the scaling).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    for name, value in (("scale_gradients", scale_gradients), ("project_now", project_now)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    g = _as_groups(groups)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in zip(g._names, g._params, strict=True) if id(p) not in optimized]
    if missing:
        raise ValueError(
            f"groups tie parameters the optimizer does not update: {', '.join(missing)}"
        )
    if project_now:
        project_(g)
    handles = []
    if scale_gradients:
        handles.extend(scale_gradients_by_group_size(g)._handles)

    def hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        project_(g)

    handles.append(optimizer.register_step_post_hook(hook))
    return TieHandle(handles)


# ---------------------------------------------------------------------------------------
# Locally connected layers
# ---------------------------------------------------------------------------------------


def _check_locally_connected(layer: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = getattr(layer, "weight", None)
    bias = getattr(layer, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise TypeError(
            "layer must be a locally connected layer with a weight of shape "
            f"(H_out, W_out, K, kh, kw), got {type(layer).__name__} with weight shape {shape}"
        )
    if bias is not None and (bias.dim() != 3 or tuple(bias.shape[1:]) != tuple(weight.shape[:2])):
        raise ValueError(
            f"layer.bias must have shape (C_out, {weight.shape[0]}, {weight.shape[1]}), "
            f"got {tuple(bias.shape)}"
        )
    return weight, bias


def convolution_groups(*layers: nn.Module) -> TieGroups:
    """The tie groups under which locally connected layers compute convolutions.

    For a layer with ``weight`` ``(H_out, W_out, K, kh, kw)`` and ``bias``
    ``(C_out, H_out, W_out)`` (:class:`cnnkit.nn.locally_connected.LocallyConnected2d`),
    entry ``weight[p, q, r, u, v]`` is tied to ``weight[p', q', r, u, v]`` at every other
    position (one group per table row and kernel entry: ``K * kh * kw`` groups of
    ``H_out * W_out``), and ``bias[o, p, q]`` to every ``bias[o, p', q']`` (``C_out``
    groups). Tied this way the layer is exactly the convolution -- with a connection table,
    the table's convolution. Several layers give one :class:`TieGroups` whose groups never
    span two layers.
    """
    if not layers:
        raise ValueError("convolution_groups needs at least one layer")
    labels, names, offset = {}, {}, 0
    for number, layer in enumerate(layers):
        weight, bias = _check_locally_connected(layer)
        out_h, out_w, rows, kh, kw = weight.shape
        prefix = f"{type(layer).__name__}[{number}]" if len(layers) > 1 else "layer"
        kernel = torch.arange(offset, offset + rows * kh * kw, device=weight.device)
        labels[weight] = kernel.view(1, 1, rows, kh, kw).expand(weight.shape)
        names[weight] = f"{prefix}.weight"
        offset += rows * kh * kw
        if bias is not None:
            maps = torch.arange(offset, offset + bias.shape[0], device=bias.device)
            labels[bias] = maps.view(-1, 1, 1).expand(bias.shape)
            names[bias] = f"{prefix}.bias"
            offset += bias.shape[0]
    return TieGroups(labels, names)


@dataclass(frozen=True)
class TieCounts:
    """Stored entries versus free (tied) values of a locally connected layer."""

    stored_weights: int
    free_weights: int
    stored_biases: int
    free_biases: int

    @property
    def stored(self) -> int:
        """All entries held in memory: weights and biases."""
        return self.stored_weights + self.stored_biases

    @property
    def free(self) -> int:
        """All values left free once tied as a convolution: weights and biases."""
        return self.free_weights + self.free_biases


def stored_and_free(layer: nn.Module) -> TieCounts:
    """Counts of a locally connected layer from its shapes alone (works on ``meta``).

    Stored: ``H_out * W_out * K * kh * kw`` weights and ``C_out * H_out * W_out`` biases.
    Free under :func:`convolution_groups`: ``K * kh * kw`` weights and ``C_out`` biases.
    The lecture's first layer (64 maps of 75x75 from one 83x83 input, 9x9 kernels) stores
    64 * 75 * 75 * 81 = 29,160,000 weights, of which 64 * 81 = 5,184 are free.
    """
    weight, bias = _check_locally_connected(layer)
    out_h, out_w, rows, kh, kw = weight.shape
    maps = 0 if bias is None else bias.shape[0]
    return TieCounts(
        stored_weights=weight.numel(),
        free_weights=rows * kh * kw,
        stored_biases=0 if bias is None else bias.numel(),
        free_biases=maps,
    )
