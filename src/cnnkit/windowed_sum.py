"""The windowed sum over all maps that both normalization steps take.

For ``z`` of ``(N, C, H, W)`` and a window ``w`` of ``(C, k_h, k_w)`` (odd sides, offsets
``p, q`` centred at 0)::

    s_jk = sum_{i,p,q} w_ipq z_{i, j+p, k+q}                 (N, 1, H, W)

with one of three rules where ``j + p`` or ``k + q`` leaves the map:

- ``"renormalize"``: only the pixels inside are summed, and the sum is divided by the
  window mass that falls inside, ``m_jk = sum_{i, (j+p, k+q) inside} w_ipq``: a weighted
  mean of what is there;
- ``"zero"``: pixels outside count as 0;
- ``"reflect"``: indices are mirrored into the map without repeating the edge
  (``-1 -> 1``, ``H -> H - 2``).

:func:`local_mean` is the same sum of an image, taken so that it cancels less.

It is one ``C -> 1`` convolution of the padded maps (a correlation, as the offsets are
centred), differentiable in ``z`` and in ``w``. This module imports nothing else of
cnnkit, so that the plain normalization ops and their fast kernel can both use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BORDERS", "local_mean", "windowed_sum"]

BORDERS = ("renormalize", "zero", "reflect")


def windowed_sum(z: torch.Tensor, window: torch.Tensor, border: str) -> torch.Tensor:
    """``s = sum_{i,p,q} w_ipq z_{i,j+p,k+q}`` under ``border``; ``(N, C, H, W)`` in,
    ``(N, 1, H, W)`` out (module notes)."""
    window = window.to(dtype=z.dtype, device=z.device)
    size_h, size_w = window.shape[-2:]
    padding = (size_w // 2, size_w // 2, size_h // 2, size_h // 2)  # left, right, top, bottom
    mode = "reflect" if border == "reflect" else "constant"
    total = F.conv2d(F.pad(z, padding, mode=mode), window.unsqueeze(0))  # (N, 1, H, W)
    if border != "renormalize":
        return total
    ones = z.new_ones(1, 1, *z.shape[-2:])  # (1, 1, H, W)
    mass = F.conv2d(F.pad(ones, padding), window.sum(dim=0)[None, None])  # (1, 1, H, W)
    return total / torch.where(mass == 0, 1.0, mass)


def local_mean(x: torch.Tensor, window: torch.Tensor, border: str) -> torch.Tensor:
    """``windowed_sum(x)`` computed as ``s S(1) + S(x - s)``, ``s`` each image's mean value.

    Equal in exact arithmetic (the sum is linear); in floating point the sum of the
    small deviations ``x - s`` cancels less, and a constant image -- whose deviations
    are exactly 0 -- gives exactly its own value under "renormalize", where ``S(1) = 1``
    (under "reflect" ``S(1)`` is the window's own sum, taken in float64).
    ``(N, C, H, W)`` in, ``(N, 1, H, W)`` out.
    """
    shift = x.mean(dim=(-3, -2, -1), keepdim=True)  # (N, 1, 1, 1)
    deviations = windowed_sum(x - shift, window, border)
    if border == "renormalize":
        return deviations + shift
    if border == "reflect":  # every mirrored window lies inside: S(1) is the window's sum
        return deviations + shift * window.to(torch.float64).sum().to(x.dtype)
    ones = x.new_ones(1, *x.shape[1:])  # (1, C, H, W)
    return deviations + shift * windowed_sum(ones, window, border)
