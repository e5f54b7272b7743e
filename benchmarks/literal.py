"""The lecture's lecun83 network written literally in PyTorch: the benchmark's baseline.

What a user writes from the lecture without cnnkit, computing the same function as
``cnnkit.models.build(cnnkit.models.from_name("lecun83"))``:

- layer 3 (64 -> 256 maps, each from 16 of the 64) as a dense ``(256, 64, 9, 9)``
  convolution whose weight is multiplied by a 0/1 connection mask (4x the useful work);
- pooling as the lecture says it: max over every 10x10 (6x6) window at stride 1, then
  keep every 5th (4th) row and column;
- local contrast normalization as two ``C``-channel 9x9 convolutions with the Gaussian
  window (zero padding), each divided by the window mass inside the image (cnnkit's
  ``border="renormalize"``), and the threshold ``c`` the image's mean of ``sigma``
  (cnnkit's ``threshold="mean"``, with the same floor of 1e-4).

``LiteralLecun83.from_cnnkit(model)`` copies a built cnnkit lecun83's weights, so the two
can be checked for equal outputs before they are timed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FLOOR = 1e-4  # cnnkit's default floor under the threshold c


def _dense_weight(table: torch.Tensor, weight: torch.Tensor, c_in: int) -> torch.Tensor:
    """The ``(C_out, C_in, kh, kw)`` weight of a table filter bank, zeros where unconnected."""
    c_out = int(table[:, 1].max()) + 1
    dense = weight.new_zeros(c_out, c_in, *weight.shape[1:])
    dense[table[:, 1], table[:, 0]] = weight.detach()
    return dense


class LiteralContrastNorm(nn.Module):
    """``v = x - mean``, ``y = v / max(c, sigma)``, windowed sums as ``C``-channel convs."""

    def __init__(self, window: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("window", window.detach().clone().unsqueeze(0))  # (1, C, k, k)
        self.pad = window.shape[-1] // 2

    def _window_mean(self, z: torch.Tensor) -> torch.Tensor:
        total = F.conv2d(z, self.window, padding=self.pad)  # (N, 1, H, W)
        ones = torch.ones_like(z[:1])
        mass = F.conv2d(ones, self.window, padding=self.pad)  # (1, 1, H, W)
        return total / mass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x - self._window_mean(x)
        sigma = self._window_mean(v * v).sqrt()
        c = sigma.mean(dim=(2, 3), keepdim=True).clamp_min(FLOOR)
        return v / torch.maximum(sigma, c)


class LiteralLecun83(nn.Module):
    """lecun83, literally: conv 1->64 9x9, |.|, LCN, max 10x10 stride 1 then every 5th,
    masked dense conv 64->256 9x9, |.|, LCN, max 6x6 stride 1 then every 4th, linear."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        bank1, bank2 = model.stage1.filters, model.stage2.filters
        self.conv1 = nn.Parameter(_dense_weight(bank1.table, bank1.weight, 1))
        self.bias1 = nn.Parameter(bank1.bias.detach().clone())
        self.conv3 = nn.Parameter(_dense_weight(bank2.table, bank2.weight, 64))
        mask = torch.zeros_like(self.conv3)
        mask[bank2.table[:, 1], bank2.table[:, 0]] = 1.0
        self.register_buffer("mask3", mask)  # (256, 64, 9, 9): 1 where the table connects
        self.bias3 = nn.Parameter(bank2.bias.detach().clone())
        self.norm1 = LiteralContrastNorm(model.stage1.norm.window)
        self.norm2 = LiteralContrastNorm(model.stage2.norm.window)
        self.linear = nn.Linear(256, model.classifier.output.out_features)
        self.linear.load_state_dict(model.classifier.output.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.conv1, self.bias1).abs()  # (N, 64, 75, 75)
        h = self.norm1(h)
        h = F.max_pool2d(h, 10, stride=1)[:, :, ::5, ::5]  # 66x66, then 14x14
        h = F.conv2d(h, self.conv3 * self.mask3, self.bias3).abs()  # (N, 256, 6, 6)
        h = self.norm2(h)
        h = F.max_pool2d(h, 6, stride=1)[:, :, ::4, ::4]  # 1x1
        return self.linear(h.flatten(1))

    @classmethod
    def from_cnnkit(cls, model: nn.Module) -> LiteralLecun83:
        return cls(model)
