"""Which weights are tied, and the lecture's rule that keeps them equal.

:class:`TieGroups` says which entries of which parameters are tied: each parameter maps to
an integer label tensor of its own shape; entries with equal labels form one group, and a
label may appear in several parameters (a group may span parameters). Its methods are the
operations on tied weights:

* :meth:`~TieGroups.project_` -- the lecture's ``w_i(new) = (1/N) sum_j w~_j(new)``:
  replace every group by its mean, in place, vectorized;
* :meth:`~TieGroups.is_tied` / :meth:`~TieGroups.check_tied` -- test the constraint;
* :attr:`~TieGroups.stored` / :attr:`~TieGroups.free` -- entries held versus values free;
* :meth:`~TieGroups.register_gradient_scaling` -- each entry's gradient times its group's
  size, so a group moves as one shared weight would (see :mod:`cnnkit.nn.tying.averaging`).

The functions :func:`project_`, :func:`is_tied`, :func:`check_tied`,
:func:`free_parameters` and :func:`stored_entries` do the same for a :class:`TieGroups`
or a plain mapping.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from cnnkit._validation import check_number

__all__ = [
    "TieGroups",
    "check_tied",
    "free_parameters",
    "is_tied",
    "project_",
    "stored_entries",
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
    :func:`~cnnkit.nn.tying.convolution_groups` makes them) is constant along those
    dimensions, and is kept that way: only its distinct slice is stored, and
    :meth:`project_` sums the parameter over those dimensions before it scatters -- for a
    convolution's groups, a sum over positions. Labels are stored as ``int32`` where they
    fit, on each parameter's device, and follow the parameter if it moves. Build once and
    reuse: every function taking groups accepts a plain mapping too, but then renumbers
    it each call.
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

    @staticmethod
    def of(groups: object) -> TieGroups:
        """``groups`` itself if it is a :class:`TieGroups`, else built from a mapping."""
        if isinstance(groups, TieGroups):
            return groups
        if isinstance(groups, Mapping):
            return TieGroups(groups)
        raise TypeError(
            f"groups must be a TieGroups or a mapping from parameters to label tensors, "
            f"got {type(groups).__name__}"
        )

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

    # -- building from others ---------------------------------------------------------------
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
            g = TieGroups.of(g)
            for i, (param, name) in enumerate(zip(g._params, g._names, strict=True)):
                if param in labels:
                    raise ValueError(f"{name} appears in two of the tie groups being combined")
                labels[param] = g._labels(i, offset)
                names[param] = name
            offset += len(g._counts)
        return TieGroups(labels, names)

    # -- the lecture's rule -----------------------------------------------------------------
    @torch.no_grad()
    def project_(self) -> None:
        """Replace every tied group by its mean, in place: ``w_i <- (1/N) sum_j w_j``.

        For each group ``g`` of ``N_g`` entries, every entry becomes ``mean_g`` computed in
        the promoted dtype of the parameters. Vectorized: one ``index_add_`` per parameter
        into a vector of group sums, one gather back; no loop over groups or positions.
        Runs under ``torch.no_grad()`` and works on any device (all tied parameters on the
        same one). Idempotent up to rounding, and it preserves every group's mean.
        """
        device, dtype = self._device_and_dtype()
        sums = torch.zeros(len(self._counts), device=device, dtype=dtype)  # (S,)
        for i, param in enumerate(self._params):
            sums.index_add_(0, self._flat_index(i), self._reduced(i, param.to(dtype), "sum"))
        means = sums.div_(self._counts_as(device, dtype).clamp_min(1))  # (S,)
        for i, param in enumerate(self._params):
            param.copy_(means.index_select(0, self._flat_index(i)).view(self._base_shape[i]))

    def is_tied(self, atol: float = 0.0) -> bool:
        """True if in every group ``max - min <= atol`` (a NaN anywhere in a group fails).

        Right after :meth:`project_` every group holds one value exactly, so the default
        ``atol=0`` holds.
        """
        atol = check_number("atol", atol, ">= 0", lambda v: v >= 0)
        return not bool(self._untied(atol)[2].any())

    def check_tied(self, atol: float = 0.0) -> None:
        """Raise ``ValueError`` naming a group that is not tied, its parameter and its values.

        The message names the group's label, the parameter and index holding the group's
        largest value and those holding its smallest, and the spread against ``atol``.
        """
        atol = check_number("atol", atol, ">= 0", lambda v: v >= 0)
        high, low, bad = self._untied(atol)
        if not bool(bad.any()):
            return
        slot = int(torch.nonzero(bad)[0])
        label = slot if self._slot_labels is None else int(self._slot_labels[slot])
        largest, smallest = self._holder(slot, high[slot]), self._holder(slot, low[slot])
        raise ValueError(
            f"tie group {label} is not tied: {largest}, {smallest} "
            f"(spread {float(high[slot] - low[slot]):.3g} > atol {atol:g}); "
            "call cnnkit.tying.project_(groups) after each optimizer step"
        )

    def register_gradient_scaling(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Hook every parameter so that its gradient reaches ``.grad`` times each entry's
        group size ``N_g`` (1 for an untied entry); returns the hooks' handles."""
        handles = []
        for i, param in enumerate(self._params):
            if not param.requires_grad:
                raise ValueError(f"{self._names[i]} does not require grad, so it has no gradient")

            def hook(grad: torch.Tensor, i: int = i) -> torch.Tensor:
                return grad * self._sizes(i, grad)

            handles.append(param.register_hook(hook))
        return handles

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

    @torch.no_grad()
    def _spreads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot, the largest and smallest value among its entries: ``(high, low)``, (S,)."""
        device, dtype = self._device_and_dtype()
        high = torch.full((len(self._counts),), -math.inf, device=device, dtype=dtype)
        low = torch.full((len(self._counts),), math.inf, device=device, dtype=dtype)
        for i, param in enumerate(self._params):
            index = self._flat_index(i).to(torch.int64)
            values = param.to(dtype)
            high.scatter_reduce_(0, index, self._reduced(i, values, "amax"), reduce="amax")
            low.scatter_reduce_(0, index, self._reduced(i, values, "amin"), reduce="amin")
        return high, low

    def _untied(self, atol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(high, low, untied)`` per slot: ``untied`` marks used slots spread past ``atol``."""
        high, low = self._spreads()
        tied = (high == low) | ((high - low) <= atol)
        used = (self._counts > 0).to(tied.device)
        return high, low, used & ~tied

    def _holder(self, slot: int, target: torch.Tensor) -> str:
        """Where slot ``slot`` holds the value ``target``: a parameter's name and index."""
        for matching_value in (True, False):  # a NaN target matches nothing: name any entry
            for i, param in enumerate(self._params):
                hit = (self._labels(i) == slot).reshape(-1)
                if matching_value:
                    values = param.reshape(-1).to(target.dtype)
                    hit &= (values == target) | (torch.isnan(values) & torch.isnan(target))
                if bool(hit.any()):
                    flat = int(torch.nonzero(hit)[0])
                    index = tuple(
                        int(v) for v in torch.unravel_index(torch.tensor(flat), param.shape)
                    )
                    if matching_value:
                        return f"{self._names[i]} at index {index} holds {float(target):.6g}"
                    return f"{self._names[i]} at index {index} is in it"
        raise AssertionError(f"tie group slot {slot} has no entries")  # used slots have some


def project_(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor]) -> None:
    """:meth:`TieGroups.project_` on ``groups`` (a :class:`TieGroups` or a plain mapping)."""
    TieGroups.of(groups).project_()


def is_tied(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor], atol: float = 0.0) -> bool:
    """:meth:`TieGroups.is_tied` on ``groups`` (a :class:`TieGroups` or a plain mapping)."""
    return TieGroups.of(groups).is_tied(atol)


def check_tied(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor], atol: float = 0.0) -> None:
    """:meth:`TieGroups.check_tied` on ``groups`` (a :class:`TieGroups` or a plain mapping)."""
    TieGroups.of(groups).check_tied(atol)


def free_parameters(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor]) -> int:
    """The number of distinct values the tied parameters hold: one per group
    (:attr:`TieGroups.free`)."""
    return TieGroups.of(groups).free


def stored_entries(groups: TieGroups | Mapping[torch.Tensor, torch.Tensor]) -> int:
    """The number of entries the tied parameters store: the sum of their sizes
    (:attr:`TieGroups.stored`)."""
    return TieGroups.of(groups).stored
