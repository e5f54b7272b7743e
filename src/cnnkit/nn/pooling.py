"""Pooling and subsampling layers: thin modules over :mod:`cnnkit.ops.pooling`.

``Pool`` pools at stride 1 (the lecture's 75x75 -> 66x66 with a 10x10 window),
``Subsample`` keeps every ``stride``-th row and column (66x66 -> 14x14 at stride 5), and
``PoolSubsample`` does both at once, pooling only where subsampling keeps a value: it equals
``Subsample(stride)(Pool(kind, window)(x))`` and is far cheaper.

Shapes: input ``(N, C, H, W)`` or ``(C, H, W)``. With window ``(k_h, k_w)`` and stride
``(s_h, s_w)``: ``Pool`` gives ``H - k_h + 1``, ``Subsample`` gives ``ceil(H / s_h)``,
``PoolSubsample`` gives ``floor((H - k_h) / s_h) + 1`` (= the other two in sequence);
widths likewise.

Trainable pooling (``trainable=True``, needs ``maps``): each map ``c`` gets a coefficient
``weight[c]`` (init 1) and a ``bias[c]`` (init 0), and the output is
``weight[c] * pool(x)[c] + bias[c]``. Torch7's ``SpatialSubSampling`` and LeNet-5's
S-layers multiply the window's *sum* by the coefficient; with ``kind="avg"`` the
coefficient here absorbs the ``1 / (k_h k_w)`` factor, so ``weight = k_h k_w * w_sum``
reproduces such a layer whose coefficient is ``w_sum``.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit._validation import (
    check_bool,
    check_choice,
    check_maps,
    check_positive_float,
    check_positive_int,
    pair,
)
from cnnkit.ops.pooling import KINDS, pool2d, pool_subsample2d, subsample2d

__all__ = ["Pool", "PoolSubsample", "Subsample"]


class _Pooling(nn.Module):
    """Settings, checks, optional per-map coefficient and bias shared by the pooling layers;
    its constructor is :class:`Pool`'s."""

    def __init__(
        self,
        kind: str,
        window: int | tuple[int, int],
        p: float = 2.0,
        *,
        maps: int | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.kind = check_choice("kind", kind, KINDS)
        self.window = pair("window", window)
        self.p = check_positive_float("p", p)
        if maps is not None:
            check_positive_int("maps", maps)
        check_bool("trainable", trainable)
        if trainable and maps is None:
            raise ValueError(
                "trainable=True needs maps, the number of input maps (one weight and one "
                "bias per map), got maps=None"
            )
        self.maps = maps
        self.trainable = trainable
        if trainable:
            self.weight = nn.Parameter(torch.empty(maps))
            self.bias = nn.Parameter(torch.empty(maps))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Coefficients to 1 and biases to 0: a fresh trainable layer pools unchanged."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if self.maps is not None:
            check_maps("x", x, maps=self.maps)

    def _settings(self) -> list[str]:
        k_h, k_w = self.window
        parts = [repr(self.kind), f"window={k_h if k_h == k_w else self.window}"]
        if self.p != 2.0:
            parts.append(f"p={self.p:g}")
        if self.maps is not None:
            parts.append(f"maps={self.maps}")
        if self.trainable:
            parts.append("trainable=True")
        return parts


class Pool(_Pooling):
    """Pooling at stride 1 over a ``window`` (valid): ``(N, C, H, W) -> (N, C, H-k_h+1, W-k_w+1)``.

    Args:
        kind: ``"max"``, ``"avg"`` or ``"lp"``; ``"lp"`` is ``(sum_window x^p)^(1/p)``.
        window: ``k`` or ``(k_h, k_w)``.
        p: exponent for ``"lp"`` (finite, > 0).
        maps: number of input maps ``C``; when given, inputs are checked against it.
        trainable: add a per-map ``weight`` (init 1) and ``bias`` (init 0), each ``(maps,)``:
            ``y = weight[c] * pool(x)[c] + bias[c]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return pool2d(x, self.kind, self.window, 1, self.p, weight=self.weight, bias=self.bias)

    def extra_repr(self) -> str:
        return ", ".join(self._settings())


class PoolSubsample(_Pooling):
    """Pooling evaluated only at the subsampled points: ``Subsample(stride)(Pool(...)(x))``.

    ``(N, C, H, W) -> (N, C, floor((H - k_h) / s_h) + 1, floor((W - k_w) / s_w) + 1)``;
    the lecture's 75x75 maps, window 10, stride 5 give 14x14.

    Args:
        kind, window, p, maps, trainable: as :class:`Pool`.
        stride: ``s`` or ``(s_h, s_w)``, the subsampling stride.
    """

    def __init__(
        self,
        kind: str,
        window: int | tuple[int, int],
        stride: int | tuple[int, int],
        p: float = 2.0,
        *,
        maps: int | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__(kind, window, p, maps=maps, trainable=trainable)
        self.stride = pair("stride", stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return pool_subsample2d(
            x, self.kind, self.window, self.stride, self.p, weight=self.weight, bias=self.bias
        )

    def extra_repr(self) -> str:
        parts = self._settings()
        s_h, s_w = self.stride
        parts.insert(2, f"stride={s_h if s_h == s_w else self.stride}")
        return ", ".join(parts)


class Subsample(nn.Module):
    """Keep every ``stride``-th row and column, starting with the first.

    ``(N, C, H, W) -> (N, C, ceil(H / s_h), ceil(W / s_w))``; a view of the input, no copy.
    The lecture's 66x66 maps at stride 5 keep rows and columns 0, 5, ..., 65 -> 14x14.

    Args:
        stride: ``s`` or ``(s_h, s_w)``.
    """

    def __init__(self, stride: int | tuple[int, int]) -> None:
        super().__init__()
        self.stride = pair("stride", stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return subsample2d(x, self.stride)

    def extra_repr(self) -> str:
        s_h, s_w = self.stride
        return f"stride={s_h if s_h == s_w else self.stride}"
