"""The untied filter bank and its model surgery, under their old names.

The layer lives in :mod:`cnnkit.nn.tying.untied`, its surgery in
:mod:`cnnkit.nn.tying.surgery` and its math in :mod:`cnnkit.ops.locally_connected`; this
module names the same objects.
"""

from cnnkit.nn.tying.surgery import untie_filter_banks
from cnnkit.nn.tying.untied import LocallyConnected2d
from cnnkit.ops.locally_connected import locally_connected2d

__all__ = ["LocallyConnected2d", "locally_connected2d", "untie_filter_banks"]
