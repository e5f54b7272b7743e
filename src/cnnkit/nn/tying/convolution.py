"""The tie groups under which untied banks are convolutions, and what tying saves.

A :class:`~cnnkit.nn.tying.LocallyConnected2d` holds a kernel at every output position;
:func:`convolution_groups` ties each kernel entry across the positions (and each map's
bias), which makes the layer exactly the convolution with that table. :func:`stored_and_free`
counts the entries the untied layer holds against the values left free once tied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnkit.nn.tying.groups import TieGroups
from cnnkit.nn.tying.untied import LocallyConnected2d

__all__ = ["TieCounts", "convolution_groups", "stored_and_free"]


def _check_untied(layer: object) -> LocallyConnected2d:
    if not isinstance(layer, LocallyConnected2d):
        raise TypeError(
            "layer must be a locally connected layer (LocallyConnected2d), "
            f"got {type(layer).__name__}"
        )
    return layer


def convolution_groups(*layers: LocallyConnected2d) -> TieGroups:
    """The tie groups under which locally connected layers compute convolutions.

    For a layer with ``weight`` ``(H_out, W_out, K, kh, kw)`` and ``bias``
    ``(C_out, H_out, W_out)``, entry ``weight[p, q, r, u, v]`` is tied to
    ``weight[p', q', r, u, v]`` at every other position (one group per table row and
    kernel entry: ``K * kh * kw`` groups of ``H_out * W_out``), and ``bias[o, p, q]`` to
    every ``bias[o, p', q']`` (``C_out`` groups). Tied this way the layer is exactly the
    convolution -- with a connection table, the table's convolution. Several layers give
    one :class:`TieGroups` whose groups never span two layers.
    """
    if not layers:
        raise ValueError("convolution_groups needs at least one layer")
    labels, names, offset = {}, {}, 0
    for number, layer in enumerate(layers):
        weight, bias = _check_untied(layer).weight, layer.bias
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


def stored_and_free(layer: LocallyConnected2d) -> TieCounts:
    """Counts of a locally connected layer from its shapes alone (works on ``meta``).

    Stored: ``H_out * W_out * K * kh * kw`` weights and ``C_out * H_out * W_out`` biases.
    Free under :func:`convolution_groups`: ``K * kh * kw`` weights and ``C_out`` biases.
    The lecture's first layer (64 maps of 75x75 from one 83x83 input, 9x9 kernels) stores
    64 * 75 * 75 * 81 = 29,160,000 weights, of which 64 * 81 = 5,184 are free.
    """
    weight, bias = _check_untied(layer).weight, layer.bias
    out_h, out_w, rows, kh, kw = weight.shape
    return TieCounts(
        stored_weights=weight.numel(),
        free_weights=rows * kh * kw,
        stored_biases=0 if bias is None else bias.numel(),
        free_biases=0 if bias is None else bias.shape[0],
    )
