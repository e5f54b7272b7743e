"""Model surgery: every filter bank of a model replaced by its untied copy."""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.nn.filter_bank import FilterBank
from cnnkit.nn.tying.untied import LocallyConnected2d

__all__ = ["untie_filter_banks"]


def untie_filter_banks(model: nn.Module, example_input: torch.Tensor) -> list[LocallyConnected2d]:
    """Replace every filter bank inside ``model`` by its untied :class:`LocallyConnected2d`.

    Filter banks are :class:`cnnkit.nn.filter_bank.FilterBank` and ``nn.Conv2d`` modules
    (the latter with ``groups=1``, ``dilation=1``, no padding). Each bank's input size is
    read from one forward pass of ``example_input`` (any batch size, under ``no_grad``);
    each new layer starts with the bank's kernel and bias copied to every position, so the
    model computes the same function. Returns the new layers in module order; tie them
    with ``cnnkit.nn.tying.convolution_groups(*layers)``. A bank that the forward pass
    never reaches, or reaches with two input sizes, is an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    banks = [
        (name, m) for name, m in model.named_modules() if isinstance(m, (FilterBank, nn.Conv2d))
    ]
    if banks and banks[0][0] == "":
        raise TypeError(
            "model must contain filter banks, not be one: use "
            "LocallyConnected2d.from_filter_bank(bank, input_hw)"
        )
    seen = _input_sizes(model, example_input, banks)
    layers = []
    for name, bank in banks:
        if name not in seen:
            raise ValueError(
                f"filter bank {name!r} was not reached by a forward pass of example_input"
            )
        layer = LocallyConnected2d.from_filter_bank(bank, seen[name])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def _input_sizes(
    model: nn.Module, example_input: torch.Tensor, banks: list[tuple[str, nn.Module]]
) -> dict[str, tuple[int, int]]:
    """The ``(H, W)`` each named bank is called on in one forward pass of the model."""
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            hw = tuple(args[0].shape[-2:])
            if seen.setdefault(name, hw) != hw:
                raise ValueError(
                    f"filter bank {name!r} is called on two input sizes, "
                    f"{seen[name]} and {hw}; an untied layer needs one"
                )

        return hook

    hooks = [bank.register_forward_pre_hook(record(name)) for name, bank in banks]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in hooks:
            handle.remove()
    return seen
