"""Training a CNN by tying weights: the lecture's Section 3, in the order it tells it.

"CNNs are trained just like the usual neural networks, except that weight-tying must be
respected throughout the training": a convolution is a layer whose kernel is the same at
every position, ``w_1 = w_2 = ... = w_N``. Here that layer is built untied and held tied:

1. :mod:`~cnnkit.nn.tying.untied` -- :class:`LocallyConnected2d`, a filter bank with its
   own kernel and bias at every output position (the ``w_j`` before tying), and its
   conversions from and to a shared :class:`~cnnkit.nn.filter_bank.FilterBank`. Its math
   is :func:`cnnkit.ops.locally_connected.locally_connected2d`.
2. :mod:`~cnnkit.nn.tying.groups` -- :class:`TieGroups`, which entries are tied, with the
   lecture's rule as a method: :meth:`TieGroups.project_` replaces every group by its mean,
   ``w_i(new) = (1/N) sum_j w~_j(new)``; :meth:`TieGroups.is_tied` and
   :meth:`TieGroups.check_tied` test the constraint.
3. :mod:`~cnnkit.nn.tying.convolution` -- :func:`convolution_groups`, the groups under
   which untied banks are exactly convolutions, and :func:`stored_and_free`, what the
   untied layer stores against what stays free once tied.
4. :mod:`~cnnkit.nn.tying.averaging` -- :func:`tie_after_step`, the projection after every
   optimizer step, and :func:`scale_gradients_by_group_size`, which makes averaging
   follow weight sharing at the same learning rate.
5. :mod:`~cnnkit.nn.tying.surgery` -- :func:`untie_filter_banks`, every filter bank of a
   model replaced by its untied copy.

``cnnkit.tying`` and ``cnnkit.nn.locally_connected`` name the same objects.
"""

from cnnkit.nn.tying.averaging import TieHandle, scale_gradients_by_group_size, tie_after_step
from cnnkit.nn.tying.convolution import TieCounts, convolution_groups, stored_and_free
from cnnkit.nn.tying.groups import (
    TieGroups,
    check_tied,
    free_parameters,
    is_tied,
    project_,
    stored_entries,
)
from cnnkit.nn.tying.surgery import untie_filter_banks
from cnnkit.nn.tying.untied import LocallyConnected2d

__all__ = [
    "LocallyConnected2d",
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
    "untie_filter_banks",
]
