"""Local contrast normalization layers: thin modules over :mod:`cnnkit.ops.normalization`.

``SubtractiveNorm`` removes the local mean taken over every map, ``DivisiveNorm`` divides
by the local standard deviation ``max(c, sigma)``, and ``ContrastNorm`` does one then the
other (the lecture's "LCN"). Each holds a Gaussian window of ``window x window`` pixels
over its ``maps`` maps (:func:`~cnnkit.ops.normalization.gaussian_window`, summing to 1)
as a buffer: saved with the model, moved by ``.to()``, never trained.

Shapes: input ``(N, maps, H, W)`` or ``(maps, H, W)``; output the same shape. The window
may be larger than the map (the lecture normalizes 6x6 maps with a 9x9 window) under
``border="renormalize"`` (default) or ``"zero"``; ``"reflect"`` refuses it.

``sigma`` defaults to ``window / 4`` pixels (2.25 for the 9x9 window): the Gaussian
falls to about 20% of its peak at the middle of the window's edge, so the window is
neither cut off abruptly nor close to a flat box.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit._validation import check_choice, check_positive_float, check_positive_int
from cnnkit.ops.normalization import (
    BORDERS,
    _check_divisive_options,
    check_window,
    contrast_norm,
    divisive_norm,
    gaussian_window,
    rectified_contrast_norm,
    rectified_contrast_norm_max_pool,
    subtractive_norm,
)

__all__ = ["ContrastNorm", "DivisiveNorm", "SubtractiveNorm"]


class _LocalNorm(nn.Module):
    """The window and border shared by the three layers."""

    window: torch.Tensor

    def __init__(self, maps: int, window: int, sigma: float | None, border: str) -> None:
        super().__init__()
        self.maps = check_positive_int("maps", maps)
        self.window_size = check_positive_int("window", window)
        if window % 2 == 0:
            raise ValueError(
                f"window must be odd so that the window has a centre pixel, got {window}"
            )
        self.sigma = window / 4 if sigma is None else check_positive_float("sigma", sigma)
        self.border = check_choice("border", border, BORDERS)
        self.register_buffer("window", gaussian_window(window, self.sigma, maps))

    def __setattr__(self, name: str, value: object) -> None:
        if name == "window" and isinstance(value, torch.Tensor):
            check_window(value)  # a window set by hand must sum to 1 too
            if value.shape[0] != self.maps:
                raise ValueError(
                    f"window must have {self.maps} maps, one per input map, got shape "
                    f"{tuple(value.shape)}"
                )
        super().__setattr__(name, value)

    def _gaussian(self, like: torch.Tensor) -> torch.Tensor:
        return gaussian_window(
            self.window_size, self.sigma, self.maps, dtype=like.dtype, device=like.device
        )

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (torch's signature)
        # A window converted to another dtype keeps the old dtype's rounding (a float32
        # Gaussian in float64 is no longer exactly separable, which sends the sums down a
        # much slower path): an unmodified window is computed afresh in the new dtype.
        before = self.window
        gaussian = (
            before.is_floating_point()
            and before.device.type != "meta"
            and torch.equal(before, self._gaussian(before))
        )
        super()._apply(fn, recurse)
        if gaussian and self.window.dtype != before.dtype and self.window.is_floating_point():
            self.window = self._gaussian(self.window)
        return self

    def _settings(self) -> list[tuple[str, object, object]]:
        """(name, value, default) for ``extra_repr``."""
        return [
            ("window", self.window_size, 9),
            ("sigma", self.sigma, self.window_size / 4),
            ("border", self.border, "renormalize"),
        ]

    def extra_repr(self) -> str:
        shown = [
            f"{name}={value!r}" for name, value, default in self._settings() if value != default
        ]
        return ", ".join([str(self.maps), *shown])


class SubtractiveNorm(_LocalNorm):
    """``v_ijk = x_ijk - sum_{i,p,q} w_ipq x_{i,j+p,k+q}``, the window mean over all maps.

    Args:
        maps: number of input maps ``C``.
        window: odd side of the Gaussian window, in pixels.
        sigma: its standard deviation in pixels; default ``window / 4``.
        border: ``"renormalize"``, ``"zero"`` or ``"reflect"``
            (see :mod:`cnnkit.ops.normalization`).
    """

    def __init__(
        self, maps: int, window: int = 9, sigma: float | None = None, border: str = "renormalize"
    ) -> None:
        super().__init__(maps, window, sigma, border)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return subtractive_norm(x, self.window, self.border)


class _DivisiveBase(_LocalNorm):
    """The constructor shared by :class:`DivisiveNorm` and :class:`ContrastNorm`: the
    window, then the threshold ``c`` of ``max(c, sigma)`` and its floor."""

    def __init__(
        self,
        maps: int,
        window: int = 9,
        sigma: float | None = None,
        border: str = "renormalize",
        threshold: float | str = "mean",
        floor: float = 1e-4,
    ) -> None:
        super().__init__(maps, window, sigma, border)
        self.threshold, self.floor = _check_divisive_options(threshold, floor)

    def _settings(self) -> list[tuple[str, object, object]]:
        return [
            *super()._settings(),
            ("threshold", self.threshold, "mean"),
            ("floor", self.floor, 1e-4),
        ]


class DivisiveNorm(_DivisiveBase):
    """``y_ijk = x_ijk / max(c, sigma_jk)``, ``sigma_jk^2 = sum_{i,p,q} w_ipq x^2_{i,j+p,k+q}``.

    Args:
        maps: number of input maps ``C``.
        window: odd side of the Gaussian window, in pixels.
        sigma: its standard deviation in pixels; default ``window / 4``.
        border: ``"renormalize"``, ``"zero"`` or ``"reflect"``.
        threshold: ``c``: ``"mean"`` (the image's mean of ``sigma``) or a number ``>= 0``.
        floor: the least ``c`` can be, ``> 0``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return divisive_norm(x, self.window, self.threshold, self.border, self.floor)


class ContrastNorm(_DivisiveBase):
    """Local contrast normalization: :class:`SubtractiveNorm`, then :class:`DivisiveNorm`.

    Both steps use the same window. Arguments as in :class:`DivisiveNorm`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return contrast_norm(x, self.window, self.threshold, self.border, self.floor)

    def forward_rectified(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x.abs())`` in one fused op (:func:`rectified_contrast_norm`): the same
        values and gradients, fewer passes over the maps. Networks built by
        :func:`cnnkit.models.build` call it for a rectification followed by this layer."""
        return rectified_contrast_norm(x, self.window, self.threshold, self.border, self.floor)

    def forward_rectified_max_pool(
        self, x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]
    ) -> torch.Tensor:
        """``PoolSubsample("max", window, stride)(self(x.abs()))``, ``(N, C, H, W)`` ->
        ``(N, C, floor((H - k_h) / s_h) + 1, floor((W - k_w) / s_w) + 1)``, in one fused op
        (:func:`rectified_contrast_norm_max_pool`): the same values and gradients, and
        the normalized maps are never written out. Networks built by
        :func:`cnnkit.models.build` call it for a rectification, this layer and such a
        pooling in a row."""
        return rectified_contrast_norm_max_pool(
            x, self.window, self.threshold, self.border, self.floor, window, stride
        )
