"""Training with tied weights: the lecture's averaging after every optimizer step.

The lecture (Section 3) keeps the constraint ``w_1 = w_2 = ... = w_N`` the literal way: a
gradient step moves every ``w_j`` on its own to ``w~_j``, then each is replaced by the
group's mean, ``w_i(new) = (1/N) sum_j w~_j(new)``. :func:`tie_after_step` does that for
any parameters and any ``torch.optim`` optimizer, running :meth:`TieGroups.project_
<cnnkit.nn.tying.TieGroups.project_>` after every ``optimizer.step()``.

Why averaging gives a convolution: if the tied entries are equal before a plain SGD step,
each moves by ``-lr * g_j`` (``g_j`` its own gradient), and their mean moves by
``-lr * mean_j g_j``. A convolution stores the weight once, and its gradient is the *sum*
``sum_j g_j``; so averaging at ``lr`` follows the convolution at ``lr / N``. Multiplying
each gradient by its group's size ``N`` first (:func:`scale_gradients_by_group_size`,
``scale_gradients=True``) makes averaging at ``lr`` follow the convolution at ``lr``.
Optimizers whose update is not linear in the gradient (Adam, RMSprop) break both
equivalences. See ``docs/tying.md``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cnnkit._validation import check_bool
from cnnkit.nn.tying.groups import TieGroups

__all__ = ["TieHandle", "scale_gradients_by_group_size", "tie_after_step"]


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

    Registers a gradient hook (``Tensor.register_hook``) on every tied parameter
    (:meth:`TieGroups.register_gradient_scaling`): each gradient ``g_j`` flowing into the
    parameter becomes ``N_g * g_j``, ``N_g`` the number of entries in ``j``'s group (1 for
    an untied entry), before it is accumulated into ``.grad``. The group's mean gradient
    then equals the sum ``sum_j g_j``, the gradient a single shared weight would receive,
    so plain SGD (with or without momentum, nesterov or dampening) followed by
    :meth:`TieGroups.project_` moves the group exactly as it moves a shared weight at the
    same learning rate. Weight decay, which the optimizer adds after the hook, is not
    scaled, and so matches the shared weight's too. Everything else that reads ``.grad``
    sees the scaled values (a gradient-norm clip, for one). Adam-like optimizers divide by
    the gradient's magnitude, so the scaling hardly changes them. Returns a
    :class:`TieHandle`; ``remove()`` unregisters the hooks.
    """
    return TieHandle(TieGroups.of(groups).register_gradient_scaling())


def tie_after_step(
    optimizer: torch.optim.Optimizer,
    groups: TieGroups | Mapping[torch.Tensor, torch.Tensor],
    *,
    scale_gradients: bool = False,
    project_now: bool = True,
) -> TieHandle:
    """Keep ``groups`` tied through training: :meth:`TieGroups.project_` after every step.

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
    check_bool("scale_gradients", scale_gradients)
    check_bool("project_now", project_now)
    g = TieGroups.of(groups)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in zip(g.names, g, strict=True) if id(p) not in optimized]
    if missing:
        raise ValueError(
            f"groups tie parameters the optimizer does not update: {', '.join(missing)}"
        )
    if project_now:
        g.project_()
    handles = g.register_gradient_scaling() if scale_gradients else []

    def hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        g.project_()

    handles.append(optimizer.register_step_post_hook(hook))
    return TieHandle(handles)
